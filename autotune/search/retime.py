"""The end of a search: re-time the study's fastest configs interleaved with the default, store the winner.

Trial times are measured one candidate at a time while later candidates compile in background threads, so two
trials' times are not a fair comparison; the final re-timing runs the top few and the default round by round on the
same inputs, and its figures are the ones stored. That is why the stored best can differ from the fastest trial.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from autotune.measure.baselines import xla_attention_call
from autotune.measure.kernel_call import compile_candidate
from autotune.config_check import check_with
from autotune.kernel_protocol import KernelModule
from autotune.options import TimingPolicy
from autotune.search.study import Standings
from autotune.space import config_text
from autotune.measure.timing import time_interleaved
from db import Store, TuningKey
from kernels import Problem


@dataclass(frozen=True)
class SearchResult:
    """What one problem's search stored, and how it got there.

    `best_time_s` and `default_time_s` come from the final interleaved re-timing (what is stored), not from the
    trials; `best_trial_s` is the fastest trial's own time, as the progress bar showed it. `budget_met_before`:
    the study already had its trials when this run started (nothing was searched or re-timed)."""

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

    @property
    def speedup(self) -> float | None:
        if self.best_time_s and self.default_time_s:
            return self.default_time_s / self.best_time_s
        return None


class AllCandidatesFailed(RuntimeError):
    """Every candidate of a problem failed: nothing could be stored."""


def retime_and_store(standings: Standings, *, kernel: KernelModule, store: Store, run_id: int | None,
                     interpret: bool, timing: TimingPolicy, compare_xla: bool, arg_sets: list[tuple],
                     started: float) -> SearchResult:
    """Re-time the top configs with the default (and XLA's attention, for the summary) and offer the winner to the
    database, which keeps the faster of it and what another worker stored; AllCandidatesFailed if none passed."""
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
    if compare_xla:
        calls["xla"] = xla_attention_call(problem)
    timings = time_interleaved(calls, arg_sets, timing)
    xla = timings.pop("xla", None)
    default_name = config_text(default.to_dict())
    default_time = timings[default_name].median_s if default_name in timings else None
    winner = min(timings, key=lambda n: timings[n].median_s)
    best_config = contenders[winner].to_dict()
    stored = store.put_best(standings.key, config=best_config, time_s=timings[winner].median_s,
                            default_time_s=default_time, trials=standings.counted, run_id=run_id,
                            check=check_with(kernel))
    store.clear_miss(standings.key)
    best = store.get_best(standings.key)
    return SearchResult(standings.key, problem, best_config, timings[winner].median_s, default_time,
                        xla.median_s if xla else None, standings.counted, standings.failed, standings.statuses,
                        time.perf_counter() - started, stored, best_trial_s=standings.best_trial_s,
                        best_id=best.id if best else None)


def already_done(standings: Standings, store: Store, started: float) -> SearchResult:
    """The result of a rerun whose study already has its budget: what is stored, with nothing searched or timed."""
    best = store.get_best(standings.key)
    if best is None:  # the trials are there but no best was stored (the last run stopped before the end)
        raise LookupError("no best stored yet")
    return SearchResult(standings.key, standings.problem, best.config, best.time_s, best.default_time_s, None,
                        standings.counted, standings.failed, standings.statuses, time.perf_counter() - started,
                        False, best_trial_s=standings.best_trial_s, best_id=best.id, budget_met_before=True)
