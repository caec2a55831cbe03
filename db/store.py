"""`Store`: the one object the search, the runtime and the CLI use to read and write results.

Every write is one short transaction, retried when it loses a race to another process (a unique-key collision when
two workers create the same key row, or a deadlock on PostgreSQL), so many workers can share one SQLite file or one
PostgreSQL database. "Keep the faster" is a conditional UPDATE (`... WHERE time_s > new`) plus an INSERT that the
unique key_id guards, re-compared when a row appears between the two statements (PostgreSQL's read committed), so
concurrent writers can never both win or overwrite a faster result.
"""
from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, Engine, delete, select, text, update
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session

from db import claims
from db.engine import make_engine
from db.errors import DatabaseError
from db.inspection import check_inventory, engine_inventory, sqlite_inventory
from db.integrity import find_problems
from db.migrations import prepare_schema
from db.pruning import prune_keys
from db.records import (RUN_STATUSES, TRIAL_STATUSES, BestOffer, BestRecord, RunRecord, TrialRecord,
                        TuningKey)
from db.schema import BestRow, KeyRow, MissRow, RunRow, TrialRow
from db.urls import default_url, display_url, resolve_url, sqlite_file
from db.validation import (check_choice, check_datetime, check_error_size, check_int, check_json_object,
                           check_text, check_time, utc_now)

log = logging.getLogger(__name__)
T = TypeVar("T")

_ATTEMPTS = 8
_RETRY_SQLSTATES = {"40001", "40P01"}  # PostgreSQL serialization failure, deadlock
_NO_SYNC = {"synchronize_session": False}
_FINAL_RUN_STATUSES = tuple(status for status in RUN_STATUSES if status != "running")


_MERGE_LOCK = 0x6175746F  # 'auto': the advisory lock that serialises bulk merges of bests


