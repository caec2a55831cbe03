"""The search: one Optuna study per tuning key, every candidate checked, timed and recorded.

`search_problem` is the entry point. The loop below reads top to bottom: open the key's shared study (resuming it,
failing dead workers' trials), enqueue the default config and a warm start, then ask for candidates and compile a
few ahead in background threads while the main thread checks and times the oldest; each outcome is told to the
study and recorded in our table; at the end the fastest few are re-timed against the default and the winner is
stored. The space and samplers are `autotune/space.py`, the shared study `study.py`, one candidate
`autotune/measure/`, the end `retime.py`, and what a compile-only sweep lets the search skip `autotune/compile/results.py`.
"""
from __future__ import annotations

import dataclasses
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

from autotune.measure.kernel_call import compile_candidate
from autotune.compile.results import ahead_of_time
from autotune.device import DeviceInfo
from autotune.measure.evaluation import TrialOutcome, evaluate_compiling, timing_inputs
from autotune.measure.isolation import evaluate_isolated
from autotune.keys import make_key
from autotune.kernel_protocol import KernelModule, device_kind_of, load_kernel
from autotune.options import SAMPLERS, SearchOptions
from autotune.search.progress import progress_bar, trial_postfix
from autotune.search.retime import AllCandidatesFailed, SearchResult, already_done, retime_and_store
from autotune.space import Space, make_sampler
from autotune.search.study import SharedStudy
from db import Store
from kernels import Problem

__all__ = ["SAMPLERS", "AllCandidatesFailed", "Search", "SearchOptions", "SearchResult", "Space", "make_sampler",
           "search_problem", "timing_inputs"]
MAX_SKIPS = 200  # asks in a row that gave invalid or already evaluated configs: the space is exhausted


class Search:
    """One problem's search, from asking Optuna for candidates to storing the best."""

    def __init__(self, problem: Problem, kernel: KernelModule, kernel_name: str, store: Store, device: DeviceInfo,
                 options: SearchOptions, *, run_id: int | None = None, progress: bool = True):
        self.problem, self.kernel, self.kernel_name, self.store = problem, kernel, kernel_name, store
        self.device, self.options, self.run_id, self.progress = device, options, run_id, progress
        self.key = make_key(kernel, problem, device)
        ahead = ahead_of_time(store, self.key, allow_spills=options.allow_spills)
        self.space = Space(kernel, problem, device_kind_of(device), ahead)
        self.skip_note = None if ahead is None else ahead.describe(
            [c.to_dict() for c in self.space.valid_configs()], self.space.default.to_dict())
        if self.space.invalid_reasons(self.space.default):
            raise ValueError(f"the kernel's default config is invalid for {problem}: "
                             f"{self.space.invalid_reasons(self.space.default)}")

    def run(self) -> SearchResult:
        """Search and store; the study's storage is closed when this returns or raises."""
        study = SharedStudy(self.key, self.store, self.space, self.options, run_id=self.run_id)
        try:
            return dataclasses.replace(self._run(study), ahead_of_time=self.skip_note)
        finally:
            study.close()

    def _run(self, study: SharedStudy) -> SearchResult:
        started = time.perf_counter()
        study.fail_stale()
        study.reconcile()
        if study.budget_met():
            try:
                return already_done(study, started)
            except LookupError:
                pass  # no best stored yet: re-time and store below
        study.enqueue_starts()
        seed = self.options.seed if self.options.seed is not None else int(time.time()) % 100000
        arg_sets = timing_inputs(self.problem, self.options, seed)
        study.start_heartbeats()
        bar = progress_bar(study.budget, self.problem, enabled=self.progress)
        bar.update(len(study.counted_trials()))
        pool = ThreadPoolExecutor(max_workers=max(1, self.options.compile_ahead), thread_name_prefix="compile")
        pending: deque = deque()
        best, default_time = study.best_value(), study.default_value()
        since_best = skips = 0
        asking, budget_spent, room_again = True, False, False
        slot_start = time.perf_counter()  # the main thread's time is cut into one slot per evaluated trial
        try:
            while True:
                # Ask for candidates until enough compile ahead (or time, the space or the budget runs out).
                while asking and len(pending) < max(1, self.options.compile_ahead):
                    if self._out_of_time(started) or skips > MAX_SKIPS:
                        asking = False
                        break
                    # No trial is created that could not be evaluated; but the ask-time view is stale right after
                    # a fresh read found room again (a trial of a dead worker did not count): `admit` decides then.
                    if not room_again and study.budget_taken():
                        asking, budget_spent = False, True
                        break
                    room_again = False
                    trial, config = study.ask()
                    verdict = study.admit(trial, config)
                    if verdict == "go":
                        skips = 0
                        future = None if self.options.isolate else pool.submit(
                            compile_candidate, self.kernel, config, self.problem, interpret=self.device.interpret)
                        pending.append((trial, config, future))
                        continue
                    study.release(trial)
                    if verdict == "stop":
                        asking, budget_spent = False, True
                    else:
                        skips += 1
                if not pending:
                    if budget_spent and study.wait_for_others(lambda: self._out_of_time(started)):
                        # a trial of another worker did not count after all
                        asking, budget_spent, room_again = True, False, True
                        continue
                    break
                # Evaluate the oldest candidate, tell the study, record it.
                trial, config, future = pending[0]
                outcome, wait_s, measure_s = self._evaluate(config, future, seed + trial.number, arg_sets)
                now = time.perf_counter()
                costs = {"slot_s": now - slot_start, "compile_wait_s": wait_s, "measure_s": measure_s,
                         "isolated": self.options.isolate}
                slot_start = now
                study.record_outcome(trial, config, outcome, costs)
                pending.popleft()
                if outcome.status == "ok":
                    if config == self.space.default:  # its fastest trial, as for `best`
                        default_time = min(default_time or outcome.time_s, outcome.time_s)
                    if best is None or outcome.time_s < best:
                        best, since_best = outcome.time_s, 0
                    else:
                        since_best += 1
                else:
                    since_best += 1
                bar.update(1)
                bar.set_postfix_str(trial_postfix(best, default_time), refresh=False)
                if self.options.patience and since_best >= self.options.patience:
                    asking = False
        except BaseException:
            study.abandon()
            raise
        finally:
            study.stop_heartbeats()
            bar.close()
            pool.shutdown(wait=False, cancel_futures=True)
        return retime_and_store(study, self.kernel, self.device, self.options, arg_sets, started)

    def _out_of_time(self, started: float) -> bool:
        return self.options.timeout_s is not None and time.perf_counter() - started > self.options.timeout_s

    def _evaluate(self, config, future, seed: int, arg_sets: list[tuple]) -> tuple[TrialOutcome, float, float]:
        """The candidate's outcome, the seconds spent waiting for its compile, and those spent checking and timing
        it (with --isolate: the child process's whole life)."""
        if self.options.isolate:
            start = time.perf_counter()
            outcome = evaluate_isolated(self.kernel_name, config, self.problem, self.options, seed,
                                        interpret=self.device.interpret)
            return outcome, 0.0, time.perf_counter() - start
        return evaluate_compiling(future, self.problem, self.options, seed, arg_sets)


def search_problem(problem: Problem, *, kernel_name: str, store: Store, device: DeviceInfo,
                   options: SearchOptions, run_id: int | None = None, progress: bool = True) -> SearchResult:
    """Search one problem and store its best config; raises AllCandidatesFailed if nothing passed."""
    kernel = load_kernel(kernel_name)
    return Search(problem, kernel, kernel_name, store, device, options, run_id=run_id, progress=progress).run()
