"""One tuning key's Optuna study shared by every worker: which trials count toward the budget, and whether an asked
config is evaluated.

Several workers (processes, hosts) may search the same key at once: they meet only in the database. A trial counts
toward `--trials` while it is being evaluated or once it was (not when it was set aside: invalid, skipped ahead of
time, a duplicate, over the budget, interrupted). A config is taken while any other counted trial holds it, running
or finished, so no config is evaluated twice. Our table's rows are `trial_table.py`; heartbeats and dead workers'
trials `liveness.py`; the starting points `starts.py`. Optuna's internals are reached only through
`autotune.optuna_storage`.
"""
from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

import optuna

from autotune import optuna_storage as adapter
from autotune.measure.evaluation import TrialOutcome
from autotune.options import DEFAULT_TRIALS, SearchOptions
from autotune.search.liveness import Liveness
from autotune.search.starts import enqueue_starts, predicted_start_count
from autotune.search.trial_table import KIND_ATTR, OUTCOME_ATTR, TrialTable, outcome_attr
from autotune.space import Space, config_text, make_sampler
from db import Store, TuningKey
from kernels import Problem

__all__ = ["Admission", "KIND_ATTR", "NOTE_ATTR", "OUTCOME_ATTR", "SharedStudy", "Standings"]
NOTE_ATTR = "note"  # user attr: a sentence for a dashboard user on a trial that was never evaluated
RUNNING = adapter.RUNNING
COMPLETE = optuna.trial.TrialState.COMPLETE
log = logging.getLogger(__name__)


class Admission(enum.Enum):
    """What becomes of an asked trial."""

    EVALUATE = "evaluate"  # its config is free and the budget has room: compile, check and time it
    SKIP = "skip"  # set aside (invalid, skipped ahead of time, a duplicate); ask again
    STOP = "stop"  # the budget was spent by earlier trials: ask no more


@dataclass(frozen=True)
class Standings:
    """What the study came to, as the end of the search (re-timing, the summary) needs it."""

    key: TuningKey
    problem: Problem
    default: object  # the kernel's default config
    top: tuple  # the fastest distinct configs of the passing trials, fastest first
    best_trial_s: float | None
    counted: int  # trials that count toward the budget
    statuses: dict  # our table's rows of the key by status
    failed: int  # of them, failures


