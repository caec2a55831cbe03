"""Creating the tables in a new database and upgrading an older one in place.

Runs inside one transaction that first takes a database-wide write lock (SQLite: BEGIN IMMEDIATE; PostgreSQL: an
advisory lock), so when several workers open a fresh database at once exactly one creates or upgrades it and the
others then find it ready. Each step moves the schema up by one version and is frozen: later changes get new steps
instead of editing old ones, so any old database can be walked forward.
"""
from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Boolean, Column, Connection, Engine, MetaData, String, Table, false, inspect, text

from db.errors import SchemaTooNewError
from db.inspection import parse_version
from db.schema import META_TABLE, SCHEMA_VERSION, Base, MetaRow, UTCDateTime

_ADVISORY_LOCK_ID = 0x6175746F74756E65  # "autotune" in ASCII


def _v1_to_v2(connection: Connection) -> None:
    """Version 2 keeps the spread and count of each trial's timings and adds worker claims."""
    connection.execute(text("ALTER TABLE autotune_trials ADD COLUMN time_spread_s FLOAT"))
    connection.execute(text("ALTER TABLE autotune_trials ADD COLUMN time_count INTEGER"))
    claims = Table(
        "autotune_claims", MetaData(),
        Column("name", String(255), primary_key=True),
        Column("owner", String, nullable=False),
        Column("claimed_at", UTCDateTime(), nullable=False),
        Column("heartbeat_at", UTCDateTime(), nullable=False),
        Column("done", Boolean, nullable=False),
    )
    claims.create(connection)


def _v2_to_v3(connection: Connection) -> None:
    """Version 3 keeps what the compiler said of a compile-only trial (bytes, registers, spills per kernel)."""
    connection.execute(text("ALTER TABLE autotune_trials ADD COLUMN figures JSON"))


def _v3_to_v4(connection: Connection) -> None:
    """Version 4 keys carry a sliding window, a soft-cap and whether padding lengths are given (old rows: none of
    them, so their digests and lookups are unchanged), misses keep a reason, and the family index that
    `Store.neighbours` uses covers the new key columns. A column already there is left as it is."""
    boolean_false = false().compile(dialect=connection.dialect)
    columns = {"autotune_keys": [("window_left", "INTEGER"), ("window_right", "INTEGER"), ("softcap", "FLOAT"),
                                 ("lengths", f"BOOLEAN NOT NULL DEFAULT {boolean_false}")],
               "autotune_misses": [("reason", "TEXT")]}
    inspector = inspect(connection)
    for table, added in columns.items():
        present = {column["name"] for column in inspector.get_columns(table)}
        for name, definition in added:
            if name not in present:
                connection.execute(text(f"ALTER TABLE {table} ADD COLUMN {name} {definition}"))
    connection.execute(text("DROP INDEX IF EXISTS ix_autotune_keys_family"))  # absent in databases made by version 1
    connection.execute(text("CREATE INDEX ix_autotune_keys_family ON autotune_keys "
                            "(kernel, kernel_version, platform, device_kind, dtype, causal, segments, backward, "
                            "window_left, window_right, softcap, lengths)"))


def _v4_to_v5(connection: Connection) -> None:
    """Version 5 counts a key's calls that ran XLA because the kernels could not run them (a bias, a mask) apart
    from its tunable misses, so one such call no longer hides them. Older rows: no such calls counted. A column
    already there is left as it is."""
    if "fallbacks" not in {column["name"] for column in inspect(connection).get_columns("autotune_misses")}:
        connection.execute(text("ALTER TABLE autotune_misses ADD COLUMN fallbacks INTEGER NOT NULL DEFAULT 0"))


def _v5_to_v6(connection: Connection) -> None:
    """Version 6 bests say which implementation won the final re-timing (the tuned kernel, or jax.nn's XLA or
    cuDNN attention) and keep every implementation's time. Older rows: kernel wins with the kernel's time alone
    (times NULL reads as {"pallas": time_s}). A column already there is left as it is."""
    present = {column["name"] for column in inspect(connection).get_columns("autotune_bests")}
    if "implementation" not in present:
        connection.execute(text("ALTER TABLE autotune_bests ADD COLUMN implementation VARCHAR(16) NOT NULL "
                                "DEFAULT 'pallas'"))
    if "times" not in present:
        connection.execute(text("ALTER TABLE autotune_bests ADD COLUMN times JSON"))