class Store:
    """The results database at `url` (default: `default_url()`); creates or upgrades its tables on open."""

    def __init__(self, url: str | os.PathLike[str] | None = None, *, busy_timeout_s: float = 30.0) -> None:
        self.url: str = default_url() if url is None else resolve_url(url)
        self._where = display_url(self.url)
        path = sqlite_file(self.url)
        if path is not None:
            check_inventory(sqlite_inventory(path, busy_timeout_s=busy_timeout_s), self._where)  # before anything can create or change the file
            path.parent.mkdir(parents=True, exist_ok=True)
        self.engine: Engine = make_engine(self.url, busy_timeout_s=busy_timeout_s)
        try:
            if path is None:
                check_inventory(engine_inventory(self.engine, self._where), self._where)
            prepare_schema(self.engine, self._where)
        except OperationalError as exc:
            self.engine.dispose()
            raise DatabaseError(f"cannot open the results database {self._where}: {exc.orig}") from exc
        except BaseException:
            self.engine.dispose()
            raise

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
        for attempt in range(_ATTEMPTS):
            try:
                with Session(self.engine, expire_on_commit=False) as session, session.begin():
                    return work(session)
            except DBAPIError as exc:
                lost_race = isinstance(exc, IntegrityError) or getattr(exc.orig, "sqlstate", None) in _RETRY_SQLSTATES
                if lost_race and attempt < _ATTEMPTS - 1:
                    log.debug("retrying a write that lost a race (attempt %d): %s", attempt + 1, exc.orig)
                    time.sleep(random.uniform(0.0, 0.002 * 2 ** attempt))
                    continue
                if isinstance(exc, OperationalError) and "database is locked" in str(exc.orig):
                    raise DatabaseError(f"the results database {self._where} stayed locked by another process "
                                        f"for longer than the busy timeout") from exc
                raise
        raise AssertionError("unreachable")

    @staticmethod
    def _key_id(session: Session, key: TuningKey) -> int:
        """The id of the key's row, inserting it if new (a racing insert fails on the unique digest; retried)."""
        if not isinstance(key, TuningKey):
            raise ValueError(f"key must be a TuningKey, got {type(key).__name__}")
        digest = key.digest()
        key_id = session.scalar(select(KeyRow.id).where(KeyRow.digest == digest))
        if key_id is None:
            row = KeyRow(digest=digest, created_at=utc_now(), **key.to_dict())
            session.add(row)
            session.flush()
            key_id = row.id
        return key_id

    @staticmethod
    def _require_run(session: Session, run_id: int | None) -> None:
        if run_id is not None and session.get(RunRow, run_id) is None:
            raise ValueError(f"run_id {run_id} is not a run in this database")

    # -- runs -----------------------------------------------------------------------------------------------------

    def start_run(self, *, host: str, device_kind: str, platform: str, jax_version: str,
                  arguments: dict[str, Any]) -> int:
        """Record the start of a search run; returns its id (for trials, bests and `finish_run`)."""
        values = dict(host=check_text("host", host), device_kind=check_text("device_kind", device_kind),
                      platform=check_text("platform", platform), jax_version=check_text("jax_version", jax_version),
                      arguments=check_json_object("arguments", arguments))

        def work(session: Session) -> int:
            row = RunRow(**values, started_at=utc_now(), ended_at=None, status="running", message="")
            session.add(row)
            session.flush()
            return row.id

        return self._write(work)

    def finish_run(self, run_id: int, status: str, message: str = "") -> None:
        """Record how a run ended."""
        check_choice("status", status, _FINAL_RUN_STATUSES)
        check_text("message", message, allow_empty=True)

        def work(session: Session) -> None:
            result = session.execute(update(RunRow).where(RunRow.id == run_id)
                                     .values(status=status, message=message, ended_at=utc_now())
                                     .execution_options(**_NO_SYNC))
            if not result.rowcount:
                raise ValueError(f"run_id {run_id} is not a run in this database")

        self._write(work)

    def runs(self) -> list[RunRecord]:
        """All runs, oldest first."""
        with self._reading() as session:
            return [_run_record(row) for row in session.scalars(select(RunRow).order_by(RunRow.id))]

    # -- trials ---------------------------------------------------------------------------------------------------

    def add_trial(self, key: TuningKey, *, config: dict[str, Any], status: str, run_id: int | None = None,
                  number: int | None = None, error_class: str | None = None, error_message: str | None = None,
                  compile_s: float | None = None, time_s: float | None = None, time_spread_s: float | None = None,
                  time_count: int | None = None, max_error: float | None = None) -> int:
        """Record one trial; returns its id. Times must be finite and >= 0; a NaN `max_error` is stored as +inf."""
        values = dict(
            config=check_json_object("config", config), status=check_choice("status", status, TRIAL_STATUSES),
            run_id=check_int("run_id", run_id, optional=True), number=check_int("number", number, optional=True),
            error_class=check_text("error_class", error_class, optional=True, allow_empty=True),
            error_message=check_text("error_message", error_message, optional=True, allow_empty=True),
            compile_s=check_time("compile_s", compile_s, optional=True),
            time_s=check_time("time_s", time_s, optional=True),
            time_spread_s=check_time("time_spread_s", time_spread_s, optional=True),
            time_count=check_int("time_count", time_count, optional=True, minimum=0),
            max_error=check_error_size("max_error", max_error))

        def work(session: Session) -> int:
            self._require_run(session, values["run_id"])
            row = TrialRow(key_id=self._key_id(session, key), created_at=utc_now(), **values)
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
            return [_trial_record(trial, _key(key_row)) for trial, key_row in session.execute(query)]

    # -- bests ----------------------------------------------------------------------------------------------------

    def put_best(self, key: TuningKey, *, config: dict[str, Any], time_s: float, default_time_s: float | None,
                 trials: int, run_id: int | None = None) -> bool:
        """Store this config as the key's best unless the key already has one at least as fast; True if stored."""
        offer = BestOffer(key=key, config=config, time_s=time_s, default_time_s=default_time_s, trials=trials,
                          run_id=run_id)
        return self.put_bests([offer])[0]

    def put_bests(self, offers: Iterable[BestOffer]) -> list[bool]:
        """`put_best` for many offers in one transaction (all or nothing); one bool per offer, in order."""
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
            return [self._offer(session, offer, now) for offer in offers]

        return self._write(work)

    def _offer(self, session: Session, offer: BestOffer, now: datetime) -> bool:
        self._require_run(session, offer.run_id)
        key_id = self._key_id(session, offer.key)
        values = dict(config=offer.config, time_s=offer.time_s, default_time_s=offer.default_time_s,
                      trials=offer.trials, run_id=offer.run_id, updated_at=offer.updated_at or now)
        while True:
            replaced = session.execute(update(BestRow).where(BestRow.key_id == key_id, BestRow.time_s > offer.time_s)
                                       .values(**values).execution_options(**_NO_SYNC))
            if replaced.rowcount:
                return True
            stored = session.scalar(select(BestRow.time_s).where(BestRow.key_id == key_id))
            if stored is None:
                session.add(BestRow(key_id=key_id, **values))
                session.flush()  # a racing first insert for this key fails here on the unique key_id; retried
                return True
            if stored <= offer.time_s:
                return False  # the stored best is at least as fast (and bests only ever get faster)
            # PostgreSQL (read committed) gives each statement a new snapshot: the row was committed by another
            # writer after our UPDATE looked, so it may be slower than ours; compare again.

    def get_best(self, key: TuningKey) -> BestRecord | None:
        """The key's best, in one indexed query (the runtime calls this on every kernel call it has not cached)."""
        query = select(BestRow).join(KeyRow, KeyRow.id == BestRow.key_id).where(KeyRow.digest == key.digest())
        with self._reading() as session:
            row = session.scalars(query).first()
            return None if row is None else _best_record(row, key)

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
        """Bests of the same kernel build, platform, device, dtype and flags, any shape and jax version."""
        return self._bests_where(KeyRow.kernel == key.kernel, KeyRow.kernel_version == key.kernel_version,
                                 KeyRow.platform == key.platform, KeyRow.device_kind == key.device_kind,
                                 KeyRow.dtype == key.dtype, KeyRow.causal == key.causal,
                                 KeyRow.segments == key.segments, KeyRow.backward == key.backward)

    def _bests_where(self, *conditions: ColumnElement[bool]) -> list[BestRecord]:
        query = (select(BestRow, KeyRow).join(KeyRow, KeyRow.id == BestRow.key_id).where(*conditions)
                 .order_by(BestRow.id))
        with self._reading() as session:
            return [_best_record(best, _key(key_row)) for best, key_row in session.execute(query)]

    # -- misses ---------------------------------------------------------------------------------------------------

    def record_miss(self, key: TuningKey) -> None:
        """Count one lookup of a key that had no best."""

        def work(session: Session) -> None:
            key_id = self._key_id(session, key)
            now = utc_now()
            counted = session.execute(update(MissRow).where(MissRow.key_id == key_id)
                                      .values(count=MissRow.count + 1, last_seen=now).execution_options(**_NO_SYNC))
            if not counted.rowcount:
                session.add(MissRow(key_id=key_id, count=1, last_seen=now))
                session.flush()

        self._write(work)

    def misses(self) -> list[tuple[TuningKey, int]]:
        """Missed keys with their counts, most frequent first."""
        query = (select(KeyRow, MissRow.count).join(MissRow, MissRow.key_id == KeyRow.id)
                 .order_by(MissRow.count.desc(), MissRow.last_seen.desc(), KeyRow.id))
        with self._reading() as session:
            return [(_key(row), count) for row, count in session.execute(query)]

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


