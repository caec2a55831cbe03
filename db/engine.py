"""Creating the SQLAlchemy engine with the settings several writing processes need.

SQLite: WAL journal (readers never block the writer), a busy timeout (writers wait instead of failing), foreign
keys on (off by default in SQLite), and `BEGIN IMMEDIATE` before the first write of a transaction, so a
read-then-write transaction takes the write lock up front instead of failing with "database is locked" when two
processes try to upgrade their read locks at once. Every backend: JSON written strictly (no NaN), and pooled
connections are never reused across a fork.
"""
from __future__ import annotations

import functools
import json
import os
import sqlite3
import urllib.parse
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, exc
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import StaticPool

from db.retry import retry

_strict_json = functools.partial(json.dumps, allow_nan=False, sort_keys=True, separators=(",", ":"))


def make_engine(url: str, *, busy_timeout_s: float) -> Engine:
    """An engine for `url`, configured for concurrent writers."""
    backend = make_url(url).get_backend_name()
    options: dict[str, Any] = {"json_serializer": _strict_json}
    if backend == "sqlite":
        options["connect_args"] = {"timeout": busy_timeout_s, "isolation_level": "IMMEDIATE"}
        if make_url(url).database in (None, "", ":memory:"):
            options["poolclass"] = StaticPool  # one shared in-memory database, not one per connection
    else:
        options["pool_pre_ping"] = True
    engine = create_engine(url, **options)
    if backend == "sqlite":
        configure_sqlite_connections(engine, busy_timeout_s=busy_timeout_s)
    _guard_against_fork(engine)
    return engine


def configure_sqlite_connections(engine: Engine, *, busy_timeout_s: float, ours: bool = True) -> None:
    """The one SQLite connection hook: busy timeout, WAL, and `synchronous = NORMAL` (durable enough with WAL: a
    killed process loses nothing, a power cut at most the last commits; and much faster). For our own engine
    (`ours`) also foreign keys and `BEGIN IMMEDIATE`; Optuna's engine in the same file gets the rest only."""

    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            if ours:
                cursor.execute("PRAGMA foreign_keys = ON")
            _enable_wal(cursor, busy_timeout_s)
            cursor.execute("PRAGMA synchronous = NORMAL")
        finally:
            cursor.close()
        if ours:
            # The driver then issues BEGIN IMMEDIATE before the first INSERT/UPDATE/DELETE of each transaction.
            dbapi_connection.isolation_level = "IMMEDIATE"


def _enable_wal(cursor: Any, busy_timeout_s: float) -> None:
    """Switch a new database to WAL. SQLite answers 'locked' at once (no busy handler) when another process is
    switching it at the same moment, so this retries until the busy timeout instead of failing."""
    def switch() -> None:
        if str(cursor.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
            cursor.execute("PRAGMA journal_mode = WAL")

    def switching_elsewhere(exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.OperationalError) and ("locked" in str(exc) or "busy" in str(exc))

    retry(switch, retry_on=switching_elsewhere, delay_s=lambda _attempt: 0.02, give_up_after_s=busy_timeout_s)


def _guard_against_fork(engine: Engine) -> None:
    """A connection opened in a parent process is discarded, never shared, in a forked child."""

    @event.listens_for(engine, "connect")
    def remember_pid(_dbapi_connection: Any, record: Any) -> None:
        record.info["pid"] = os.getpid()

    @event.listens_for(engine, "checkout")
    def check_pid(_dbapi_connection: Any, record: Any, proxy: Any) -> None:
        if record.info.get("pid") != os.getpid():
            record.dbapi_connection = proxy.dbapi_connection = None
            raise exc.DisconnectionError("connection was opened in another process; reconnecting")


def make_reading_engine(url: str, *, busy_timeout_s: float, sqlite_path: Path | None,
                        views: tuple[str, ...] = ()) -> Engine:
    """An engine that can only read (list, show, export, report; the runtime on read-only storage).

    SQLite: `query_only` on every connection, opened `mode=rw` where the file and its folder can be written (so the
    last reader removes its -wal/-shm files like any connection and leaves the folder as it was), `mode=ro` where
    they cannot but a -wal file shows a writer at work, and `immutable=1` otherwise: in a folder nobody can write,
    no writer can exist (it would need a -wal file there), and immutable needs no file of its own. Never switches
    the journal mode, never creates the file. `views`: statements run on each new SQLite connection before it turns
    query-only (an older database read as the current schema: db.migrations.legacy_views). PostgreSQL: every
    transaction is READ ONLY.
    """
    if sqlite_path is None:
        engine = create_engine(url, json_serializer=_strict_json, pool_pre_ping=True)

        @event.listens_for(engine, "connect")
        def read_only_session(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            try:
                cursor.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
            finally:
                cursor.close()
            dbapi_connection.commit()
    else:
        writable = os.access(sqlite_path, os.W_OK) and os.access(sqlite_path.parent, os.W_OK)
        mode = "mode=rw" if writable else "mode=ro" if Path(f"{sqlite_path}-wal").exists() else "immutable=1"
        uri = f"file:{urllib.parse.quote(str(sqlite_path))}?{mode}"

        def connect() -> sqlite3.Connection:
            return sqlite3.connect(uri, uri=True, timeout=busy_timeout_s, check_same_thread=False)

        engine = create_engine(URL.create("sqlite", database=str(sqlite_path)), creator=connect,
                               json_serializer=_strict_json)

        @event.listens_for(engine, "connect")
        def query_only(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            try:
                cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
                for statement in views:
                    cursor.execute(statement)
                cursor.execute("PRAGMA query_only = ON")
            finally:
                cursor.close()
    _guard_against_fork(engine)
    return engine