# STEPS[n] upgrades a version-n database to version n + 1.
STEPS: dict[int, Callable[[Connection], None]] = {1: _v1_to_v2, 2: _v2_to_v3, 3: _v3_to_v4, 4: _v4_to_v5,
                                                  5: _v5_to_v6}

# The steps that only add columns, each with what an older row reads as (an SQL value): a database that needs only
# these can be read as it is, without upgrading it, where it cannot be written (db.legacy). A test checks that
# this matches what the steps really add.
COLUMNS_ADDED: dict[int, dict[str, dict[str, str]]] = {
    2: {"autotune_trials": {"figures": "NULL"}},
    3: {"autotune_keys": {"window_left": "NULL", "window_right": "NULL", "softcap": "NULL", "lengths": "0"},
        "autotune_misses": {"reason": "NULL"}},
    4: {"autotune_misses": {"fallbacks": "0"}},
    5: {"autotune_bests": {"implementation": "'pallas'", "times": "NULL"}},
}


def columns_missing(version: int) -> dict[str, dict[str, str]] | None:
    """What a version-`version` database lacks of the current schema, when the steps up from it only add columns
    ({table: {column: what older rows read as}}, empty when current); None when a step does more (a new table)."""
    missing: dict[str, dict[str, str]] = {}
    for step in range(version, SCHEMA_VERSION):
        if step not in COLUMNS_ADDED:
            return None
        for table, columns in COLUMNS_ADDED[step].items():
            missing.setdefault(table, {}).update(columns)
    return missing


def legacy_views(missing: dict[str, dict[str, str]]) -> list[str]:
    """SQLite statements that make an older database read as the current schema on one connection, changing
    nothing in it: a TEMP view per table that lacks columns, named like the table (SQLite looks in `temp` before
    `main`), adding each missing column with the value older rows read as."""
    return [f"CREATE TEMP VIEW {table} AS SELECT *, "
            + ", ".join(f"{value} AS {column}" for column, value in columns.items()) + f" FROM main.{table}"
            for table, columns in missing.items()]


def prepare_schema(engine: Engine, where: str) -> None:
    """Create our tables (a new database) or upgrade them to SCHEMA_VERSION; Optuna's tables are left alone."""
    with engine.connect() as connection:
        if _version(connection) == SCHEMA_VERSION:  # the common case: no lock, no write
            connection.rollback()
            return
        connection.rollback()
        _lock(connection)
        version = _version(connection)  # again, under the lock: another process may have done it meanwhile
        if version is None:
            Base.metadata.create_all(connection)
            connection.execute(MetaRow.__table__.insert().values(name="schema_version", value=str(SCHEMA_VERSION)))
        elif version > SCHEMA_VERSION:
            raise SchemaTooNewError(
                f"{where} holds results schema version {version}, newer than this pallas-autotune knows "
                f"({SCHEMA_VERSION}); upgrade pallas-autotune to use it")
        elif version < SCHEMA_VERSION:
            for step in range(version, SCHEMA_VERSION):
                STEPS[step](connection)
            connection.execute(MetaRow.__table__.update().where(MetaRow.name == "schema_version")
                               .values(value=str(SCHEMA_VERSION)))
        connection.commit()


def _version(connection: Connection) -> int | None:
    """Our schema version, or None when the database has no autotune_meta yet."""
    if META_TABLE not in inspect(connection).get_table_names():
        return None
    raw = connection.execute(text(f"SELECT value FROM {META_TABLE} WHERE name = 'schema_version'")).scalar_one_or_none()
    return parse_version(raw, "the results database")


def _lock(connection: Connection) -> None:
    if connection.dialect.name == "sqlite":
        connection.exec_driver_sql("BEGIN IMMEDIATE")
    elif connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _ADVISORY_LOCK_ID})
