"""Evaluating one candidate: compile it, check it against the reference, time it, and say what it came to.

The search runs this in its own process (compiles done ahead in background threads) or, with `--isolate`, in a
child process (`isolation.py`); both end in the same `TrialOutcome`, which is what the study and our table record.
"""
from __future__ import annotations

import time
from concurrent.futures import Future, TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Callable

from autotune.measure.checking import check_candidate
from autotune.measure.inputs import random_lengths, random_qkv, random_segment_ids
from autotune.options import SearchOptions
from autotune.measure.timing import Timer, Timing
from db.records import RESOURCE_EXHAUSTED
from kernels import Problem


@dataclass
class TrialOutcome:
    """What one evaluated candidate came to."""

    status: str
    time_s: float | None = None
    spread_s: float | None = None
    count: int | None = None
    compile_s: float | None = None
    max_error: float | None = None
    error_class: str | None = None
    error_message: str | None = None


def classify_error(exc: BaseException, stage: str) -> str:
    text = f"{type(exc).__name__}: {exc}".lower()
    if RESOURCE_EXHAUSTED in text or "out of memory" in text or "shared memory" in text:
        return RESOURCE_EXHAUSTED
    return "compile_error" if stage == "compile" else "runtime_error"


def failure(stage: str, exc: BaseException) -> TrialOutcome:
    return TrialOutcome(classify_error(exc, stage), error_class=type(exc).__name__, error_message=str(exc)[:2000])


def timing_inputs(problem: Problem, options: SearchOptions, seed: int) -> list[tuple]:
    """Several input buffers in rotation, with realistic packed segment ids."""
    sets = []
    for i in range(options.input_buffers):
        q, k, v = random_qkv(problem, seed + 1000 + i)
        ids = random_segment_ids(problem, options.documents, seed + 1000 + i)
        if ids is not None and not isinstance(ids, tuple):
            ids = (ids, ids)
        args = (q, k, v, *(ids or (None, None)), *random_lengths(problem, seed + 1000 + i))
        sets.append(args + (q,) if problem.backward else args)
    return sets


def evaluate(call: Callable, compile_s: float, problem: Problem, options: SearchOptions, seed: int,
             arg_sets: list[tuple]) -> TrialOutcome:
    """Check a compiled candidate against the reference, then time it."""
    try:
        check = check_candidate(call, problem, seed=seed, documents=options.documents)
    except Exception as exc:  # noqa: BLE001 - any failure of a candidate is recorded, not raised
        outcome = failure("run", exc)
        outcome.compile_s = compile_s
        return outcome
    if not check.ok:
        return TrialOutcome("mismatch", compile_s=compile_s, max_error=check.max_error,
                            error_class="Mismatch", error_message=check.message)
    try:
        timer = Timer(call, arg_sets, options.timing)
        samples = [timer.sample() for _ in range(options.timing.samples)]
    except Exception as exc:  # noqa: BLE001
        outcome = failure("run", exc)
        outcome.compile_s = compile_s
        return outcome
    timing = Timing.from_samples(samples)
    return TrialOutcome("ok", timing.median_s, timing.spread_s, timing.count, compile_s, check.max_error)


def evaluate_compiling(future: Future, problem: Problem, options: SearchOptions, seed: int,
                       arg_sets: list[tuple]) -> tuple[TrialOutcome, float, float]:
    """A candidate compiling in a background thread: its outcome, the seconds spent waiting for the compile, and
    those spent checking and timing it."""
    start = time.perf_counter()
    try:
        compiled = future.result(timeout=options.trial_timeout_s)
    except FutureTimeout:
        return (TrialOutcome("timeout", error_class="Timeout",
                             error_message=f"compiling took longer than {options.trial_timeout_s} s"),
                time.perf_counter() - start, 0.0)
    except Exception as exc:  # noqa: BLE001
        return failure("compile", exc), time.perf_counter() - start, 0.0
    compiled_at = time.perf_counter()
    outcome = evaluate(compiled.call, compiled.compile_s, problem, options, seed, arg_sets)
    return outcome, compiled_at - start, time.perf_counter() - compiled_at
