"""What a search costs on a CPU, before it starts: Pallas interpret mode runs the kernel's block loop through XLA's
CPU backend, so a trial costs about its FLOPs at a fraction of what a plain matmul of the same dtype reaches here.

The fraction and the compile cost are measured (2-core x86 machine, jax 0.10.2, the GPU kernel's default config,
b1 h4-8 q1024 d64-128, float32 and bfloat16): the kernel reached 12-21% of a 512x512 matmul's rate when the
machine was shared, and the first call compiled in 2.6-3.7 s. The estimate only needs to tell seconds from hours.
"""
from __future__ import annotations

import time

from autotune.options import DEFAULT_TRIALS, TimingPolicy

INTERPRET_CAVEAT = ("Pallas kernels run in interpret mode on this CPU: their times say nothing about GPU or TPU "
                    "speed.")
INTERPRET_SHARE_OF_MATMUL = 0.15  # measured, see above
COMPILE_S = 3.0  # measured: compiling one config in interpret mode
BACKWARD_FLOPS = 2.5  # backward FLOPs per forward FLOP (kernels.Problem.flops)
CHECK_CALLS = 2  # the candidate and the reference, once each, before timing
EXTRA_TRIALS = 4  # the final re-timing of the top configs and the default, and the XLA baseline
SLOW_SEARCH_S = 180.0  # past this, the search says how long it will take and what to do instead


def problem_flops(problem) -> float:
    """Forward FLOPs of the visible pairs; the backward adds 2.5x that."""
    return problem.flops() * (1 + BACKWARD_FLOPS if problem.backward else 1)


def matmul_rate(dtype: str, size: int = 512) -> float:
    """FLOP/s a jitted size x size matmul of `dtype` reaches on this machine now (best of 3, a few ms each)."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((size, size), dtype)
    square = jax.jit(lambda x: x @ x)
    square(a).block_until_ready()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        square(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size ** 3 / max(best, 1e-9)


def first_trial_seconds(problem, rate: float, timing: TimingPolicy = TimingPolicy()) -> float:
    """About what the first trial of `problem` costs in interpret mode: the compile, the check against the
    reference, the warm-up and the timing samples, at `rate` FLOP/s for a plain matmul."""
    call_s = problem_flops(problem) / (rate * INTERPRET_SHARE_OF_MATMUL)
    calls = CHECK_CALLS + timing.warmup + timing.samples * max(1, min(timing.max_calls_per_sample,
                                                                    int(timing.min_sample_s / max(call_s, 1e-9))))
    return COMPILE_S + calls * call_s


def search_seconds(first_trial_s: float, trials: int | None) -> float:
    """About what a whole search costs when every trial costs the first one's."""
    return first_trial_s * ((trials or DEFAULT_TRIALS) + EXTRA_TRIALS)


def duration_text(seconds: float) -> str:
    """'40 s', '12 min', '3.5 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
