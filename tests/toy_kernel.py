"""A kernel module for tests: the GPU kernel behind a small search space, with faults injected on request.

`AUTOTUNE_TOY_FAULTS` holds JSON like {"mismatch": {"block_k": 32}, "crash": {"block_q": 16}}: a config whose
fields match a fault's fields misbehaves that way (wrong output, a compile-time error, resources exhausted, the
process killing itself with SIGKILL, "hang": tracing sleeps for an hour, so a test can kill the worker in the middle
of a trial, or "slow": tracing sleeps $AUTOTUNE_TOY_SLOW_S seconds, default 3). A fault's name may carry a suffix
after a colon ("slow:2") so that one kind can match several configs. `AUTOTUNE_TOY_INVALID` marks configs invalid the same way, and `AUTOTUNE_TOY_LOG` names a file that gets
one line per config traced (written before any fault), so tests can see what was compiled. `AUTOTUNE_TOY_SPACE`
holds JSON like {"num_warps": [1, 2, 4, 8]} that adds fields to the search space (the blocks stay 16 and 32), so
multi-worker tests get a space too big to exhaust. Environment variables carry into the child processes of
`--isolate` and into worker processes.
"""
from __future__ import annotations

import json
import os
import signal
import time

import dataclasses

from kernels import gpu

NAME = "toy_flash_attention"
VERSION = gpu.VERSION + "-toy"
BLOCKS = (16, 32)


@dataclasses.dataclass(frozen=True)
class Config(gpu.Config):
    """The GPU kernel's config, whose default sits inside the toy's space."""

    @classmethod
    def default(cls, problem, *, device_kind=None):
        return cls.from_dict({**gpu.Config.default(problem, device_kind=device_kind).to_dict(), "block_q": 32,
                              "block_k": 32})


def _matches(config: Config, env: str) -> list[str]:
    rules = json.loads(os.environ.get(env, "{}"))
    data = config.to_dict()
    return [name for name, fields in rules.items() if all(data.get(k) == v for k, v in fields.items())]


def search_space(problem):
    extra = json.loads(os.environ.get("AUTOTUNE_TOY_SPACE", "{}"))
    return {"block_q": BLOCKS, "block_k": BLOCKS, **{name: tuple(values) for name, values in extra.items()}}


def invalid_reasons(config, problem, *, device_kind=None):
    reasons = list(gpu.invalid_reasons(config, problem, device_kind=device_kind))
    return reasons + [f"marked invalid by the test ({name})" for name in _matches(config, "AUTOTUNE_TOY_INVALID")]


def flash_attention(q, k, v, *, causal=False, segment_ids=None, sm_scale=None, config=None, interpret=False,
                    **features):
    log = os.environ.get("AUTOTUNE_TOY_LOG")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps(config.to_dict(), sort_keys=True) + "\n")
    faults = [name.split(":")[0] for name in _matches(config, "AUTOTUNE_TOY_FAULTS")]
    if "crash" in faults:
        os.kill(os.getpid(), signal.SIGKILL)
    if "hang" in faults:
        time.sleep(3600)
    if "slow" in faults:
        time.sleep(float(os.environ.get("AUTOTUNE_TOY_SLOW_S", "3")))
    if "compile_error" in faults:
        raise RuntimeError("injected compile failure")
    if "resource_exhausted" in faults:
        raise RuntimeError("RESOURCE_EXHAUSTED: injected shared memory overflow")
    out = gpu.flash_attention(q, k, v, causal=causal, segment_ids=segment_ids, sm_scale=sm_scale, config=config,
                              interpret=interpret, **features)  # window, softcap, lengths, return_lse
    return out * 1.5 if "mismatch" in faults else out


