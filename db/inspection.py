"""Looking at an existing database before touching it, so a refusal leaves it exactly as it was.

A user who points `--db` at the wrong file must get an error, not a file with our tables (or a WAL header) added.
For SQLite files the check reads the header bytes itself and then opens the file with `immutable=1`, which makes
SQLite take no locks and create no -wal/-shm/-journal files; only when a -wal file already exists (the database is
in use in WAL mode, so the main file alone may be stale) is it opened read-only the normal way.
"""
from __future__ import annotations

import re
import sqlite3
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine, inspect, text

from db.errors import DatabaseError, ForeignDatabaseError, NotADatabaseError, SchemaTooNewError
from db.schema import META_TABLE, PREFIX, SCHEMA_VERSION
from db.retry import retry

SQLITE_MAGIC = b"SQLite format 3\x00"

# Optuna's RDBStorage tables (optuna.storages._rdb.models, plus Alembic's bookkeeping); tests check this list.
OPTUNA_TABLES = frozenset({
    "alembic_version", "studies", "study_directions", "study_system_attributes", "study_user_attributes",
    "trial_heartbeats", "trial_intermediate_values", "trial_params", "trial_system_attributes",
    "trial_user_attributes", "trial_values", "trials", "version_info",
})


@dataclass(frozen=True)
class Inventory:
    """What an existing database holds: its table names, and our schema version if it has autotune_meta."""

    tables: frozenset[str]
    schema_version: int | None


class _Unreadable(Exception):
    """A read that may only have failed because another process was writing the file at that moment."""


_ATTEMPTS = 3  # reads of a file that looks damaged before calling it damaged


def sqlite_inventory(path: Path, *, busy_timeout_s: float = 30.0) -> Inventory | None:
    """The inventory of an SQLite file without changing it; None when there is no database yet (absent or empty).

    A file that another process is creating right now can look torn for a moment, so a failed read is tried
    again a few times before the file is called damaged.
    """
    try:
        return retry(lambda: _sqlite_inventory_once(path, busy_timeout_s), attempts=_ATTEMPTS,
                     retry_on=lambda exc: isinstance(exc, _Unreadable), delay_s=lambda _attempt: 0.05)
    except _Unreadable as exc:
        raise NotADatabaseError(str(exc)) from None


def _sqlite_inventory_once(path: Path, busy_timeout_s: float) -> Inventory | None:
    if not path.exists():
        return None
    if not path.is_file():
        raise NotADatabaseError(f"{path} is not a file, so it cannot be a results database")
    with path.open("rb") as handle:
        header = handle.read(100)
    if not header:
        return None
    if not (header.startswith(SQLITE_MAGIC) or SQLITE_MAGIC.startswith(header)):
        raise NotADatabaseError(
            f"{path} is not an SQLite database (it starts with {header[:16]!r}); refusing to touch it. "
            "Point --db / AUTOTUNE_DB at a results database or a new file name")
    if len(header) < 100:
        raise _Unreadable(f"{path} is too short to be an SQLite database ({len(header)} bytes); refusing to touch it")
    wal = Path(f"{path}-wal")
    mode = "mode=ro" if wal.exists() else "immutable=1"
    uri = f"file:{urllib.parse.quote(str(path))}?{mode}"
    try:
        connection = sqlite3.connect(uri, uri=True, timeout=busy_timeout_s)
        try:
            tables = frozenset(row[0] for row in connection.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"))
            version = _read_version(connection, tables, str(path))
        finally:
            connection.close()
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            raise DatabaseError(f"{path} is locked by another process for longer than the busy timeout "
                                f"({busy_timeout_s:g} s); try again when it is free") from None
        raise _Unreadable(f"{path} is damaged or not an SQLite database ({exc}); refusing to touch it") from None
    except sqlite3.DatabaseError as exc:
        raise _Unreadable(f"{path} is damaged or not an SQLite database ({exc}); refusing to touch it") from None
    return Inventory(tables, version)


def engine_inventory(engine: Engine, where: str) -> Inventory | None:
    """The inventory of a server database (PostgreSQL) by reading its catalog; None when it has no tables."""
    with engine.connect() as connection:
        tables = frozenset(inspect(connection).get_table_names())
        version = None
        if META_TABLE in tables:
            raw = connection.execute(
                text(f"SELECT value FROM {META_TABLE} WHERE name = 'schema_version'")).scalar_one_or_none()
            version = parse_version(raw, where)
        connection.rollback()
    return Inventory(tables, version) if tables else None


def _read_version(connection: sqlite3.Connection, tables: frozenset[str], where: str) -> int | None:
    if META_TABLE not in tables:
        return None
    row = connection.execute(f"SELECT value FROM {META_TABLE} WHERE name = 'schema_version'").fetchone()
    return parse_version(None if row is None else row[0], where)


def parse_version(raw: object, where: str) -> int:
    """A stored schema version: a whole number from 1 up, as this program writes it (newer ones are refused
    later, by `check_inventory`); anything else (empty, '-1', '0', '4.5', text) is the same clear error."""
    text = str(raw).strip()
    if not re.fullmatch(r"[0-9]{1,9}", text) or int(text) < 1:  # no sign, point, spaces inside or huge number
        raise DatabaseError(
            f"{where} has an {META_TABLE} table but no readable schema version (found {raw!r}); "
            "it is damaged or was not written by pallas-autotune")
    return int(text)


def check_inventory(inventory: Inventory | None, where: str) -> None:
    """Refuse a database that is newer than this code or belongs to another program; accept ours and Optuna's."""
    if inventory is None:
        return
    if inventory.schema_version is not None:
        if inventory.schema_version > SCHEMA_VERSION:
            raise SchemaTooNewError(
                f"{where} holds results schema version {inventory.schema_version}, but this pallas-autotune only "
                f"knows versions up to {SCHEMA_VERSION}; upgrade pallas-autotune to use it (it was left unchanged)")
        return
    foreign = sorted(name for name in inventory.tables if name not in OPTUNA_TABLES)
    if foreign:
        shown = ", ".join(foreign[:6]) + (", ..." if len(foreign) > 6 else "")
        ours = " (tables named like ours but no autotune_meta)" if all(n.startswith(PREFIX) for n in foreign) else ""
        raise ForeignDatabaseError(
            f"{where} is another program's database{ours}: it has tables {shown} and no {META_TABLE}; refusing "
            "to add results to it (it was left unchanged). Point --db / AUTOTUNE_DB at a results database or a "
            "new file name")
