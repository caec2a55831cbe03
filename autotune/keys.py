"""Tuning keys: the kernel, the hardware and the problem, as the database stores them."""
from __future__ import annotations

import math
from types import ModuleType

from autotune.device import DeviceInfo
from db import TuningKey
from autotune.problem_fields import FIELDS, PROBLEM_FIELDS
from kernels import Problem

# A TuningKey carries each of Problem's fields under the same name (db/ cannot import kernels/, so
# tests/test_imports.py checks that the two agree).
SIZE_FIELDS = tuple(name for field in FIELDS if field.size for name in field.problem)


def make_key(kernel: ModuleType, problem: Problem, device: DeviceInfo) -> TuningKey:
    """The key a result for this kernel, problem and device is stored under."""
    return TuningKey(
        kernel=kernel.NAME, kernel_version=kernel.VERSION, platform=device.platform,
        device_kind=device.device_kind, jax_version=device.jax_version,
        **{name: getattr(problem, name) for name in PROBLEM_FIELDS},
    )


def problem_of(key: TuningKey) -> Problem:
    return Problem(**{name: getattr(key, name) for name in PROBLEM_FIELDS})


def shape_distance(a: TuningKey, b: TuningKey) -> float:
    """How far apart two problems are: summed |log2| ratios of their sizes (0 for the same shape)."""
    return sum(abs(math.log2(getattr(a, s) / getattr(b, s))) for s in SIZE_FIELDS)
