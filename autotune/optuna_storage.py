"""The Optuna storage adapter: the one module that knows Optuna's internals.

Everything else speaks to Optuna through its public API or through these functions. What is private here, and why:
`trial._trial_id` (the storage's id of an asked trial, which heartbeats and state changes need), `study._get_trials`
with its cache (the trials the sampler just read, saving one database read per trial), and a raw query on Optuna's
`trial_heartbeats` table (Optuna's own stale check skips running trials that never got a heartbeat). The logging
filter and warning filters are set up when a storage is opened, not when this module is imported.
"""
from __future__ import annotations

import logging
import warnings
from typing import Any, Callable, Iterable

import optuna
from sqlalchemy import bindparam, text

from db.retry import retry
from autotune.settings import settings
from db.engine import configure_sqlite_connections

RUNNING = optuna.trial.TrialState.RUNNING
COUNTED_STATES = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL, RUNNING)
_RDB_LOGGER = "optuna.storages._rdb.storage"


def _drop_fallback_notice(record: logging.LogRecord) -> bool:
    """Optuna logs a database error it works around ("Falling back to a slower alternative") with the whole SQL
    statement; when the fallback fails too, the command ends with one clear message instead (autotune/commands)."""
    return "Falling back to a slower alternative" not in record.getMessage()


def _quiet_optuna() -> None:
    """Optuna's info logs off; heartbeats with ask-and-tell are deliberate here (we beat for in-flight trials
    ourselves), so its notices about them are silenced. Idempotent."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    logger = logging.getLogger(_RDB_LOGGER)
    if _drop_fallback_notice not in logger.filters:
        logger.addFilter(_drop_fallback_notice)


def _lost_creation_race(exc: BaseException) -> bool:
    text_ = f"{exc} {exc.__cause__}".lower()
    return "already exists" in text_ or "duplicate key" in text_ or "unique" in text_


def open_storage(url: str, on_stale: Callable | None = None) -> optuna.storages.RDBStorage:
    """Optuna's storage in the same database as ours, with heartbeats so a dead worker's trial gets failed.

    SQLite waits for other writers up to the busy timeout and syncs its log as our own connections do (db/engine.py);
    on a server, pooled connections are checked before use, so one the server dropped while it sat idle is replaced
    instead of failing the search. Workers that start on a fresh database together race to create Optuna's tables;
    the loser of that race tries again. Close it with `close_storage`.
    """
    _quiet_optuna()
    config = settings()
    sqlite = url.startswith("sqlite")
    engine_kwargs: dict[str, Any] = ({"connect_args": {"timeout": config.busy_timeout_s}} if sqlite
                                     else {"pool_pre_ping": True})
    storage = retry(
        lambda: optuna.storages.RDBStorage(
            url, engine_kwargs=engine_kwargs, heartbeat_interval=config.heartbeat_interval_s,
            grace_period=config.grace_period_s, heartbeat_stale_trial_callback=on_stale),
        attempts=6, retry_on=_lost_creation_race, delay_s=lambda attempt: 0.1 + 0.2 * attempt)
    if sqlite:
        # Optuna's many small writes per trial: synced at checkpoints like ours, not at every commit.
        configure_sqlite_connections(storage.engine, busy_timeout_s=config.busy_timeout_s, ours=False)
        storage.engine.dispose()  # the connections opened while creating the storage are replaced by configured ones
    return storage


def close_storage(storage: optuna.storages.RDBStorage | None) -> None:
    """Close every connection the storage holds, so SQLite folds its write-ahead log back into the file."""
    if storage is None:
        return
    try:
        storage.remove_session()
    finally:
        storage.engine.dispose()


def trial_id(trial: optuna.Trial | optuna.trial.FrozenTrial) -> int:
    """The storage's id of a trial (its number counts within a study; heartbeats and states go by this id)."""
    return trial._trial_id


def trials(study: optuna.Study, states: Iterable = COUNTED_STATES, *, cached: bool = False) -> list:
    """The study's trials in these states. `cached`: those Optuna read for the sampler at the last ask (one read less
    per trial; every trial numbered below the asked one is in it)."""
    read = getattr(study, "_get_trials", None)
    if cached and read is not None:
        return read(deepcopy=False, states=tuple(states), use_cache=True)
    return study.get_trials(deepcopy=False, states=tuple(states))


def fail_stale_trials(study: optuna.Study) -> None:
    """Optuna's own check: running trials whose heartbeat is older than the grace period are failed."""
    optuna.storages.fail_stale_trials(study)


def without_heartbeat(storage: optuna.storages.RDBStorage, ids: list[int]) -> set[int]:
    """Which of these trial ids have no heartbeat row at all (Optuna's check passes them over)."""
    if not ids:
        return set()
    query = text("SELECT trial_id FROM trial_heartbeats WHERE trial_id IN :ids").bindparams(
        bindparam("ids", expanding=True))
    with storage.engine.connect() as connection:
        beaten = set(connection.execute(query, {"ids": list(ids)}).scalars())
    return set(ids) - beaten


def record_heartbeat(storage: optuna.storages.RDBStorage, id_: int) -> None:
    storage.record_heartbeat(id_)


def fail_trial(storage: optuna.storages.RDBStorage, id_: int) -> optuna.trial.FrozenTrial | None:
    """Mark a running trial failed; the trial as it now is, or None if it had finished (or another worker failed
    it first)."""
    try:
        if storage.set_trial_state_values(id_, state=optuna.trial.TrialState.FAIL):
            return storage.get_trial(id_)
    except optuna.exceptions.UpdateFinishedTrialError:
        pass
    return None


def heartbeat_interval(storage: optuna.storages.RDBStorage) -> int | None:
    return storage.get_heartbeat_interval()


def grace_period(storage: optuna.storages.RDBStorage) -> float:
    return storage.grace_period


def has_optuna_tables(engine) -> bool:
    from sqlalchemy import inspect

    return inspect(engine).has_table("studies")


def existing_studies(storage: optuna.storages.RDBStorage, names: list[str]) -> list[str]:
    """Which of these study names exist in the storage."""
    found = []
    for name in names:
        try:
            storage.get_study_id_from_name(name)
            found.append(name)
        except KeyError:
            pass
    return found


def delete_study(storage: optuna.storages.RDBStorage, name: str) -> None:
    """Delete a study by name; nothing if another process deleted it meanwhile."""
    try:
        storage.delete_study(storage.get_study_id_from_name(name))
    except KeyError:
        pass