class SharedStudy:
    """The key's study in the results database, opened (or created) for this worker. Close it when done."""

    def __init__(self, key: TuningKey, store: Store, space: Space, options: SearchOptions, *,
                 run_id: int | None = None):
        self.key, self.store, self.space, self.options, self.run_id = key, store, space, options, run_id
        self.table = TrialTable(store, key, run_id)
        self.storage = adapter.open_storage(store.url, on_stale=lambda _study, trial: self._lost(trial))
        try:
            self.study = optuna.create_study(
                study_name=key.digest(), storage=self.storage, direction="minimize", load_if_exists=True,
                sampler=make_sampler(options.sampler, options.seed),
            )
            self.study.set_user_attr("key", key.to_dict())
            self.budget = options.trials or (len(space.searchable_configs()) if options.sampler == "grid"
                                             else DEFAULT_TRIALS)
        except BaseException:
            adapter.close_storage(self.storage)
            raise
        self.liveness = Liveness(self.storage, on_lost=self._lost)
        self.liveness.study = self.study

    def close(self) -> None:
        """Stop the heartbeats and close every connection of Optuna's storage (SQLite checkpoints its log)."""
        self.liveness.stop()
        adapter.close_storage(self.storage)

    # -- which trials count

    def counted_trials(self, *, since_ask: bool = False) -> list[optuna.trial.FrozenTrial]:
        """Trials that count toward the budget: evaluated or being evaluated, not set aside.

        A trial whose worker died before choosing its config evaluated nothing and does not count. `since_ask`: use
        the trials Optuna read for the sampler at the last ask (one read less per trial; every trial numbered below
        the asked one is in it, which is what the budget check needs).
        """
        trials = adapter.trials(self.study, cached=since_ask)
        return [t for t in trials
                if KIND_ATTR not in t.user_attrs and (t.state == RUNNING or "config" in t.user_attrs)]

    def evaluated_configs(self, counted: list | None = None) -> dict[str, float | None]:
        """JSON of every config this study already evaluated, with its value (None if it failed)."""
        seen: dict[str, float | None] = {}
        for t in self.counted_trials() if counted is None else counted:
            if t.state != RUNNING and "config" in t.user_attrs:
                seen[config_text(t.user_attrs["config"])] = t.value
        return seen

    def budget_met(self) -> bool:
        """Whether the study already has its budget of counted trials, none of them running."""
        counted = self.counted_trials()
        return len(counted) >= self.budget and not any(t.state == RUNNING for t in counted)

    def budget_taken(self) -> bool:
        """Whether the budget is taken as of the last ask (no new read): checked before asking, so that a worker
        does not create a trial it may not evaluate. It can be stale in both directions; `admit` and
        `wait_for_others` read afresh."""
        return len(self.counted_trials(since_ask=True)) >= self.budget

    def best_value(self) -> float | None:
        values = [t.value for t in self.counted_trials() if t.state == COMPLETE]
        return min(values) if values else None

    def default_value(self) -> float | None:
        return self.evaluated_configs().get(config_text(self.space.default.to_dict()))

    def top_configs(self, count: int) -> list:
        """The `count` fastest distinct configs of the study's passing trials, fastest first."""
        done = sorted((t for t in self.counted_trials() if t.state == COMPLETE), key=lambda t: t.value)
        configs, seen = [], set()
        for t in done:
            text = config_text(t.user_attrs["config"])
            if text not in seen:
                seen.add(text)
                configs.append(self.space.from_dict(t.user_attrs["config"]))
            if len(configs) == count:
                break
        return configs

    def standings(self, top: int) -> Standings:
        """The study as it stands, with the `top` fastest configs (after copying in dead workers' last trials)."""
        self.reconcile()
        statuses, failed = self.table.statuses()
        return Standings(self.key, self.space.problem, self.space.default, tuple(self.top_configs(top)),
                         self.best_value(), len(self.counted_trials()), statuses, failed)

    def enqueue_starts(self, ranking=None) -> None:
        """First the default config; next the predicted fastest configs of `ranking` (a compile-only search's for
        this device kind); then the nearest tuned problem's best; for the grid, every valid config."""
        enqueue_starts(self.study, self.space, self.store, self.key, grid=self.options.sampler == "grid",
                       ranking=ranking, predicted=predicted_start_count(self.budget))

    # -- asking and telling

    def ask(self) -> tuple[optuna.Trial, object]:
        """A new trial of this worker (its heartbeats start at once) and the config the sampler chose for it."""
        trial = self.study.ask()
        self.liveness.track(trial)
        return trial, self.space.suggest(trial)

    def admit(self, trial: optuna.Trial, config) -> Admission:
        """Decide whether an asked trial is evaluated, skipped, or ends asking (the budget is spent).

        Trials that are not evaluated are told as PRUNED with a `kind` and a `note`, so that Optuna's dashboard
        does not list them as failures (a duplicate of a finished trial takes its value, or its failure)."""
        trial.set_user_attr("config", config.to_dict())
        reasons = self.space.invalid_reasons(config)
        if reasons:
            self._set_aside(trial, "invalid", "not evaluated: the config is invalid for this problem")
            self.table.record_set_aside(trial.number, config.to_dict(), "InvalidConfig", "; ".join(reasons))
            return Admission.SKIP
        skip = self.space.skip_reason(config)
        if skip is not None:  # like an invalid config: not evaluated, not counted toward the budget
            why = ("the compiler rejected it ahead of time" if skip == "rejected"
                   else "it spilled registers when compiled ahead of time (--allow-spills times it)")
            self._set_aside(trial, f"ahead_of_time_{skip}", f"not evaluated: {why}")
            source = self.space.ahead.source
            self.table.record_set_aside(
                trial.number, config.to_dict(), "RejectedAheadOfTime" if skip == "rejected" else "SpillsAheadOfTime",
                f"{why} (compile-only results for {source.device_kind}, jax {source.jax_version})")
            return Admission.SKIP
        # A fresh read, after this trial's config was written: of two trials racing for one config, at least one
        # sees the other, so the config is evaluated at most once.
        counted = self.counted_trials()
        text = config_text(config.to_dict())
        holders = [t for t in counted if t.number != trial.number and "config" in t.user_attrs
                   and config_text(t.user_attrs["config"]) == text]
        seen = self.evaluated_configs(counted)
        if text in seen:
            trial.set_user_attr(KIND_ATTR, "duplicate")
            if seen[text] is None:
                self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            else:
                self.study.tell(trial, seen[text])
            return Admission.SKIP
        if holders:  # another trial is evaluating it right now (this worker's, compiling ahead, or another's)
            self._set_aside(trial, "duplicate", f"not evaluated: trial {holders[0].number} is evaluating the same "
                                                "config")
            return Admission.SKIP
        earlier = [t for t in counted if t.number < trial.number]
        if len(earlier) >= self.budget:
            self._set_aside(trial, "over_budget", "not evaluated: the study's trial budget was already spent by "
                                                  "other workers' trials")
            return Admission.STOP
        return Admission.EVALUATE

    def _set_aside(self, trial: optuna.Trial, kind: str, note: str) -> None:
        trial.set_user_attr(KIND_ATTR, kind)
        trial.set_user_attr(NOTE_ATTR, note)
        self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)

    def record_outcome(self, trial: optuna.Trial, config, outcome: TrialOutcome, costs: dict) -> None:
        """Tell the study what an evaluated trial came to, then record it in our table.

        The study goes first and carries the whole outcome as a user attr, so a worker that dies (or loses the
        database) between the two leaves a trial that the next run's `reconcile` copies into our table. `costs`
        (seconds of the main thread's slot for this trial, of waiting for its compile and of checking and timing
        it) goes along, for benchmarks.
        """
        try:
            trial.set_user_attr(OUTCOME_ATTR, outcome_attr(outcome, costs))
            if outcome.status == "ok":
                self.study.tell(trial, outcome.time_s)
            else:
                self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            # Another worker failed it as stale (this worker stalled past the grace period) and recorded it.
            log.warning("trial %d was failed by another worker while this one evaluated it", trial.number)
            self.liveness.untrack(trial)
            return
        self.table.record(trial.number, config.to_dict(), outcome)
        self.liveness.untrack(trial)

    def release(self, trial: optuna.Trial) -> None:
        """A trial this worker told without evaluating it (skipped, or over the budget): no more heartbeats."""
        self.liveness.untrack(trial)

    def abandon(self) -> None:
        """Stopping early (Ctrl-C, a database error): this worker's unevaluated trials neither count toward the
        budget nor mark their configs as failed. Best effort: the database may be what failed."""
        for trial in self.liveness.drop_all():
            try:
                trial.set_user_attr(KIND_ATTR, "interrupted")
                trial.set_user_attr(NOTE_ATTR, "not evaluated: the worker stopped before evaluating it")
                self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            except Exception:  # noqa: BLE001 - left running, it is failed as stale later
                pass

    # -- other workers

    def fail_stale(self) -> None:
        """Fail the trials of dead workers (and record them as `WorkerLost`)."""
        self.liveness.fail_stale()

    def reconcile(self) -> None:
        """Copy into our table the finished trials it lacks (their worker died between the study and our table)."""
        self.table.reconcile([t for t in self.counted_trials() if t.state != RUNNING])

    def wait_for_others(self, out_of_time) -> bool:
        """This worker's asks ran into the budget: wait for the other workers' last trials (or their failing as
        stale), so the final pick sees every trial. True when the budget has room again (a trial did not count)."""
        self.liveness.wait_until_settled(lambda: any(t.state == RUNNING for t in self.counted_trials()), out_of_time)
        counted = self.counted_trials()
        return not any(t.state == RUNNING for t in counted) and len(counted) < self.budget

    def _lost(self, trial: optuna.trial.FrozenTrial) -> None:
        """A worker died inside this trial: record it as failed in our table too (once, whoever notices)."""
        self.table.record_finished(trial, "the worker running this trial stopped sending heartbeats (killed, "
                                          "crashed or cut off from the database)")