def _key_filters(**filters: Any) -> list[ColumnElement[bool]]:
    return [getattr(KeyRow, name) == value for name, value in filters.items() if value is not None]


def _key(row: KeyRow) -> TuningKey:
    return TuningKey(**{name: getattr(row, name) for name in TuningKey.__dataclass_fields__})


def _run_record(row: RunRow) -> RunRecord:
    return RunRecord(id=row.id, host=row.host, device_kind=row.device_kind, platform=row.platform,
                     jax_version=row.jax_version, arguments=row.arguments, started_at=row.started_at,
                     ended_at=row.ended_at, status=row.status, message=row.message)


def _trial_record(row: TrialRow, key: TuningKey) -> TrialRecord:
    return TrialRecord(id=row.id, key=key, run_id=row.run_id, number=row.number, config=row.config,
                       status=row.status, error_class=row.error_class, error_message=row.error_message,
                       compile_s=row.compile_s, time_s=row.time_s, time_spread_s=row.time_spread_s,
                       time_count=row.time_count, max_error=row.max_error, created_at=row.created_at)


def _best_record(row: BestRow, key: TuningKey) -> BestRecord:
    speedup = row.default_time_s / row.time_s if row.default_time_s is not None else None
    return BestRecord(id=row.id, key=key, config=row.config, time_s=row.time_s, default_time_s=row.default_time_s,
                      speedup=speedup, trials=row.trials, run_id=row.run_id, updated_at=row.updated_at)
