"""Timing compiled functions the same way everywhere (search, final re-timing, bench).

Warm-up calls are excluded; each sample runs enough back-to-back calls to last `min_sample_s` and is closed by a
device synchronisation; inputs rotate over several buffers so no cache serves every call; the figure is the median
of the samples and the spread their interquartile range.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import jax
import numpy as np

from autotune.options import TimingPolicy


@dataclass(frozen=True)
class Timing:
    """Seconds per call: median over samples, interquartile spread, number of samples."""

    median_s: float
    spread_s: float
    count: int

    @classmethod
    def from_samples(cls, samples: Sequence[float]) -> "Timing":
        values = np.asarray(samples, np.float64)
        q1, q3 = np.percentile(values, [25, 75])
        return cls(float(np.median(values)), float(q3 - q1), int(values.size))


def _run(call: Callable, args: tuple) -> None:
    jax.block_until_ready(call(*args))


class Timer:
    """Times one callable over rotating argument sets; calibrated once, then sampled as often as asked."""

    def __init__(self, call: Callable, arg_sets: Sequence[tuple], policy: TimingPolicy = TimingPolicy()):
        self.call, self.arg_sets, self.policy = call, list(arg_sets), policy
        self._next = 0
        for _ in range(policy.warmup):
            self._one()
        start = time.perf_counter()
        self._one()
        once = max(time.perf_counter() - start, 1e-9)
        self.calls = max(1, min(policy.max_calls_per_sample, math.ceil(policy.min_sample_s / once)))

    def _one(self) -> None:
        _run(self.call, self.arg_sets[self._next % len(self.arg_sets)])
        self._next += 1

    def sample(self) -> float:
        """Seconds per call over one sample of back-to-back calls."""
        outs = []
        start = time.perf_counter()
        for _ in range(self.calls):
            outs.append(self.call(*self.arg_sets[self._next % len(self.arg_sets)]))
            self._next += 1
        jax.block_until_ready(outs)
        return (time.perf_counter() - start) / self.calls


def time_call(call: Callable, arg_sets: Sequence[tuple], policy: TimingPolicy = TimingPolicy()) -> Timing:
    """Median time of one callable."""
    timer = Timer(call, arg_sets, policy)
    return Timing.from_samples([timer.sample() for _ in range(policy.samples)])


def time_interleaved(calls: dict, arg_sets: Sequence[tuple], policy: TimingPolicy = TimingPolicy(),
                     seed: int = 0) -> dict:
    """Time several callables round by round in shuffled order, so drifts in clock or load hit all alike."""
    timers = {name: Timer(call, arg_sets, policy) for name, call in calls.items()}
    samples: dict = {name: [] for name in calls}
    order = list(calls)
    rng = random.Random(seed)
    for _ in range(policy.samples):
        rng.shuffle(order)
        for name in order:
            samples[name].append(timers[name].sample())
    return {name: Timing.from_samples(values) for name, values in samples.items()}
