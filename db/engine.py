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
import time
from typing import Any

from sqlalchemy import Engine, create_engine, event, exc
from sqlalchemy.engine import make_url
from sqlalchemy.pool import StaticPool

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
        _configure_sqlite(engine, busy_timeout_s)
    _guard_against_fork(engine)
    return engine


def _configure_sqlite(engine: Engine, busy_timeout_s: float) -> None:
    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            cursor.execute("PRAGMA foreign_keys = ON")
            _enable_wal(cursor, busy_timeout_s)
            cursor.execute("PRAGMA synchronous = NORMAL")  # durable enough with WAL, and much faster
        finally:
            cursor.close()
        # The driver then issues BEGIN IMMEDIATE before the first INSERT/UPDATE/DELETE of each transaction.
        dbapi_connection.isolation_level = "IMMEDIATE"


def _enable_wal(cursor: Any, busy_timeout_s: float) -> None:
    """Switch a new database to WAL. SQLite answers 'locked' at once (no busy handler) when another process is
    switching it at the same moment, so this retries until the busy timeout instead of failing."""
    deadline = time.monotonic() + busy_timeout_s
    while True:
        try:
            if str(cursor.execute("PRAGMA journal_mode").fetchone()[0]).lower() == "wal":
                return
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) and "busy" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


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
