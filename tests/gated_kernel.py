"""The toy kernel, with configs whose tracing waits until the test opens a gate: an event, not a sleep.

`AUTOTUNE_TOY_GATES` holds JSON like [["/tmp/x/gate1", {"block_q": 32}], ...]: tracing a config whose fields match
a rule's waits, after the toy kernel has logged it, until the rule's file exists. While it waits the worker holds no database connection
busy, so a test can act on an idle worker for as long as it needs, however slow the machine. Same name and version
as the toy kernel, so the tuning keys are the toy's.
"""
from __future__ import annotations

import json
import os
import time

from tests.toy_kernel import NAME, VERSION, Config, invalid_reasons, search_space  # noqa: F401 - the surface
from tests.toy_kernel import flash_attention as _toy_flash_attention

__all__ = ["NAME", "VERSION", "Config", "invalid_reasons", "search_space", "flash_attention"]


def flash_attention(q, k, v, *, config=None, **options):
    out = _toy_flash_attention(q, k, v, config=config, **options)  # logs the config, then traces the kernel
    data = config.to_dict()
    for gate, fields in json.loads(os.environ.get("AUTOTUNE_TOY_GATES", "[]")):
        if all(data.get(k) == v for k, v in fields.items()):
            while not os.path.exists(gate):
                time.sleep(0.05)
    return out
