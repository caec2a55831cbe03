"""One tuning key's Optuna study shared by every worker, kept in step with our trials table.

Several workers (processes, hosts) may search the same key at once: they meet only in the database. This module
is their bookkeeping: which trials count toward the budget, heartbeats for this worker's trials in flight, failing
the trials of workers that died (and recording them as `WorkerLost`), copying into our table the trials a worker
told the study about but died before recording (`reconcile`), and waiting for the other workers' last trials when
the budget is spent. Optuna's internals are reached only through `autotune.optuna_storage`.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict

import optuna

from autotune import optuna_storage as adapter
from autotune.measure.evaluation import TrialOutcome
from autotune.search.heartbeat import Heartbeat
from autotune.keys import shape_distance
from autotune.options import DEFAULT_TRIALS, SearchOptions
from autotune.space import Space, config_text, make_sampler
from db import Store, TuningKey

KIND_ATTR = "kind"  # user attr marking trials that do not count toward the budget: invalid, duplicate, over_budget,
#                    interrupted (the worker stopped before evaluating it)
OUTCOME_ATTR = "outcome"  # user attr: the TrialOutcome as a dict, plus "costs" (seconds of the search's own work)
NOTE_ATTR = "note"  # user attr: a sentence for a dashboard user on a trial that was never evaluated
RUNNING = adapter.RUNNING
COMPLETE = optuna.trial.TrialState.COMPLETE
log = logging.getLogger(__name__)


class SharedStudy:
    """The key's study in the results database, opened (or created) for this worker. Close it when done."""

    def __init__(self, key: TuningKey, store: Store, space: Space, options: SearchOptions, *,
                 run_id: int | None = None):
        self.key, self.store, self.space, self.options, self.run_id = key, store, space, options, run_id
        self.storage = adapter.open_storage(store.url, on_stale=self._record_stale)
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
        self._in_flight: dict[int, optuna.Trial] = {}  # trials this worker asked for and has not told yet
        self._lock = threading.Lock()
        self._stale_lock = threading.Lock()
        self._unbeaten: dict[int, float] = {}  # others' running trials seen without any heartbeat: since when
        self._unbeaten_mine: set[int] = set()  # this worker's new trials, for their first heartbeat
        self._heartbeat = Heartbeat(adapter.heartbeat_interval(self.storage) or 5, self._beat_all, self._beat_new,
                                    name="trial-heartbeat")

    def close(self) -> None:
        """Stop the heartbeats and close every connection of Optuna's storage (SQLite checkpoints its log)."""
        self._heartbeat.stop()
        adapter.close_storage(self.storage)

    # -- which trials count

    def counted_trials(self, *, since_ask: bool = False) -> list[optuna.trial.FrozenTrial]:
        """Trials that count toward the budget: evaluated or being evaluated, not invalid or duplicate.

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

    # -- starting points

    def enqueue_starts(self) -> None:
        """First the default config; next the nearest tuned problem's best; for the grid, every valid config."""
        if self.study.get_trials(deepcopy=False):
            if self.options.sampler != "grid":
                return
        else:
            self.study.enqueue_trial(self.space.params(self.space.default) or {}, skip_if_exists=True)
            warm = self.warm_start()
            if warm is not None:
                self.study.enqueue_trial(warm, skip_if_exists=True)
        if self.options.sampler == "grid":
            for config in self.space.searchable_configs():
                self.study.enqueue_trial(self.space.params(config), skip_if_exists=True)

    def warm_start(self) -> dict[str, int] | None:
        """Params of the nearest tuned problem's best config, if it is valid here."""
        try:
            neighbours = [b for b in self.store.neighbours(self.key) if b.key != self.key]
        except Exception:  # noqa: BLE001 - a warm start is a nicety
            return None
        for best in sorted(neighbours, key=lambda b: shape_distance(b.key, self.key)):
            try:
                config = self.space.from_dict(best.config)
            except (ValueError, TypeError):
                continue
            params = self.space.params(config)
            if params is not None and not self.space.invalid_reasons(config) and config != self.space.default:
                return params
        return None

    # -- asking and telling

    def ask(self) -> tuple[optuna.Trial, object]:
        """A new trial of this worker (its heartbeats start at once) and the config the sampler chose for it."""
        trial = self.study.ask()
        self._track(trial)
        return trial, self.space.suggest(trial)

    def admit(self, trial: optuna.Trial, config) -> str:
        """Decide whether an asked trial is evaluated ('go'), skipped ('skip') or ends asking ('stop').

        Trials that are not evaluated are told as PRUNED with a `kind` and a `note`, so that Optuna's dashboard
        does not list them as failures (a duplicate takes the value, or the failure, of the config it repeats)."""
        trial.set_user_attr("config", config.to_dict())
        reasons = self.space.invalid_reasons(config)
        if reasons:
            self._set_aside(trial, "invalid", "not evaluated: the config is invalid for this problem")
            self.store.add_trial(self.key, config=config.to_dict(), status="invalid", run_id=self.run_id,
                                 number=trial.number, error_class="InvalidConfig", error_message="; ".join(reasons))
            return "skip"
        skip = self.space.skip_reason(config)
        if skip is not None:  # like an invalid config: not evaluated, not counted toward the budget
            why = ("the compiler rejected it ahead of time" if skip == "rejected"
                   else "it spilled registers when compiled ahead of time (--allow-spills times it)")
            self._set_aside(trial, f"ahead_of_time_{skip}", f"not evaluated: {why}")
            source = self.space.ahead.source
            self.store.add_trial(self.key, config=config.to_dict(), status="invalid", run_id=self.run_id,
                                 number=trial.number, error_class="RejectedAheadOfTime" if skip == "rejected"
                                 else "SpillsAheadOfTime",
                                 error_message=f"{why} (compile-only results for {source.device_kind}, "
                                               f"jax {source.jax_version})")
            return "skip"
        counted = self.counted_trials(since_ask=True)
        seen = self.evaluated_configs(counted)
        previous = config_text(config.to_dict())
        if previous in seen:
            trial.set_user_attr(KIND_ATTR, "duplicate")
            if seen[previous] is None:
                self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            else:
                self.study.tell(trial, seen[previous])
            return "skip"
        earlier = [t for t in counted if t.number < trial.number]
        if len(earlier) >= self.budget:
            self._set_aside(trial, "over_budget", "not evaluated: the study's trial budget was already spent by "
                                                  "other workers' trials")
            return "stop"
        return "go"

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
            trial.set_user_attr(OUTCOME_ATTR, {**asdict(outcome), "costs": costs})
            if outcome.status == "ok":
                self.study.tell(trial, outcome.time_s)
            else:
                self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            # Another worker failed it as stale (this worker stalled past the grace period) and recorded it.
            log.warning("trial %d was failed by another worker while this one evaluated it", trial.number)
            self._untrack(trial)
            return
        self._record(trial.number, config.to_dict(), outcome)
        self._untrack(trial)

    def abandon(self) -> None:
        """Stopping early (Ctrl-C, a database error): this worker's unevaluated trials neither count toward the
        budget nor mark their configs as failed. Best effort: the database may be what failed."""
        with self._lock:
            trials = list(self._in_flight.values())
            self._in_flight.clear()
        for trial in trials:
            try:
                trial.set_user_attr(KIND_ATTR, "interrupted")
                trial.set_user_attr(NOTE_ATTR, "not evaluated: the worker stopped before evaluating it")
                self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            except Exception:  # noqa: BLE001 - left running, it is failed as stale later
                pass

    def release(self, trial: optuna.Trial) -> None:
        """A trial this worker told without evaluating it (admitted as skip or stop): no more heartbeats."""
        self._untrack(trial)

    def _record(self, number: int, config: dict, outcome: TrialOutcome) -> None:
        self.store.add_trial(
            self.key, config=config, status=outcome.status, run_id=self.run_id, number=number,
            error_class=outcome.error_class, error_message=outcome.error_message, compile_s=outcome.compile_s,
            time_s=outcome.time_s, time_spread_s=outcome.spread_s, time_count=outcome.count,
            max_error=outcome.max_error,
        )

    # -- dead workers

    def _record_stale(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """A worker died inside this trial: record it as failed in our table too (once, whoever notices)."""
        self._record_finished(trial, "the worker running this trial stopped sending heartbeats (killed, crashed "
                                     "or cut off from the database)")

    def _record_finished(self, trial: optuna.trial.FrozenTrial, lost: str, recorded: set[int] | None = None) -> None:
        """Copy a finished trial of the study into our table unless it is there: its outcome if its worker got
        that far (and the study agrees), else a `WorkerLost` failure with the message `lost`."""
        config = trial.user_attrs.get("config")
        if config is None or KIND_ATTR in trial.user_attrs:
            return  # it died before its config was chosen, or it was never to be evaluated: nothing to record
        if recorded is None:
            recorded = {row.number for row in self.store.trials(self.key)}
        if trial.number in recorded:
            return
        data = dict(trial.user_attrs.get(OUTCOME_ATTR) or {})
        data.pop("costs", None)
        complete = trial.state == COMPLETE
        if data and (data.get("status") == "ok") == complete:
            outcome = TrialOutcome(**data)
        else:
            outcome = TrialOutcome("runtime_error", error_class="WorkerLost", error_message=lost)
        self._record(trial.number, config, outcome)

    def reconcile(self) -> None:
        """Copy into our table the finished trials it lacks (their worker died between the study and our table)."""
        recorded = {row.number for row in self.store.trials(self.key)}
        for trial in self.counted_trials():
            if trial.state != RUNNING and trial.number not in recorded:
                self._record_finished(trial, "the worker running this trial stopped before recording it", recorded)

    def fail_stale(self) -> None:
        """Fail the trials of dead workers: Optuna's heartbeat check, and trials that never got a first heartbeat.

        Optuna skips a running trial without any heartbeat row; a worker killed between asking for a trial and its
        first heartbeat leaves one. Such a trial is failed once this worker has seen it without a heartbeat for the
        grace period (on its own clock, so the hosts' clocks need not agree).
        """
        with self._stale_lock:
            adapter.fail_stale_trials(self.study)
            with self._lock:
                mine = set(self._in_flight)
            others = [adapter.trial_id(t) for t in adapter.trials(self.study, (RUNNING,))]
            others = [i for i in others if i not in mine]
            if not others:
                self._unbeaten.clear()
                return
            unbeaten = adapter.without_heartbeat(self.storage, others)
            now = time.monotonic()
            self._unbeaten = {i: self._unbeaten.get(i, now) for i in others if i in unbeaten}
            grace = adapter.grace_period(self.storage)
            for id_ in others:
                since = self._unbeaten.get(id_)
                if since is None or now - since <= grace:
                    continue
                failed = adapter.fail_trial(self.storage, id_)
                if failed is not None:
                    self._record_stale(self.study, failed)

    def wait_for_others(self, out_of_time) -> bool:
        """This worker's asks ran into the budget: wait for the other workers' last trials (or their failing as
        stale), so the final pick sees every trial. True when the budget has room again (a trial did not count)."""
        interval = min(1.0, float(adapter.heartbeat_interval(self.storage) or 1))
        while True:
            self.fail_stale()
            counted = self.counted_trials()
            if not any(t.state == RUNNING for t in counted):
                return len(counted) < self.budget
            if out_of_time():
                return False
            time.sleep(interval)

    # -- heartbeats of this worker's trials

    def start_heartbeats(self) -> None:
        self._heartbeat.start()

    def stop_heartbeats(self) -> None:
        self._heartbeat.stop()

    def _track(self, trial: optuna.Trial) -> None:
        """This worker now owns the trial: the heartbeat thread beats for it at once, so a death is noticed.

        (A worker killed before that first beat leaves a trial without any; `fail_stale` handles those.)"""
        with self._lock:
            self._in_flight[adapter.trial_id(trial)] = trial
            self._unbeaten_mine.add(adapter.trial_id(trial))
        self._heartbeat.kick()

    def _untrack(self, trial: optuna.Trial) -> None:
        with self._lock:
            self._in_flight.pop(adapter.trial_id(trial), None)
            self._unbeaten_mine.discard(adapter.trial_id(trial))

    def _beat(self, ids: list[int]) -> None:
        for id_ in ids:
            try:
                adapter.record_heartbeat(self.storage, id_)
            except Exception:  # noqa: BLE001 - a missed beat only risks a stale mark later
                pass

    def _beat_new(self) -> None:
        with self._lock:
            ids = list(self._unbeaten_mine)
            self._unbeaten_mine.clear()
        self._beat(ids)

    def _beat_all(self) -> None:
        """Every interval: beat for every trial in flight, then fail other workers' stale trials."""
        with self._lock:
            ids = list(self._in_flight)
            self._unbeaten_mine.clear()
        self._beat(ids)
        try:
            self.fail_stale()
        except Exception:  # noqa: BLE001 - the next round, or the next worker, tries again
            log.debug("checking for stale trials failed", exc_info=True)
