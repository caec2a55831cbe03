"""The plain, immutable values that go into and come out of the database.

The search, the runtime and the CLI only ever see these frozen dataclasses, never ORM rows, so a record can be kept,
compared and passed between processes without a session behind it. `TuningKey` says *what* was tuned; its digest is
the one name a shape goes by everywhere (key rows, Optuna study names, worker claims).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from db.validation import (check_bool, check_choice, check_datetime, check_int, check_json_object, check_name,
                           check_positive_number, check_time)

PLATFORMS = ("gpu", "tpu", "cpu-interpret", "gpu-compile", "tpu-compile")
COMPILE_PLATFORMS = ("gpu-compile", "tpu-compile")  # compile-only results for a target: never timed, never a best
DTYPES = ("float32", "bfloat16", "float16")  # the kernels' dtypes (kernels.problem.DTYPES; a test keeps them equal)
# Out of shared memory or VMEM: a trial's status and a compile failure's kind, one spelling (XLA's RESOURCE_EXHAUSTED).
RESOURCE_EXHAUSTED = "resource_exhausted"
TRIAL_STATUSES = ("ok", "invalid", "compile_error", RESOURCE_EXHAUSTED, "mismatch", "runtime_error", "timeout",
                  "compiled")  # compiled: a compile-only trial that compiled (no time)
RUN_STATUSES = ("running", "ok", "failed", "interrupted", "crashed")
# What can win a key's final re-timing: our tuned kernel, or jax.nn.dot_product_attention's own implementations.
KERNEL_IMPLEMENTATION = "pallas"
IMPLEMENTATIONS = (KERNEL_IMPLEMENTATION, "xla", "cudnn")

_TEXT_FIELDS = ("kernel", "kernel_version", "device_kind", "jax_version")
_SHAPE_FIELDS = ("batch", "q_len", "kv_len", "heads", "kv_heads", "head_dim")
_FLAG_FIELDS = ("causal", "segments", "backward")
# Fields added in schema version 4, with their defaults: while a key holds the default, its canonical JSON leaves
# the field out, so every key stored before they existed keeps its digest (and its results are still found).
FEATURE_DEFAULTS: dict[str, Any] = {"window_left": None, "window_right": None, "softcap": None, "lengths": False}
# The largest soft cap the kernels run (kernels.problem.MAX_SOFTCAP; a test keeps them equal). A key with a larger
# cap names a problem no kernel accepts, so neither the store nor import takes it.
MAX_SOFTCAP = 2.0 ** 100


@dataclass(frozen=True)
class TuningKey:
    """Everything a measured time depends on: kernel build, machine, software and problem shape."""

    kernel: str
    kernel_version: str
    platform: str
    device_kind: str
    jax_version: str
    batch: int
    q_len: int
    kv_len: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str
    causal: bool
    segments: bool
    backward: bool
    window_left: int | None = None  # sliding window: query i sees keys i - left .. i + right (None: unbounded)
    window_right: int | None = None
    softcap: float | None = None  # logits soft-capping: cap * tanh(scores / cap)
    lengths: bool = False  # per-row padding lengths are given at run time

    def __post_init__(self) -> None:
        for name in _TEXT_FIELDS:
            check_name(name, getattr(self, name))
        check_choice("platform", self.platform, PLATFORMS)
        check_choice("dtype", self.dtype, DTYPES)
        for name in _SHAPE_FIELDS:
            object.__setattr__(self, name, check_int(name, getattr(self, name), minimum=1))
        if self.heads % self.kv_heads:
            raise ValueError(f"kv_heads must divide heads, got heads={self.heads} and kv_heads={self.kv_heads}")
        for name in _FLAG_FIELDS:
            check_bool(name, getattr(self, name))
        for name in ("window_left", "window_right"):
            object.__setattr__(self, name, check_int(name, getattr(self, name), minimum=0, optional=True))
        object.__setattr__(self, "softcap", check_positive_number("softcap", self.softcap, optional=True))
        if self.softcap is not None and self.softcap > MAX_SOFTCAP:
            raise ValueError(f"softcap must be at most 2**100 (about {MAX_SOFTCAP:.3g}, the largest cap the kernels "
                             f"run), got {self.softcap!r}")
        check_bool("lengths", self.lengths)

    def to_dict(self) -> dict[str, Any]:
        """All fields as plain JSON values."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TuningKey:
        """Inverse of `to_dict`; ValueError on unknown or missing fields and on wrong types. The fields added in
        schema version 4 may be missing (an export made before them): they take their defaults."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a tuning key must be an object (dict), got {type(data).__name__}")
        names = [field.name for field in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names), key=str)
        if unknown:
            raise ValueError(f"unknown tuning key field(s): {', '.join(map(str, unknown))}")
        missing = [name for name in names if name not in data and name not in FEATURE_DEFAULTS]
        if missing:
            raise ValueError(f"missing tuning key field(s): {', '.join(missing)}")
        return cls(**{name: data[name] for name in names if name in data})

    def digest(self) -> str:
        """32 hex digits of the SHA-256 of the canonical JSON of all fields, less the version 4 fields that hold
        their defaults: stable across processes and versions (a key without a window hashes as it did before)."""
        fields = {name: value for name, value in self.to_dict().items()
                  if name not in FEATURE_DEFAULTS or value != FEATURE_DEFAULTS[name]}
        canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(canonical.encode("ascii")).hexdigest()[:32]


ConfigCheck = Callable[[TuningKey, Mapping[str, Any]], None]
"""Raises ValueError (its message naming the field) when a config cannot run for a key; the autotune layer passes
the kernels' rules in this way, since db/ knows no kernels."""


