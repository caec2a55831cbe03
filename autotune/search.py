"""The search: one Optuna study per tuning key, every candidate checked, timed and recorded.

The study lives in Optuna's own tables of the results database, named by the key's digest, so a search that is
stopped resumes where it was and several workers can share it. `--trials` is the study's total budget over all
workers and all resumptions. Every trial being evaluated carries a heartbeat; a worker that dies in the middle of one
(SIGKILL, a candidate that crashes the process, a lost machine) leaves a trial that whichever worker looks next
fails and records as `WorkerLost` (its config counts as failed: it may be what killed the worker), and a worker
whose asks run into the budget waits for the other workers' last trials, so that each picks its best from every
trial of the study. Candidates are compiled ahead in background threads while the main thread checks and times the
previous one. The default config is always the first trial and takes part in the final interleaved
re-timing, so the stored best is never slower than the default.
"""
from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor, TimeoutError as FutureTimeout
from dataclasses import asdict, dataclass, field
from types import ModuleType
from typing import Any, Callable

import warnings

import optuna
from sqlalchemy import bindparam, text

from autotune.candidate import compile_candidate
from autotune.checking import check_candidate
from autotune.device import DeviceInfo
from autotune.inputs import random_qkv, random_segment_ids
from autotune.keys import make_key, shape_distance
from autotune.timing import Timer, Timing, TimingPolicy, time_interleaved
from autotune.workers import settings as worker_settings
from db import Store, TuningKey
from kernels import Problem

SAMPLERS = ("tpe", "random", "grid", "cmaes")

optuna.logging.set_verbosity(optuna.logging.WARNING)
# Heartbeats with ask-and-tell are deliberate here (we beat for in-flight trials ourselves): silence the notices.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
KIND_ATTR = "kind"  # user attr marking trials that do not count toward the budget: invalid, duplicate, over_budget,
#                    interrupted (the worker stopped before evaluating it)
OUTCOME_ATTR = "outcome"  # user attr: the TrialOutcome as a dict, plus "costs" (seconds of the search's own work)
RUNNING = optuna.trial.TrialState.RUNNING
log = logging.getLogger(__name__)


def _drop_fallback_notice(record: logging.LogRecord) -> bool:
    """Optuna logs a database error it works around ("Falling back to a slower alternative") with the whole SQL
    statement; when the fallback fails too, the command ends with one clear message instead (autotune/cli.py)."""
    return "Falling back to a slower alternative" not in record.getMessage()


logging.getLogger("optuna.storages._rdb.storage").addFilter(_drop_fallback_notice)


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
    compare_xla: bool = True

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        for name in ("trials", "patience"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise ValueError(f"timeout must be positive seconds, got {self.timeout_s!r}")


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


@dataclass(frozen=True)
class SearchResult:
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

    @property
    def speedup(self) -> float | None:
        if self.best_time_s and self.default_time_s:
            return self.default_time_s / self.best_time_s
        return None


class AllCandidatesFailed(RuntimeError):
    """Every candidate of a problem failed: nothing could be stored."""


# ---------------------------------------------------------------- the space


class Space:
    """The kernel's tunable fields for one problem, as Optuna integer indices into each field's sorted choices."""

    def __init__(self, kernel: ModuleType, problem: Problem, device_kind: str | None):
        self.kernel, self.problem, self.device_kind = kernel, problem, device_kind
        self.default = kernel.Config.default(problem)
        self.choices = {name: tuple(sorted(set(values))) for name, values in kernel.search_space(problem).items()}

    def config(self, params: dict[str, int]):
        values = {name: self.choices[name][index] for name, index in params.items()}
        return type(self.default).from_dict({**self.default.to_dict(), **values})

    def params(self, config) -> dict[str, int] | None:
        """Indices of a config's values, or None if one is not among the choices."""
        data = config.to_dict()
        try:
            return {name: self.choices[name].index(data[name]) for name in self.choices}
        except ValueError:
            return None

    def suggest(self, trial: optuna.Trial):
        return self.config({name: trial.suggest_int(name, 0, len(vals) - 1) for name, vals in self.choices.items()})

    def invalid_reasons(self, config) -> list[str]:
        return list(self.kernel.invalid_reasons(config, self.problem, device_kind=self.device_kind))

    def valid_configs(self) -> list:
        """Every valid config of the space (the grid)."""
        names = list(self.choices)
        configs = []
        for combo in itertools.product(*(range(len(self.choices[n])) for n in names)):
            config = self.config(dict(zip(names, combo)))
            if not self.invalid_reasons(config):
                configs.append(config)
        return configs


def make_sampler(name: str, seed: int | None) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True, n_startup_trials=8, multivariate=True)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)  # random, and grid (whose configs are all enqueued)


