"""How hard one search works: the options every stage of it reads (the loop, evaluation, isolation, re-timing).

Kept apart from the search loop so that evaluating a candidate, in this process or in a child (`isolation.py`),
needs nothing from the loop: imports run one way, options -> evaluation -> isolation -> search.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class TimingPolicy:
    """How one function is timed: warm-up calls, samples, and how long one sample lasts."""

    warmup: int = 2
    samples: int = 7
    min_sample_s: float = 2e-3
    max_calls_per_sample: int = 100


SAMPLERS = ("tpe", "random", "grid", "cmaes")
DEFAULT_MARGIN = 0.03  # jax.nn's XLA or cuDNN attention wins a key only when more than 3% faster than the kernel


def check_margin(margin, name: str = "baseline_margin") -> float:
    """The noise margin of the final re-timing (autotune.search.winner) as a fraction from 0 (any faster baseline
    wins) up to, not including, 1."""
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin) \
            or not 0 <= margin < 1:
        raise ValueError(f"{name} must be a fraction from 0 to below 1 (0.03 = 3%), got {margin!r}")
    return float(margin)

DEFAULT_TRIALS = 30  # a study's budget when --trials is not given (the grid: every valid config)


@dataclass(frozen=True)
class SearchOptions:
    """How hard to search. `trials` is the study's total (None: 30, or every valid config for the grid)."""

    trials: int | None = None
    timeout_s: float | None = None
    patience: int | None = None
    sampler: str = "tpe"
    seed: int | None = None
    documents: int = 3
    isolate: bool = False
    trial_timeout_s: float | None = 600.0
    compile_ahead: int = 2
    retime_top: int = 3
    input_buffers: int = 3
    timing: TimingPolicy = field(default_factory=TimingPolicy)
    compare_xla: bool = True  # time jax.nn's XLA (and on a GPU cuDNN) attention in the final re-timing: they may win
    baseline_margin: float = DEFAULT_MARGIN  # how much faster than the best kernel config a baseline must be to win
    allow_spills: bool = False  # time configs that spilled registers in a compile-only sweep (autotune.compile.results)

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        for name in ("trials", "patience"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise ValueError(f"timeout must be positive seconds, got {self.timeout_s!r}")
        check_margin(self.baseline_margin)
