"""`Store`: the one object the search, the runtime and the CLI use to read and write results.

Every write is one short transaction, retried when it loses a race to another process (a unique-key collision when
two workers create the same key row, or a deadlock on PostgreSQL), so many workers can share one SQLite file or one
PostgreSQL database. "Keep the faster" lives in `db.bests`, run liveness in `db.runs`, how a database is opened
(for writing, only if it exists, or read-only) in `db.opening`.
"""
from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, Engine, delete, select, text, update
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session

from db import claims, runs
from db.bests import best_record, key_row_id, offer_best, require_run
from db.errors import DatabaseError
from db.figures import check_figures, is_config_object, readable_figures
from db.integrity import find_problems
from db.opening import open_engine
from db.pruning import prune_keys
from db.retry import retry
from db.records import (KERNEL_IMPLEMENTATION, RUN_STATUSES, TRIAL_STATUSES, BestOffer, BestRecord, ConfigCheck,
                        MissRecord, RunRecord, TrialRecord, TuningKey)
from db.schema import FAMILY_COLUMNS, BestRow, KeyRow, MissRow, RunRow, TrialRow
from db.urls import default_url, display_url, resolve_url
from db.validation import (check_choice, check_datetime, check_error_size, check_int, check_json_object,
                           check_name, check_text, check_time, clean_text, utc_now)

log = logging.getLogger(__name__)
T = TypeVar("T")

_ATTEMPTS = 8
_RETRY_SQLSTATES = {"40001", "40P01"}  # PostgreSQL serialization failure, deadlock


def _lost_race(exc: BaseException) -> bool:
    """A write that lost a race to another writer (a racing insert, a serialization failure): worth trying again."""
    lost = isinstance(exc, IntegrityError) or (isinstance(exc, DBAPIError)
                                                and getattr(exc.orig, "sqlstate", None) in _RETRY_SQLSTATES)
    if lost:
        log.debug("retrying a write that lost a race: %s", getattr(exc, "orig", exc))
    return lost
_NO_SYNC = {"synchronize_session": False}
_FINAL_RUN_STATUSES = tuple(status for status in RUN_STATUSES if status != "running")


_MERGE_LOCK = 0x6175746F  # 'auto': the advisory lock that serialises bulk merges of bests
MAX_REASON = 500  # characters of a miss's reason that are kept


