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
import enum
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from autotune.measure.kernel_call import compile_candidate
from autotune.compile.ranking import Ranking, predicted_ranking
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
from autotune.search.study import Admission, SharedStudy
from db import Store
from kernels import Problem

__all__ = ["SAMPLERS", "AllCandidatesFailed", "Search", "SearchOptions", "SearchResult", "Space", "make_sampler",
           "search_problem", "timing_inputs"]
MAX_SKIPS = 200  # asks in a row that gave invalid or already evaluated configs: the space is exhausted


class Asking(enum.Enum):
    """Whether the loop still asks the study for candidates."""

    OPEN = "open"
    ROOM_AGAIN = "room_again"  # open, and a fresh read just found room in the budget: the next ask trusts it
    BUDGET_SPENT = "budget_spent"  # the study's budget is taken: wait for the other workers' last trials
    CLOSED = "closed"  # out of time, patience or untried configs: finish what is pending


@dataclass
class Tally:
    """The trial times seen so far, for the progress bar and --patience."""

    best: float | None
    default_time: float | None
    since_best: int = 0

    def add(self, outcome: TrialOutcome, is_default: bool) -> None:
        if outcome.status != "ok":
            self.since_best += 1
            return
        if is_default:  # its fastest trial, as for `best`
            self.default_time = min(self.default_time or outcome.time_s, outcome.time_s)
        if self.best is None or outcome.time_s < self.best:
            self.best, self.since_best = outcome.time_s, 0
        else:
            self.since_best += 1