@dataclass(frozen=True)
class RunRecord:
    """One invocation of the search (a CLI run), so trials and bests can be traced back to how they were made."""

    id: int
    host: str
    device_kind: str
    platform: str
    jax_version: str
    arguments: dict[str, Any]
    started_at: datetime
    ended_at: datetime | None
    status: str
    message: str


@dataclass(frozen=True)
class TrialRecord:
    """One measured (or failed) config; `time_s` is the median of `time_count` timings."""

    id: int
    key: TuningKey
    run_id: int | None
    number: int | None
    config: dict[str, Any]
    status: str
    error_class: str | None
    error_message: str | None
    compile_s: float | None
    time_s: float | None
    time_spread_s: float | None
    time_count: int | None
    max_error: float | None
    created_at: datetime
    figures: dict[str, Any] | None = None  # compile-only trials: what the compiler said of each kernel


@dataclass(frozen=True)
class BestRecord:
    """The fastest known config for one key and which implementation won the final re-timing: what the runtime uses.

    `config` is always the fastest kernel config (what `implementation="pallas"` runs); `time_s` is the winner's
    time and `times` every implementation's time from the same interleaved re-timing (the kernel's under "pallas";
    a record from before baselines competed holds only that)."""

    id: int
    key: TuningKey
    config: dict[str, Any]
    time_s: float
    default_time_s: float | None
    speedup: float | None
    trials: int
    run_id: int | None
    updated_at: datetime
    implementation: str = KERNEL_IMPLEMENTATION
    times: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def baseline_won(self) -> bool:
        return self.implementation != KERNEL_IMPLEMENTATION


@dataclass(frozen=True)
class MissRecord:
    """A key the runtime asked for without using a tuned config: how often it had no best (`count`: tuning helps),
    apart from how often the tuned kernels could not run the call at all (`fallbacks`: it ran XLA, tuning cannot
    help), with the latest such `reason` (e.g. an additive bias); and when last."""

    key: TuningKey
    count: int
    last_seen: datetime
    reason: str | None
    fallbacks: int = 0


@dataclass(frozen=True)
class BestOffer:
    """A candidate best for `Store.put_bests`: stored only if faster than what the key already has.

    `updated_at` is None for a fresh measurement (stamped with now); the importer passes the exported time so a
    merged result keeps its age (which `Store.prune(older_than=...)` looks at). `implementation` names the winner
    and `times` each implementation's time (None: the kernel's alone, `time_s`); see `check_winner`.
    """

    key: TuningKey
    config: dict[str, Any]
    time_s: float
    default_time_s: float | None = None
    trials: int = 0
    run_id: int | None = None
    updated_at: datetime | None = None
    implementation: str = KERNEL_IMPLEMENTATION
    times: dict[str, float] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.key, TuningKey):
            raise ValueError(f"key must be a TuningKey, got {type(self.key).__name__}")
        object.__setattr__(self, "config", check_json_object("config", self.config))
        object.__setattr__(self, "time_s", check_time("time_s", self.time_s, positive=True))
        object.__setattr__(self, "default_time_s", check_time("default_time_s", self.default_time_s, optional=True,
                                                              positive=True))
        object.__setattr__(self, "trials", check_int("trials", self.trials, minimum=0))
        object.__setattr__(self, "run_id", check_int("run_id", self.run_id, optional=True))
        if self.updated_at is not None:
            object.__setattr__(self, "updated_at", check_datetime("updated_at", self.updated_at))
        object.__setattr__(self, "times", check_winner(self.implementation, self.times, self.time_s))


def check_winner(implementation: Any, times: Any, time_s: float) -> dict[str, float]:
    """The times of a best whose winner is `implementation`, checked: an object of implementation names to
    positive seconds that holds the kernel's time and the winner's, which is `time_s` (None: a kernel win timed
    alone, {"pallas": time_s})."""
    check_choice("implementation", implementation, IMPLEMENTATIONS)
    if times is None:
        if implementation != KERNEL_IMPLEMENTATION:
            raise ValueError(f"times must give the kernel's time beside the winner's when {implementation!r} won, "
                             "got none")
        return {KERNEL_IMPLEMENTATION: time_s}
    if not isinstance(times, Mapping):
        raise ValueError(f"times must be an object of implementation names to seconds, got {type(times).__name__}")
    checked = {check_choice("times' implementation", name, IMPLEMENTATIONS):
               check_time(f"times[{name!r}]", value, positive=True) for name, value in times.items()}
    for needed in dict.fromkeys((KERNEL_IMPLEMENTATION, implementation)):
        if needed not in checked:
            raise ValueError(f"times must hold the {needed!r} time, got {sorted(checked)}")
    if checked[implementation] != time_s:
        raise ValueError(f"time_s must be the winner's time, times[{implementation!r}] = {checked[implementation]!r}, "
                         f"got {time_s!r}")
    return checked
