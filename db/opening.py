"""Opening a results database the way the caller needs: to write (created or upgraded as needed), only if it
already holds results (never creating one), or only to read (never writing a byte, even on read-only storage).

Everything that can be refused is refused before the database is touched: an in-memory SQLite URL (it would vanish
with the process, and Optuna's workers could not share it), a busy timeout no one can wait for, a backend whose
driver is not installed, a file that is not ours. Messages show the URL with its password hidden.

A read-only open of a database written by an older version upgrades it first where the storage can be written (as
every open did before reading became read-only: `list` must not stop working after an upgrade of pallas-autotune).
Where it cannot, an SQLite file whose upgrades since only added columns is read as it is, through temporary views
that add those columns with the values old rows read as (nothing is written; the caller says so once), and an
older one is refused with what to do; an empty or missing database is never created by it.
"""
from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, NoSuchModuleError, OperationalError

from db.engine import make_engine, make_reading_engine
from db.errors import DatabaseError
from db.inspection import Inventory, check_inventory, engine_inventory, sqlite_inventory
from db.migrations import columns_missing, legacy_views, prepare_schema
from db.schema import SCHEMA_VERSION
from db.urls import in_memory, scrub, sqlite_file
from db.validation import check_time


def open_engine(url: str, where: str, *, busy_timeout_s: float, create: bool,
                read_only: bool | None) -> tuple[Engine, bool, str | None]:
    """An engine for `url`, whether it is read-only (`read_only=None`: when the storage cannot be written), and a
    notice to show once, or None (an older database read as it is, on storage that cannot be written)."""
    try:
        busy = check_time("busy_timeout_s", busy_timeout_s)
    except ValueError as exc:
        raise DatabaseError(str(exc)) from None
    if in_memory(url):
        raise DatabaseError(
            "an in-memory SQLite database (sqlite://, :memory: or mode=memory) would vanish when this process ends, "
            "and search workers could not share it; give --db a file path or a server URL")
    path = sqlite_file(url)
    views: tuple[str, ...] = ()
    notice = None
    if path is not None:
        inventory = sqlite_inventory(path, busy_timeout_s=busy)
        check_inventory(inventory, where)  # before anything can create or change the file
        writable = _writable(path)
        if read_only is None:
            read_only = not writable
        version = None if inventory is None else inventory.schema_version
        older = version is not None and version < SCHEMA_VERSION
        missing = columns_missing(version) if older and not writable else None
        if read_only or not create:
            _require_results(inventory, where, can_read_older=writable or missing is not None)
        if read_only and older and writable:
            _upgrade(url, where, busy, path)
        elif read_only and older:  # only columns were added since: read it as it is, as the current schema
            views = tuple(legacy_views(missing or {}))
            notice = (f"{where} holds results schema version {version}, older than this pallas-autotune's "
                      f"({SCHEMA_VERSION}), on storage that cannot be written: it is read as it is, without "
                      "upgrading it (open it once where it can be written to upgrade it)")
        if not read_only:
            path.parent.mkdir(parents=True, exist_ok=True)
    engine = _engine(url, where, busy, path, bool(read_only), views)
    try:
        if path is None:
            inventory = engine_inventory(engine, where)
            check_inventory(inventory, where)
            if read_only or not create:
                _require_results(inventory, where, can_read_older=True)
            if read_only and inventory is not None and inventory.schema_version < SCHEMA_VERSION:
                _upgrade(url, where, busy, None)
        if not read_only:
            prepare_schema(engine, where)
    except OperationalError as exc:
        engine.dispose()
        raise DatabaseError(f"cannot open the results database {where}: {scrub(str(exc.orig), url)}") from None
    except BaseException:
        engine.dispose()
        raise
    return engine, bool(read_only), notice


def _engine(url: str, where: str, busy_timeout_s: float, path: Path | None, read_only: bool,
            views: tuple[str, ...] = ()) -> Engine:
    try:
        if read_only:
            return make_reading_engine(url, busy_timeout_s=busy_timeout_s, sqlite_path=path, views=views)
        return make_engine(url, busy_timeout_s=busy_timeout_s)
    except (NoSuchModuleError, ImportError) as exc:
        backend = make_url(url).drivername
        raise DatabaseError(
            f"cannot open the results database {where}: no driver for {backend!r} is installed "
            f"({scrub(str(exc), url)}); pallas-autotune supports SQLite files and postgresql:// URLs") from None


def _upgrade(url: str, where: str, busy_timeout_s: float, path: Path | None) -> None:
    """Bring an older database up to SCHEMA_VERSION with a writing engine, before a read-only open reads it."""
    engine = _engine(url, where, busy_timeout_s, path, False)
    try:
        prepare_schema(engine, where)
    except DBAPIError as exc:
        raise DatabaseError(
            f"{where} holds an older results schema and could not be upgraded for reading "
            f"({scrub(str(exc.orig), url)}); open it once with write access") from None
    finally:
        engine.dispose()


def _writable(path: Path) -> bool:
    """Whether SQLite could write here: the file (if any) and its folder (for the -wal file) are writable."""
    if path.exists():
        return os.access(path, os.W_OK) and os.access(path.parent, os.W_OK)
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return os.access(folder, os.W_OK)


def _require_results(inventory: Inventory | None, where: str, *, can_read_older: bool) -> None:
    """Refuse, without writing, a database that holds no results yet (absent, empty, or Optuna's tables only), or an
    older one that can neither be upgraded here (read-only storage) nor read as it is."""
    if inventory is None or inventory.schema_version is None:
        raise DatabaseError(f"{where} holds no results database yet (nothing was changed); run `autotune search` "
                            "or `autotune import` to create one")
    if not can_read_older and inventory.schema_version < SCHEMA_VERSION:
        raise DatabaseError(
            f"{where} holds results schema version {inventory.schema_version}, older than this pallas-autotune's "
            f"({SCHEMA_VERSION}), on storage that cannot be written, so it cannot be upgraded; open it once where "
            "it can be written (any command upgrades it)")