@dataclass(frozen=True)
class Pending:
    """An admitted candidate: its trial, its config and its compile (None with --isolate: the child compiles)."""

    trial: object
    config: object
    compiling: Future | None


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
        self.ranking = _ranking(store, self.key)  # a compile-only search's predictions for this device kind
        self.started = time.perf_counter()
        self._skips = 0  # asks in a row that gave no candidate

    def run(self) -> SearchResult:
        """Search and store; the study's storage is closed when this returns or raises."""
        self.started = time.perf_counter()
        study = SharedStudy(self.key, self.store, self.space, self.options, run_id=self.run_id)
        try:
            result = self._run(study)
            return dataclasses.replace(result, ahead_of_time=self.skip_note,
                                       predicted_rank=winner_rank_note(self.ranking, result.best_config))
        finally:
            study.close()

    def _run(self, study: SharedStudy) -> SearchResult:
        study.fail_stale()
        study.reconcile()
        if study.budget_met():
            try:
                return already_done(study.standings(self.options.retime_top), self.store, self.started)
            except LookupError:
                pass  # no best stored yet: re-time and store below
        study.enqueue_starts(self.ranking)
        seed = self.options.seed if self.options.seed is not None else int(time.time()) % 100000
        arg_sets = timing_inputs(self.problem, self.options, seed)
        study.liveness.start()
        bar = progress_bar(study.budget, self.problem, enabled=self.progress)
        bar.update(len(study.counted_trials()))
        pool = ThreadPoolExecutor(max_workers=max(1, self.options.compile_ahead), thread_name_prefix="compile")
        try:
            self._search(study, pool, bar, seed, arg_sets)
        except BaseException:
            study.abandon()
            raise
        finally:
            study.liveness.stop()
            bar.close()
            pool.shutdown(wait=False, cancel_futures=True)
        return retime_and_store(study.standings(self.options.retime_top), kernel=self.kernel, store=self.store,
                                run_id=self.run_id, interpret=self.device.interpret, timing=self.options.timing,
                                compare_xla=self.options.compare_xla, arg_sets=arg_sets, started=self.started,
                                margin=self.options.baseline_margin)

    def _search(self, study: SharedStudy, pool: ThreadPoolExecutor, bar, seed: int, arg_sets: list[tuple]) -> None:
        """Ask for candidates a few ahead of the one being evaluated, evaluate the oldest, until the budget, the
        time, the patience or the untried configs run out (and the other workers' last trials are in)."""
        pending: deque[Pending] = deque()
        tally = Tally(study.best_value(), study.default_value())
        asking = Asking.OPEN
        slot_start = time.perf_counter()  # the main thread's time is cut into one slot per evaluated trial
        while True:
            if asking in (Asking.OPEN, Asking.ROOM_AGAIN):
                asking = self._ask_ahead(study, pool, pending, trust_room=asking is Asking.ROOM_AGAIN)
            if not pending:
                if asking is Asking.BUDGET_SPENT and study.wait_for_others(self._out_of_time):
                    asking = Asking.ROOM_AGAIN  # a trial of another worker did not count after all
                    continue
                return
            candidate = pending[0]
            outcome, wait_s, measure_s = self._evaluate(candidate, seed + candidate.trial.number, arg_sets)
            now = time.perf_counter()
            costs = {"slot_s": now - slot_start, "compile_wait_s": wait_s, "measure_s": measure_s,
                     "isolated": self.options.isolate}
            slot_start = now
            study.record_outcome(candidate.trial, candidate.config, outcome, costs)
            pending.popleft()
            tally.add(outcome, candidate.config == self.space.default)
            bar.update(1)
            bar.set_postfix_str(trial_postfix(tally.best, tally.default_time), refresh=False)
            if self.options.patience and tally.since_best >= self.options.patience and asking is Asking.OPEN:
                asking = Asking.CLOSED

    def _ask_ahead(self, study: SharedStudy, pool: ThreadPoolExecutor, pending: deque[Pending], *,
                   trust_room: bool) -> Asking:
        """Ask until enough candidates compile ahead; what asking comes to. No trial is created that could not be
        evaluated, but the ask-time budget view is stale right after a fresh read found room again (`trust_room`:
        a trial of a dead worker did not count): `admit` decides then."""
        while len(pending) < max(1, self.options.compile_ahead):
            if self._out_of_time() or self._skips > MAX_SKIPS:
                return Asking.CLOSED
            if not trust_room and study.budget_taken():
                return Asking.BUDGET_SPENT
            trust_room = False
            trial, config = study.ask()
            admission = study.admit(trial, config)
            if admission is Admission.EVALUATE:
                self._skips = 0
                compiling = None if self.options.isolate else pool.submit(
                    compile_candidate, self.kernel, config, self.problem, interpret=self.device.interpret)
                pending.append(Pending(trial, config, compiling))
                continue
            study.release(trial)
            if admission is Admission.STOP:
                return Asking.BUDGET_SPENT
            self._skips += 1
        return Asking.OPEN

    def _out_of_time(self) -> bool:
        return self.options.timeout_s is not None and time.perf_counter() - self.started > self.options.timeout_s

    def _evaluate(self, candidate: Pending, seed: int, arg_sets: list[tuple]) -> tuple[TrialOutcome, float, float]:
        """The candidate's outcome, the seconds spent waiting for its compile, and those spent checking and timing
        it (with --isolate: the child process's whole life)."""
        if self.options.isolate:
            start = time.perf_counter()
            outcome = evaluate_isolated(self.kernel_name, candidate.config, self.problem, self.options, seed,
                                        interpret=self.device.interpret)
            return outcome, 0.0, time.perf_counter() - start
        return evaluate_compiling(candidate.compiling, self.problem, self.options, seed, arg_sets)


def _ranking(store: Store, key) -> Ranking | None:
    try:
        return predicted_ranking(store, key)
    except Exception:  # noqa: BLE001 - predictions only order the starts: never worth failing a search for
        return None


def winner_rank_note(ranking: Ranking | None, winner: dict | None) -> str | None:
    """Where the measured winner ranked among the predictions: every device search checks the model."""
    if ranking is None or winner is None:
        return None
    entry = ranking.rank_of(winner)
    of = f"{len(ranking.entries)} (model {ranking.model_version})"
    if entry is None:
        return f"measured winner was not among the configs predicted: 0 of {of}"
    return f"measured winner was predicted #{entry.rank} of {of}"


def search_problem(problem: Problem, *, kernel_name: str, store: Store, device: DeviceInfo,
                   options: SearchOptions, run_id: int | None = None, progress: bool = True) -> SearchResult:
    """Search one problem and store its best config; raises AllCandidatesFailed if nothing passed."""
    kernel = load_kernel(kernel_name)
    return Search(problem, kernel, kernel_name, store, device, options, run_id=run_id, progress=progress).run()
