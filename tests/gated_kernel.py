"""The toy kernel, with configs whose tracing waits until the test opens a gate: an event, not a sleep.

A fault named "gated" in `AUTOTUNE_TOY_FAULTS` (e.g. {"gated": {"block_q": 32}}; "gated:2" for a second rule)
makes tracing a matching config wait, after it is logged, until the file `$AUTOTUNE_TOY_GATE` exists. While it
waits the worker holds no database connection busy, so a test can act on an idle worker for as long as it needs,
however slow the machine. Same name and version as the toy kernel, so the tuning keys are the toy's.
"""
from __future__ import annotations

import json
import os
import time

from tests.toy_kernel import NAME, VERSION, Config, invalid_reasons, search_space  # noqa: F401 - the surface
from tests.toy_kernel import flash_attention as _toy_flash_attention

__all__ = ["NAME", "VERSION", "Config", "invalid_reasons", "search_space", "flash_attention"]


def _gated(config) -> bool:
    data = config.to_dict()
    rules = json.loads(os.environ.get("AUTOTUNE_TOY_FAULTS", "{}"))
    return any(name.split(":")[0] == "gated" and all(data.get(k) == v for k, v in fields.items())
               for name, fields in rules.items())


def flash_attention(q, k, v, *, config=None, **options):
    out = _toy_flash_attention(q, k, v, config=config, **options)  # logs the config, then traces the kernel
    if _gated(config):
        gate = os.environ["AUTOTUNE_TOY_GATE"]
        while not os.path.exists(gate):
            time.sleep(0.05)
    return out
