"""Which workers of a shared study are alive: this worker's heartbeats, and failing the trials of dead ones.

Optuna's heartbeat covers a trial once it has a heartbeat row; this worker beats for every trial it asked for and has
not told yet (the first beat at once, so a death right after an ask is noticed), and every interval it fails the
running trials of other workers that stopped beating: Optuna's own check, plus trials that never got a first beat
(a worker killed between asking and beating), failed once this worker has seen them without one for the grace
period on its own clock (the hosts' clocks need not agree). Each trial failed here is handed to `on_lost`, which
records it. Nothing here counts trials toward a budget: that is `study.py`.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import optuna

from autotune import optuna_storage as adapter
from autotune.heartbeat import Heartbeat

log = logging.getLogger(__name__)
RUNNING = adapter.RUNNING


class Liveness:
    """This worker's trials in flight, beaten for, and other workers' dead trials, failed."""

    def __init__(self, storage: optuna.storages.RDBStorage, on_lost: Callable[[optuna.trial.FrozenTrial], None]):
        self.storage, self.on_lost = storage, on_lost
        self.study: optuna.Study | None = None  # set once the study is open (the storage comes first)
        self._in_flight: dict[int, optuna.Trial] = {}  # trials this worker asked for and has not told yet
        self._unbeaten_mine: set[int] = set()  # this worker's new trials, for their first heartbeat
        self._unbeaten: dict[int, float] = {}  # others' running trials seen without any heartbeat: since when
        self._lock = threading.Lock()
        self._stale_lock = threading.Lock()
        self._heartbeat = Heartbeat(adapter.heartbeat_interval(storage) or 5, self._beat_all, self._beat_new,
                                    name="trial-heartbeat")

    def start(self) -> None:
        self._heartbeat.start()

    def stop(self) -> None:
        self._heartbeat.stop()

    def track(self, trial: optuna.Trial) -> None:
        """This worker now owns the trial: the heartbeat thread beats for it at once, so a death is noticed."""
        with self._lock:
            self._in_flight[adapter.trial_id(trial)] = trial
            self._unbeaten_mine.add(adapter.trial_id(trial))
        self._heartbeat.kick()

    def untrack(self, trial: optuna.Trial) -> None:
        with self._lock:
            self._in_flight.pop(adapter.trial_id(trial), None)
            self._unbeaten_mine.discard(adapter.trial_id(trial))

    def drop_all(self) -> list[optuna.Trial]:
        """Stop beating for every trial in flight (the worker is stopping); the trials, to be told."""
        with self._lock:
            trials = list(self._in_flight.values())
            self._in_flight.clear()
            self._unbeaten_mine.clear()
        return trials

    def fail_stale(self) -> None:
        """Fail the trials of dead workers: Optuna's heartbeat check, and trials that never got a first heartbeat."""
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
                    self.on_lost(failed)

    def wait_until_settled(self, running: Callable[[], bool], out_of_time: Callable[[], bool]) -> None:
        """Wait while `running()` (other workers' trials still being evaluated), failing dead workers' trials as
        they go stale; give up when out of time."""
        interval = min(1.0, float(adapter.heartbeat_interval(self.storage) or 1))
        while True:
            self.fail_stale()
            if not running() or out_of_time():
                return
            time.sleep(interval)

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