def optuna_storage(store: Store, on_stale: Callable | None = None) -> optuna.storages.RDBStorage:
    """Optuna's storage in the same database as ours, with heartbeats so a dead worker's trial gets failed.

    SQLite waits for other writers up to the busy timeout; on a server, pooled connections are checked before use,
    so one the server dropped while it sat idle is replaced instead of failing the search. Workers that start on a
    fresh database together race to create Optuna's tables; the loser of that race tries again.
    """
    config = worker_settings()
    engine_kwargs: dict[str, Any] = {}
    if store.url.startswith("sqlite"):
        engine_kwargs["connect_args"] = {"timeout": config.busy_timeout_s}
    else:
        engine_kwargs["pool_pre_ping"] = True
    for attempt in range(6):
        try:
            storage = optuna.storages.RDBStorage(
                store.url, engine_kwargs=engine_kwargs, heartbeat_interval=config.heartbeat_interval_s,
                grace_period=config.grace_period_s, heartbeat_stale_trial_callback=on_stale,
            )
            break
        except Exception as exc:  # noqa: BLE001 - only a lost table-creation race is retried
            text_ = f"{exc} {exc.__cause__}".lower()
            if attempt == 5 or not ("already exists" in text_ or "duplicate key" in text_ or "unique" in text_):
                raise
            time.sleep(0.1 + 0.2 * attempt)
    if store.url.startswith("sqlite"):
        _sync_like_our_tables(storage.engine)
    return storage