class Store:
    """The results database at `url` (default: `default_url()`).

    By default its tables are created or upgraded on open. `create=False` refuses (without writing) a database that
    holds no results yet; `read_only=True` never writes at all and works on read-only storage; `read_only=None`
    is read-only only where the storage cannot be written (the runtime: it records misses where it can).
    """

    def __init__(self, url: str | os.PathLike[str] | None = None, *, busy_timeout_s: float = 30.0,
                 create: bool = True, read_only: bool | None = False) -> None:
        self.url: str = default_url() if url is None else resolve_url(url)
        self._where = display_url(self.url)
        self.engine: Engine
        self.notice: str | None  # to show once: e.g. an older database read as it is (read-only storage)
        self.engine, self.read_only, self.notice = open_engine(
            self.url, self._where, busy_timeout_s=busy_timeout_s, create=create and not read_only,
            read_only=read_only)

    @property
    def where(self) -> str:
        """The database for messages: an SQLite file's path, or the URL with its password hidden."""
        return self._where

    def __repr__(self) -> str:
        return f"Store({self._where!r})"

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every pooled connection (SQLite then folds its WAL back into the file)."""
        self.engine.dispose()

    # -- plumbing -------------------------------------------------------------------------------------------------

    @contextmanager
    def _reading(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as session:
            yield session

    def _write(self, work: Callable[[Session], T]) -> T:
        """Run `work` in one transaction, retrying it when it lost a race to another writer."""
        if self.read_only:
            raise DatabaseError(f"the results database {self._where} was opened read-only; nothing was written")
        def once() -> T:
            with Session(self.engine, expire_on_commit=False) as session, session.begin():
                return work(session)

        try:
            return retry(once, attempts=_ATTEMPTS, retry_on=_lost_race,
                         delay_s=lambda attempt: random.uniform(0.0, 0.002 * 2 ** attempt))
        except OperationalError as exc:
            if "database is locked" in str(exc.orig):
                raise DatabaseError(f"the results database {self._where} stayed locked by another process "
                                    f"for longer than the busy timeout") from exc
            raise

    # -- runs -----------------------------------------------------------------------------------------------------

    def start_run(self, *, host: str, device_kind: str, platform: str, jax_version: str,
                  arguments: dict[str, Any]) -> int:
        """Record the start of a search run; returns its id (for trials, bests and `finish_run`)."""
        values = dict(host=check_name("host", host), device_kind=check_name("device_kind", device_kind),
                      platform=check_name("platform", platform), jax_version=check_name("jax_version", jax_version),
                      arguments=check_json_object("arguments", arguments))
        return self._write(lambda session: runs.start(session, values, utc_now()))

    def heartbeat_run(self, run_id: int) -> bool:
        """Show the run is alive (call it more often than `mark_crashed_runs`' limit); False once it is not running."""
        run_id = check_int("run_id", run_id)
        return self._write(lambda session: runs.beat(session, run_id, utc_now()))

    def finish_run(self, run_id: int, status: str, message: str = "") -> None:
        """Record how a run ended (also after it was marked crashed: a run that was only stalled says so itself)."""
        check_choice("status", status, _FINAL_RUN_STATUSES)
        check_text("message", message, allow_empty=True)
        self._write(lambda session: runs.finish(session, run_id, status, message, utc_now()))

    def mark_crashed_runs(self, stale_after_s: float) -> list[int]:
        """Mark `crashed` the running runs with no heartbeat for `stale_after_s` seconds; returns their ids."""
        stale = check_time("stale_after_s", stale_after_s, positive=True)
        return self._write(lambda session: runs.mark_crashed(session, stale, utc_now()))

    def runs(self) -> list[RunRecord]:
        """All runs, oldest first."""
        with self._reading() as session:
            return [runs.run_record(row) for row in session.scalars(select(RunRow).order_by(RunRow.id))]

    # -- trials ---------------------------------------------------------------------------------------------------

    def add_trial(self, key: TuningKey, *, config: dict[str, Any], status: str, run_id: int | None = None,
                  number: int | None = None, error_class: str | None = None, error_message: str | None = None,
                  compile_s: float | None = None, time_s: float | None = None, time_spread_s: float | None = None,
                  time_count: int | None = None, max_error: float | None = None,
                  figures: dict[str, Any] | None = None) -> int:
        """Record one trial; returns its id. Times must be finite and >= 0; a NaN `max_error` is stored as +inf.
        `figures`: what the compiler said of a compile-only trial (db.figures' schema)."""
        values = dict(
            config=check_json_object("config", config), status=check_choice("status", status, TRIAL_STATUSES),
            run_id=check_int("run_id", run_id, optional=True), number=check_int("number", number, optional=True),
            error_class=check_text("error_class", error_class, optional=True, allow_empty=True),
            error_message=check_text("error_message", error_message, optional=True, allow_empty=True),
            compile_s=check_time("compile_s", compile_s, optional=True),
            time_s=check_time("time_s", time_s, optional=True, positive=True),
            time_spread_s=check_time("time_spread_s", time_spread_s, optional=True),
            time_count=check_int("time_count", time_count, optional=True, minimum=0),
            max_error=check_error_size("max_error", max_error),
            figures=None if figures is None else check_figures(figures))

        def work(session: Session) -> int:
            require_run(session, values["run_id"])
            row = TrialRow(key_id=key_row_id(session, key), created_at=utc_now(), **values)
            session.add(row)
            session.flush()
            return row.id

        return self._write(work)

    def trials(self, key: TuningKey | None = None) -> list[TrialRecord]:
        """All trials (of one key if given), in the order they were added."""
        query = select(TrialRow, KeyRow).join(KeyRow, KeyRow.id == TrialRow.key_id).order_by(TrialRow.id)
        if key is not None:
            query = query.where(KeyRow.digest == key.digest())
        with self._reading() as session:
            return [record for trial, key_row in session.execute(query)
                    if (key := _key(key_row)) is not None and (record := _trial_record(trial, key)) is not None]

    def keys(self, *, platform: str | None = None, kernel: str | None = None, kernel_version: str | None = None,
             device_kind: str | None = None) -> list[TuningKey]:
        """Every stored key matching each given filter (with or without trials or a best), oldest first: how the
        device search finds a target's compile-only results for its own problem."""
        filters = _key_filters(platform=platform, kernel=kernel, kernel_version=kernel_version,
                               device_kind=device_kind)
        with self._reading() as session:
            rows = session.scalars(select(KeyRow).where(*filters).order_by(KeyRow.id))
            return [key for row in rows if (key := _key(row)) is not None]

    # -- bests ----------------------------------------------------------------------------------------------------

    def put_best(self, key: TuningKey, *, config: dict[str, Any], time_s: float, default_time_s: float | None,
                 trials: int, run_id: int | None = None, check: ConfigCheck | None = None,
                 implementation: str = KERNEL_IMPLEMENTATION, times: dict[str, float] | None = None) -> bool:
        """Store this config as the key's best unless the key already has one at least as fast that can run;
        True if stored. `check` judges whether the stored config can run (db/ knows no kernels). `implementation`
        names the winner of the re-timing (`time_s` is its time) and `times` every implementation's (BestOffer)."""
        offer = BestOffer(key=key, config=config, time_s=time_s, default_time_s=default_time_s, trials=trials,
                          run_id=run_id, implementation=implementation, times=times)
        return self.put_bests([offer], check=check)[0]

    def put_bests(self, offers: Iterable[BestOffer], *, check: ConfigCheck | None = None) -> list[bool]:
        """`put_best` for many offers in one transaction (all or nothing); one bool per offer, in order. Large
        merges should go through `db.transfer.merge_offers`, which bounds how long the write lock is held."""
        offers = list(offers)
        for offer in offers:
            if not isinstance(offer, BestOffer):
                raise ValueError(f"put_bests takes BestOffer values, got {type(offer).__name__}")

        def work(session: Session) -> list[bool]:
            # Rows are written in the offers' order, so an import into an empty database lists like its source.
            # Two big merges at once could then deadlock on PostgreSQL: they take turns on one advisory lock
            # (SQLite writers already take turns). A single offer locks one row and cannot deadlock: it takes no turn.
            if len(offers) > 1 and session.get_bind().dialect.name == "postgresql":
                session.execute(text("SELECT pg_advisory_xact_lock(:lock)"), {"lock": _MERGE_LOCK})
            now = utc_now()
            return [offer_best(session, offer, now, check) for offer in offers]

        return self._write(work)

    def get_best(self, key: TuningKey) -> BestRecord | None:
        """The key's best, in one indexed query (the runtime calls this on every kernel call it has not cached)."""
        query = select(BestRow).join(KeyRow, KeyRow.id == BestRow.key_id).where(KeyRow.digest == key.digest())
        with self._reading() as session:
            row = session.scalars(query).first()
            return None if row is None else best_record(row, key)

    def bests(self, *, device_kind: str | None = None, kernel: str | None = None, dtype: str | None = None,
              causal: bool | None = None, platform: str | None = None) -> list[BestRecord]:
        """All bests matching every given filter, oldest first."""
        filters = _key_filters(device_kind=device_kind, kernel=kernel, dtype=dtype, causal=causal,
                               platform=platform)
        return self._bests_where(*filters)

    def best_by_id(self, best_id: int) -> BestRecord | None:
        """One best by its id (as the CLI lists them)."""
        found = self._bests_where(BestRow.id == best_id)
        return found[0] if found else None

    def neighbours(self, key: TuningKey) -> list[BestRecord]:
        """Bests of the same kernel build, platform, device, dtype, flags, window, soft-cap and lengths (a missing
        window or cap matches only a missing one), any shape and jax version."""
        return self._bests_where(*(_same(name, getattr(key, name)) for name in FAMILY_COLUMNS))

    def _bests_where(self, *conditions: ColumnElement[bool]) -> list[BestRecord]:
        query = (select(BestRow, KeyRow).join(KeyRow, KeyRow.id == BestRow.key_id).where(*conditions)
                 .order_by(BestRow.id))
        with self._reading() as session:
            return [best_record(best, key) for best, key_row in session.execute(query)
                    if (key := _key(key_row)) is not None]

    # -- misses ---------------------------------------------------------------------------------------------------

    def record_miss(self, key: TuningKey, reason: str | None = None) -> None:
        """Count one call of a key that ran without a tuned config. Without `reason` it had no best (a tunable
        miss: `count`); with one, the kernels could not run it at all (e.g. an argument they do not take) and it ran
        XLA: counted apart (`fallbacks`, the reason replacing the stored one), so it never hides the key's tunable
        misses. The reason is stored cleaned: one line, at most MAX_REASON characters."""
        reason = clean_text("reason", reason, limit=MAX_REASON)
        counts = {"count": int(reason is None), "fallbacks": int(reason is not None)}
        kept = {} if reason is None else {"reason": reason}

        def work(session: Session) -> None:
            key_id = key_row_id(session, key)
            now = utc_now()
            counted = session.execute(update(MissRow).where(MissRow.key_id == key_id)
                                      .values(count=MissRow.count + counts["count"],
                                              fallbacks=MissRow.fallbacks + counts["fallbacks"], last_seen=now,
                                              **kept)
                                      .execution_options(**_NO_SYNC))
            if not counted.rowcount:
                session.add(MissRow(key_id=key_id, last_seen=now, reason=reason, **counts))
                session.flush()

        self._write(work)

    def misses(self) -> list[tuple[TuningKey, int]]:
        """Keys with tunable misses (no best) and their counts, most frequent first: what `search --misses` tunes."""
        return [(record.key, record.count) for record in self.miss_records() if record.count]

    def miss_records(self) -> list[MissRecord]:
        """Missed keys with their counts, fallbacks, last times and reasons, most frequent first (tunable misses,
        then fallbacks)."""
        query = (select(KeyRow, MissRow).join(MissRow, MissRow.key_id == KeyRow.id)
                 .order_by(MissRow.count.desc(), MissRow.fallbacks.desc(), MissRow.last_seen.desc(), KeyRow.id))
        with self._reading() as session:
            return [MissRecord(key=key, count=miss.count, last_seen=miss.last_seen, reason=miss.reason,
                               fallbacks=miss.fallbacks)
                    for row, miss in session.execute(query) if (key := _key(row)) is not None]

    def clear_miss(self, key: TuningKey) -> None:
        """Forget the misses of a key (typically once it has been tuned)."""
        key_ids = select(KeyRow.id).where(KeyRow.digest == key.digest())
        self._write(lambda session: session.execute(
            delete(MissRow).where(MissRow.key_id.in_(key_ids)).execution_options(**_NO_SYNC)))

    # -- pruning --------------------------------------------------------------------------------------------------

    def prune(self, *, device_kind: str | None = None, kernel: str | None = None, kernel_version: str | None = None,
              jax_version: str | None = None, older_than: datetime | None = None,
              dry_run: bool = False) -> dict[str, int]:
        """Delete the keys matching every given filter, with their best, trials and misses; returns row counts.

        `older_than` selects keys whose best was last updated before it (so keys without a best never match it).
        At least one filter is required: wiping everything by accident is too easy otherwise.
        """
        conditions = _key_filters(device_kind=device_kind, kernel=kernel, kernel_version=kernel_version,
                                  jax_version=jax_version)
        query = select(KeyRow.id).where(*conditions)
        if older_than is not None:
            cutoff = check_datetime("older_than", older_than)
            query = query.join(BestRow, BestRow.key_id == KeyRow.id).where(BestRow.updated_at < cutoff)
        elif not conditions:
            raise ValueError("prune needs at least one filter (device_kind, kernel, kernel_version, jax_version "
                             "or older_than)")

        query = query.order_by(KeyRow.id)
        if dry_run:
            with self._reading() as session:
                return prune_keys(session, query, dry_run=True)
        return self._write(lambda session: prune_keys(session, query, dry_run=False))

    # -- claims ---------------------------------------------------------------------------------------------------

    def try_claim(self, name: str, owner: str, *, ttl_s: float = 60.0) -> bool:
        """Claim a shape for this worker; True if it is now ours (free, already ours, or stale), False otherwise."""
        check_text("name", name)
        check_text("owner", owner)
        ttl = check_time("ttl_s", ttl_s)
        return self._write(lambda session: claims.try_claim(session, name, owner, ttl, utc_now()))

    def heartbeat_claim(self, name: str, owner: str) -> bool:
        """Keep our claim fresh; returns False when it is no longer ours (the caller should stop working on it)."""
        return self._write(lambda session: claims.heartbeat(session, name, owner, utc_now()))

    def release_claim(self, name: str, owner: str, *, done: bool) -> None:
        """Give a claim up; `done=True` marks the shape finished so no worker claims it again."""
        self._write(lambda session: claims.release(session, name, owner, done, utc_now()))

    def claim_done(self, name: str) -> bool:
        """Whether a shape was marked finished."""
        with self._reading() as session:
            return claims.is_done(session, name)

    # -- checks ---------------------------------------------------------------------------------------------------

    def integrity_check(self) -> list[str]:
        """Problems found in the database, one line each; an empty list means it is fine."""
        with self._reading() as session:
            return find_problems(session)


def _same(name: str, value: Any) -> ColumnElement[bool]:
    """The key column equals the value; None matches only NULL (SQL's `= NULL` matches nothing)."""
    column = getattr(KeyRow, name)
    return column.is_(None) if value is None else column == value


def _key_filters(**filters: Any) -> list[ColumnElement[bool]]:
    return [getattr(KeyRow, name) == value for name, value in filters.items() if value is not None]


def _key(row: KeyRow) -> TuningKey | None:
    """The row's key, or None (skipped, with a log line) when an older version or a hand edit stored one that is
    not valid now: reading never fails on a stored value, and `integrity_check` names the row."""
    try:
        return TuningKey(**{name: getattr(row, name) for name in TuningKey.__dataclass_fields__})
    except ValueError as exc:
        log.warning("skipping autotune_keys row %s: %s", row.id, exc)
        return None


def _trial_record(row: TrialRow, key: TuningKey) -> TrialRecord | None:
    """The row as a record, or None (skipped, with a log line) when its config is not a JSON object; figures that
    do not fit their schema read as none. Rows of older versions or hand edits never crash a reader,
    and `integrity_check` names them."""
    if not is_config_object(row.config):
        log.warning("skipping autotune_trials row %s: its config is not a JSON object", row.id)
        return None
    return TrialRecord(id=row.id, key=key, run_id=row.run_id, number=row.number, config=row.config,
                       status=row.status, error_class=row.error_class, error_message=row.error_message,
                       compile_s=row.compile_s, time_s=row.time_s, time_spread_s=row.time_spread_s,
                       time_count=row.time_count, max_error=row.max_error, created_at=row.created_at,
                       figures=readable_figures(row.figures, row.id))

