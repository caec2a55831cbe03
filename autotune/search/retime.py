"""The end of a search: re-time the study's fastest configs interleaved with the default and jax.nn's own
attention (XLA, and cuDNN on a GPU), store the winner.

Trial times are measured one candidate at a time while later candidates compile in background threads, so two
trials' times are not a fair comparison; the final re-timing runs the top few, the default and the baselines round
by round on the same inputs, and its figures are the ones stored. That is why the stored best can differ from the
fastest trial. A baseline wins the key only when it beats the best kernel config by more than the noise margin
(autotune.search.winner); the best kernel config is stored either way, for calls the baseline cannot run.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from autotune.search.winner import KERNEL, choose_winner
from autotune.measure.baselines import compiled_baselines
from autotune.measure.kernel_call import compile_candidate
from autotune.config_check import check_with
from autotune.kernel_protocol import KernelModule
from autotune.options import DEFAULT_MARGIN, TimingPolicy
from autotune.search.study import Standings
from autotune.space import config_text
from autotune.measure.timing import time_interleaved
from db import Store, TuningKey
from kernels import Problem


@dataclass(frozen=True)
class SearchResult:
    """What one problem's search stored, and how it got there.

    `best_time_s` (the winner's) and `default_time_s` come from the final interleaved re-timing (what is stored),
    not from the trials; `implementation` is the winner ("pallas": the kernel's `best_config`) and `times` every
    implementation's time there. `best_trial_s` is the fastest trial's own time, as the progress bar showed it.
    `budget_met_before`: the study already had its trials when this run started (nothing was searched or
    re-timed)."""

    key: TuningKey
    problem: Problem
    best_config: dict | None
    best_time_s: float | None
    default_time_s: float | None
    xla_time_s: float | None
    trials_run: int
    trials_failed: int
    status_counts: dict
    wall_s: float
    stored: bool
    best_trial_s: float | None = None
    best_id: int | None = None
    budget_met_before: bool = False
    ahead_of_time: str | None = None  # what a compile-only sweep let the search skip (autotune.compile.results)
    implementation: str = KERNEL
    times: dict = field(default_factory=dict)
    predicted_rank: str | None = None  # where the measured winner ranked among the predictions for this device kind

    @property
    def speedup(self) -> float | None:
        if self.best_time_s and self.default_time_s:
            return self.default_time_s / self.best_time_s
        return None


class AllCandidatesFailed(RuntimeError):
    """Every candidate of a problem failed: nothing could be stored."""


def retime_and_store(standings: Standings, *, kernel: KernelModule, store: Store, run_id: int | None,
                     interpret: bool, timing: TimingPolicy, compare_xla: bool, arg_sets: list[tuple],
                     started: float, margin: float = DEFAULT_MARGIN) -> SearchResult:
    """Re-time the top configs with the default and (`compare_xla`) jax.nn's implementations that can run the
    problem, and offer the winner to the database, which keeps the faster of it and what another worker stored;
    AllCandidatesFailed if no config passed. On the interpret platform the baselines are timed but cannot win."""
    problem = standings.problem
    if not standings.top:
        raise AllCandidatesFailed(
            f"every candidate failed for {problem} ({standings.failed} failed: "
            + ", ".join(f"{n} {s}" for s, n in sorted(standings.statuses.items())) + ")"
        )
    default = standings.default
    contenders = {config_text(c.to_dict()): c for c in [*standings.top, default]}
    calls = {}
    for name, config in contenders.items():
        try:
            calls[name] = compile_candidate(kernel, config, problem, interpret=interpret).call
        except Exception:  # noqa: BLE001 - the default may fail to compile on odd hardware
            continue
    baselines = compiled_baselines(problem, standings.key.platform) if compare_xla else {}
    timings = time_interleaved({**calls, **baselines}, arg_sets, timing)
    baseline_times = {name: timings.pop(name).median_s for name in baselines}
    default_name = config_text(default.to_dict())
    default_time = timings[default_name].median_s if default_name in timings else None
    fastest = min(timings, key=lambda n: timings[n].median_s)
    best_config = contenders[fastest].to_dict()
    times = {KERNEL: timings[fastest].median_s, **baseline_times}
    implementation = choose_winner(times, margin=margin, interpret=interpret)
    stored = store.put_best(standings.key, config=best_config, time_s=times[implementation],
                            default_time_s=default_time, trials=standings.counted, run_id=run_id,
                            check=check_with(kernel), implementation=implementation, times=times)
    store.clear_miss(standings.key)
    best = store.get_best(standings.key)
    return SearchResult(standings.key, problem, best_config, times[implementation], default_time,
                        baseline_times.get("xla"), standings.counted, standings.failed, standings.statuses,
                        time.perf_counter() - started, stored, best_trial_s=standings.best_trial_s,
                        best_id=best.id if best else None, implementation=implementation, times=times)


def already_done(standings: Standings, store: Store, started: float) -> SearchResult:
    """The result of a rerun whose study already has its budget: what is stored, with nothing searched or timed."""
    best = store.get_best(standings.key)
    if best is None:  # the trials are there but no best was stored (the last run stopped before the end)
        raise LookupError("no best stored yet")
    return SearchResult(standings.key, standings.problem, best.config, best.time_s, best.default_time_s,
                        best.times.get("xla"), standings.counted, standings.failed, standings.statuses,
                        time.perf_counter() - started, False, best_trial_s=standings.best_trial_s, best_id=best.id,
                        budget_met_before=True, implementation=best.implementation, times=best.times)