def _sync_like_our_tables(engine) -> None:
    """Optuna's SQLite connections sync the write-ahead log as our own do (db/engine.py): at checkpoints, not at
    every commit. A killed process loses nothing; a power cut may lose the last commits, never consistency. It
    makes Optuna's many small writes per trial several times cheaper."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA synchronous = NORMAL")
        finally:
            cursor.close()

    engine.dispose()  # the connections opened while creating the storage are replaced by configured ones


# ---------------------------------------------------------------- evaluating one candidate


def classify_error(exc: BaseException, stage: str) -> str:
    text = f"{type(exc).__name__}: {exc}".lower()
    if "resource_exhausted" in text or "out of memory" in text or "shared memory" in text:
        return "resource_exhausted"
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
        args = (q, k, v, *(ids or (None, None)))
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


# ---------------------------------------------------------------- the search loop


class Search:
    """One problem's search, from asking Optuna for candidates to storing the best."""

    def __init__(self, problem: Problem, kernel: ModuleType, kernel_name: str, store: Store, device: DeviceInfo,
                 options: SearchOptions, *, run_id: int | None = None, progress: bool = True):
        self.problem, self.kernel, self.kernel_name, self.store = problem, kernel, kernel_name, store
        self.device, self.options, self.run_id, self.progress = device, options, run_id, progress
        self.key = make_key(kernel, problem, device)
        self.space = Space(kernel, problem, None if device.interpret else device.device_kind)
        if self.space.invalid_reasons(self.space.default):
            raise ValueError(f"the kernel's default config is invalid for {problem}: "
                             f"{self.space.invalid_reasons(self.space.default)}")
        self.storage = optuna_storage(store, on_stale=self._record_stale)
        self.study = optuna.create_study(
            study_name=self.key.digest(), storage=self.storage, direction="minimize", load_if_exists=True,
            sampler=make_sampler(options.sampler, options.seed),
        )
        self.study.set_user_attr("key", self.key.to_dict())
        self.budget = options.trials or (len(self.space.valid_configs()) if options.sampler == "grid" else 30)
        self._in_flight: dict[int, optuna.Trial] = {}  # trials this worker asked for and has not told yet
        self._lock = threading.Lock()
        self._stale_lock = threading.Lock()
        self._unbeaten: dict[int, float] = {}  # others' running trials seen without any heartbeat: since when
        self._unbeaten_mine: set[int] = set()  # this worker's new trials, for their first heartbeat
        self._kick = threading.Event()  # wakes the heartbeat thread for a new trial, or to stop

    # -- bookkeeping on the study

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
        complete = trial.state == optuna.trial.TrialState.COMPLETE
        if data and (data.get("status") == "ok") == complete:
            outcome = TrialOutcome(**data)
        else:
            outcome = TrialOutcome("runtime_error", error_class="WorkerLost", error_message=lost)
        self._record(trial.number, config, outcome)

    def _reconcile(self) -> None:
        """Copy into our table the finished trials it lacks (their worker died between the study and our table)."""
        recorded = {row.number for row in self.store.trials(self.key)}
        for trial in self.counted_trials():
            if trial.state != RUNNING and trial.number not in recorded:
                self._record_finished(trial, "the worker running this trial stopped before recording it", recorded)

    def _fail_stale(self) -> None:
        """Fail the trials of dead workers: Optuna's heartbeat check, and trials that never got a first heartbeat.

        Optuna skips a running trial without any heartbeat row; a worker killed between asking for a trial and its
        first heartbeat leaves one. Such a trial is failed once this worker has seen it without a heartbeat for the
        grace period (on its own clock, so the hosts' clocks need not agree).
        """
        with self._stale_lock:
            optuna.storages.fail_stale_trials(self.study)
            with self._lock:
                mine = set(self._in_flight)
            others = [t for t in self.study.get_trials(deepcopy=False, states=(RUNNING,)) if t._trial_id not in mine]
            if not others:
                self._unbeaten.clear()
                return
            query = text("SELECT trial_id FROM trial_heartbeats WHERE trial_id IN :ids").bindparams(
                bindparam("ids", expanding=True))
            with self.store.engine.connect() as connection:
                beaten = set(connection.execute(query, {"ids": [t._trial_id for t in others]}).scalars())
            now = time.monotonic()
            self._unbeaten = {t._trial_id: self._unbeaten.get(t._trial_id, now) for t in others
                              if t._trial_id not in beaten}
            for trial in others:
                since = self._unbeaten.get(trial._trial_id)
                if since is None or now - since <= self.storage.grace_period:
                    continue
                try:
                    if self.storage.set_trial_state_values(trial._trial_id, state=optuna.trial.TrialState.FAIL):
                        self._record_stale(self.study, self.storage.get_trial(trial._trial_id))
                except optuna.exceptions.UpdateFinishedTrialError:
                    pass  # it finished, or another worker failed it first

    def counted_trials(self, *, since_ask: bool = False) -> list[optuna.trial.FrozenTrial]:
        """Trials that count toward the budget: evaluated or being evaluated, not invalid or duplicate.

        A trial whose worker died before choosing its config evaluated nothing and does not count. `since_ask`: use
        the trials Optuna read for the sampler after the last ask created its trial (one read less per trial;
        every trial numbered below the asked one is in it, which is what the budget check needs).
        """
        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL, RUNNING)
        read = getattr(self.study, "_get_trials", None)
        if since_ask and read is not None:
            trials = read(deepcopy=False, states=states, use_cache=True)
        else:
            trials = self.study.get_trials(deepcopy=False, states=states)
        return [t for t in trials
                if KIND_ATTR not in t.user_attrs and (t.state == RUNNING or "config" in t.user_attrs)]

    def evaluated_configs(self, counted: list | None = None) -> dict[str, float | None]:
        """JSON of every config this study already evaluated, with its value (None if it failed)."""
        seen: dict[str, float | None] = {}
        for t in self.counted_trials() if counted is None else counted:
            if t.state != optuna.trial.TrialState.RUNNING and "config" in t.user_attrs:
                seen[json.dumps(t.user_attrs["config"], sort_keys=True)] = t.value
        return seen

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
            for config in self.space.valid_configs():
                params = self.space.params(config)
                self.study.enqueue_trial(params, skip_if_exists=True)

    def warm_start(self) -> dict[str, int] | None:
        """Params of the nearest tuned problem's best config, if it is valid here."""
        try:
            neighbours = [b for b in self.store.neighbours(self.key) if b.key != self.key]
        except Exception:  # noqa: BLE001 - a warm start is a nicety
            return None
        for best in sorted(neighbours, key=lambda b: shape_distance(b.key, self.key)):
            try:
                config = type(self.space.default).from_dict(best.config)
            except (ValueError, TypeError):
                continue
            params = self.space.params(config)
            if params is not None and not self.space.invalid_reasons(config) and config != self.space.default:
                return params
        return None

    def _heartbeat_loop(self, stop: threading.Event) -> None:
        """Beat for this worker's trials in flight every interval, and for a new one at once (off the main thread,
        which is told by `_track`); each interval, also fail other workers' stale trials."""
        interval = self.storage.get_heartbeat_interval() or 5
        next_check = time.monotonic() + interval
        while True:
            self._kick.wait(max(0.0, next_check - time.monotonic()))
            self._kick.clear()
            if stop.is_set():
                return
            with self._lock:
                ids = list(self._in_flight) if time.monotonic() >= next_check else list(self._unbeaten_mine)
                self._unbeaten_mine.clear()
            for trial_id in ids:
                try:
                    self.storage.record_heartbeat(trial_id)
                except Exception:  # noqa: BLE001 - a missed beat only risks a stale mark later
                    pass
            if time.monotonic() < next_check:
                continue
            next_check = time.monotonic() + interval
            try:
                self._fail_stale()
            except Exception:  # noqa: BLE001 - the next round, or the next worker, tries again
                log.debug("checking for stale trials failed", exc_info=True)

    def _track(self, trial: optuna.Trial) -> None:
        """This worker now owns the trial: the heartbeat thread beats for it at once, so a death is noticed.

        (A worker killed before that first beat leaves a trial without any; `_fail_stale` handles those.)"""
        with self._lock:
            self._in_flight[trial._trial_id] = trial
            self._unbeaten_mine.add(trial._trial_id)
        self._kick.set()

    def _untrack(self, trial: optuna.Trial) -> None:
        with self._lock:
            self._in_flight.pop(trial._trial_id, None)
            self._unbeaten_mine.discard(trial._trial_id)

    def _wait_for_others(self, started: float) -> bool:
        """This worker's asks ran into the budget: wait for the other workers' last trials (or their failing as
        stale), so the final pick sees every trial. True when the budget has room again (a trial did not count)."""
        interval = min(1.0, float(self.storage.get_heartbeat_interval() or 1))
        while True:
            self._fail_stale()
            counted = self.counted_trials()
            if not any(t.state == RUNNING for t in counted):
                return len(counted) < self.budget
            if self._out_of_time(started):
                return False
            time.sleep(interval)

    # -- the loop

    def run(self) -> SearchResult:
        started = time.perf_counter()
        self._fail_stale()
        self._reconcile()
        self.enqueue_starts()
        seed = self.options.seed if self.options.seed is not None else int(time.time()) % 100000
        arg_sets = timing_inputs(self.problem, self.options, seed)
        stop_beats = threading.Event()
        beats = threading.Thread(target=self._heartbeat_loop, args=(stop_beats,), daemon=True)
        beats.start()
        bar = _progress_bar(self.budget, self.problem, enabled=self.progress)
        bar.update(len(self.counted_trials()))
        pool = ThreadPoolExecutor(max_workers=max(1, self.options.compile_ahead), thread_name_prefix="compile")
        pending: deque = deque()
        best = self._best_so_far()
        default_time = self._default_value()
        since_best = 0
        skips = 0
        asking, budget_spent = True, False
        slot_start = time.perf_counter()  # the main thread's time is cut into one slot per evaluated trial
        try:
            while True:
                while asking and len(pending) < max(1, self.options.compile_ahead):
                    if self._out_of_time(started) or skips > 200:
                        asking = False
                        break
                    trial = self.study.ask()
                    self._track(trial)
                    config = self.space.suggest(trial)
                    verdict = self._admit(trial, config)
                    if verdict == "go":
                        skips = 0
                        future = None if self.options.isolate else pool.submit(
                            compile_candidate, self.kernel, config, self.problem, interpret=self.device.interpret)
                        pending.append((trial, config, future))
                        continue
                    self._untrack(trial)
                    if verdict == "stop":
                        asking, budget_spent = False, True
                    else:
                        skips += 1
                if not pending:
                    if budget_spent and self._wait_for_others(started):
                        asking, budget_spent = True, False  # a trial of another worker did not count after all
                        continue
                    break
                trial, config, future = pending[0]
                outcome, wait_s, measure_s = self._outcome(config, future, seed + trial.number, arg_sets)
                now = time.perf_counter()
                costs = {"slot_s": now - slot_start, "compile_wait_s": wait_s, "measure_s": measure_s,
                         "isolated": self.options.isolate}
                slot_start = now
                self._finish(trial, config, outcome, costs)
                pending.popleft()
                self._untrack(trial)
                if outcome.status == "ok":
                    if config == self.space.default:
                        default_time = outcome.time_s
                    if best is None or outcome.time_s < best:
                        best, since_best = outcome.time_s, 0
                    else:
                        since_best += 1
                else:
                    since_best += 1
                bar.update(1)
                bar.set_postfix_str(_postfix(best, default_time), refresh=False)
                if self.options.patience and since_best >= self.options.patience:
                    asking = False
        except BaseException:
            self._abandon()
            raise
        finally:
            stop_beats.set()
            self._kick.set()
            bar.close()
            pool.shutdown(wait=False, cancel_futures=True)
        return self.finish(started, arg_sets)

    def _abandon(self) -> None:
        """Stopping early (Ctrl-C, a database error): this worker's unevaluated trials neither count toward the
        budget nor mark their configs as failed. Best effort: the database may be what failed."""
        with self._lock:
            trials = list(self._in_flight.values())
            self._in_flight.clear()
        for trial in trials:
            try:
                trial.set_user_attr(KIND_ATTR, "interrupted")
                self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            except Exception:  # noqa: BLE001 - left running, it is failed as stale later
                pass

    def _out_of_time(self, started: float) -> bool:
        return self.options.timeout_s is not None and time.perf_counter() - started > self.options.timeout_s

    def _admit(self, trial: optuna.Trial, config) -> str:
        """Decide whether an asked trial is evaluated ('go'), skipped ('skip') or ends asking ('stop')."""
        trial.set_user_attr("config", config.to_dict())
        reasons = self.space.invalid_reasons(config)
        if reasons:
            trial.set_user_attr(KIND_ATTR, "invalid")
            self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            self.store.add_trial(self.key, config=config.to_dict(), status="invalid", run_id=self.run_id,
                                 number=trial.number, error_class="InvalidConfig", error_message="; ".join(reasons))
            return "skip"
        counted = self.counted_trials(since_ask=True)
        seen = self.evaluated_configs(counted)
        previous = json.dumps(config.to_dict(), sort_keys=True)
        if previous in seen:
            trial.set_user_attr(KIND_ATTR, "duplicate")
            if seen[previous] is None:
                self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            else:
                self.study.tell(trial, seen[previous])
            return "skip"
        earlier = [t for t in counted if t.number < trial.number]
        if len(earlier) >= self.budget:
            trial.set_user_attr(KIND_ATTR, "over_budget")
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            return "stop"
        return "go"

    def _outcome(self, config, future, seed: int, arg_sets: list[tuple]) -> tuple[TrialOutcome, float, float]:
        """The candidate's outcome, the seconds spent waiting for its compile, and those spent checking and timing
        it (with --isolate: the child process's whole life)."""
        start = time.perf_counter()
        if self.options.isolate:
            from autotune.isolation import evaluate_isolated

            outcome = evaluate_isolated(self.kernel_name, config, self.problem, self.options, seed,
                                        interpret=self.device.interpret)
            return outcome, 0.0, time.perf_counter() - start
        try:
            compiled = future.result(timeout=self.options.trial_timeout_s)
        except FutureTimeout:
            return (TrialOutcome("timeout", error_class="Timeout",
                                 error_message=f"compiling took longer than {self.options.trial_timeout_s} s"),
                    time.perf_counter() - start, 0.0)
        except Exception as exc:  # noqa: BLE001
            return failure("compile", exc), time.perf_counter() - start, 0.0
        compiled_at = time.perf_counter()
        outcome = evaluate(compiled.call, compiled.compile_s, self.problem, self.options, seed, arg_sets)
        return outcome, compiled_at - start, time.perf_counter() - compiled_at

    def _finish(self, trial: optuna.Trial, config, outcome: TrialOutcome, costs: dict) -> None:
        """Record the outcome in the study, then in our table.

        The study goes first and carries the whole outcome as a user attr, so a worker that dies (or loses the
        database) between the two leaves a trial that the next run's `_reconcile` copies into our table. `costs`
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
            return
        self._record(trial.number, config.to_dict(), outcome)

    def _record(self, number: int, config: dict, outcome: TrialOutcome) -> None:
        self.store.add_trial(
            self.key, config=config, status=outcome.status, run_id=self.run_id, number=number,
            error_class=outcome.error_class, error_message=outcome.error_message, compile_s=outcome.compile_s,
            time_s=outcome.time_s, time_spread_s=outcome.spread_s, time_count=outcome.count,
            max_error=outcome.max_error,
        )

    def _best_so_far(self) -> float | None:
        values = [t.value for t in self.counted_trials() if t.state == optuna.trial.TrialState.COMPLETE]
        return min(values) if values else None

    def _default_value(self) -> float | None:
        return self.evaluated_configs().get(json.dumps(self.space.default.to_dict(), sort_keys=True))

    # -- the end: re-time the top few with the default, store the winner

    def top_configs(self) -> list:
        done = [t for t in self.counted_trials() if t.state == optuna.trial.TrialState.COMPLETE]
        done.sort(key=lambda t: t.value)
        configs, seen = [], set()
        for t in done:
            text = json.dumps(t.user_attrs["config"], sort_keys=True)
            if text not in seen:
                seen.add(text)
                configs.append(type(self.space.default).from_dict(t.user_attrs["config"]))
            if len(configs) == self.options.retime_top:
                break
        return configs

    def finish(self, started: float, arg_sets: list[tuple]) -> SearchResult:
        self._reconcile()  # trials of workers that died between telling Optuna and recording them
        counted = self.counted_trials()
        statuses: dict[str, int] = {}
        for row in self.store.trials(self.key):
            statuses[row.status] = statuses.get(row.status, 0) + 1
        failed = sum(n for s, n in statuses.items() if s not in ("ok", "invalid"))
        top = self.top_configs()
        if not top:
            raise AllCandidatesFailed(
                f"every candidate failed for {self.problem} ({failed} failed: "
                + ", ".join(f"{n} {s}" for s, n in sorted(statuses.items())) + ")"
            )
        contenders = {json.dumps(c.to_dict(), sort_keys=True): c for c in [*top, self.space.default]}
        calls = {}
        for name, config in contenders.items():
            try:
                calls[name] = compile_candidate(self.kernel, config, self.problem, interpret=self.device.interpret).call
            except Exception:  # noqa: BLE001 - the default may fail to compile on odd hardware
                continue
        if self.options.compare_xla:
            from autotune.baselines import xla_attention_call

            calls["xla"] = xla_attention_call(self.problem)
        timings = time_interleaved(calls, arg_sets, self.options.timing)
        xla = timings.pop("xla", None)
        default_name = json.dumps(self.space.default.to_dict(), sort_keys=True)
        default_time = timings[default_name].median_s if default_name in timings else None
        winner = min(timings, key=lambda n: timings[n].median_s)
        best_config = contenders[winner].to_dict()
        stored = self.store.put_best(self.key, config=best_config, time_s=timings[winner].median_s,
                                     default_time_s=default_time, trials=len(counted), run_id=self.run_id)
        self.store.clear_miss(self.key)
        return SearchResult(self.key, self.problem, best_config, timings[winner].median_s, default_time,
                            xla.median_s if xla else None, len(counted), failed, statuses,
                            time.perf_counter() - started, stored)


def _postfix(best: float | None, default: float | None) -> str:
    if best is None:
        return "best -"
    text = f"best {best * 1e3:.3f} ms"
    return text + (f" ({default / best:.2f}x default)" if default else "")


def _progress_bar(total: int, problem: Problem, *, enabled: bool):
    from tqdm import tqdm

    label = f"b{problem.batch} q{problem.q_len} kv{problem.kv_len} h{problem.heads}/{problem.kv_heads} d{problem.head_dim}"
    return tqdm(total=total, desc=label, unit="trial", disable=not enabled, leave=True, dynamic_ncols=True)


def search_problem(problem: Problem, *, kernel_name: str, store: Store, device: DeviceInfo,
                   options: SearchOptions, run_id: int | None = None, progress: bool = True) -> SearchResult:
    """Search one problem and store its best config; raises AllCandidatesFailed if nothing passed."""
    from autotune.kernels_registry import load_kernel

    kernel = load_kernel(kernel_name)
    return Search(problem, kernel, kernel_name, store, device, options, run_id=run_id, progress=progress).run()
