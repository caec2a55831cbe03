"""Consistency checks of a results database (`Store.integrity_check`): problems are listed, never repaired here.

SQLite gets its own page-level check and foreign-key check; every backend gets the checks only we can do: rows
pointing at missing keys or runs, key rows whose digest does not match their fields (hand-edited or written by a
buggy version, so lookups would miss them), bests with impossible times, and trials whose config or compiler
figures do not fit what the program writes.
"""
from __future__ import annotations

from sqlalchemy import Connection, select, text
from sqlalchemy.orm import Session

from db.figures import check_figures, is_config_object
from db.records import KERNEL_IMPLEMENTATION, TuningKey, check_winner
from db.schema import SCHEMA_VERSION, BestRow, KeyRow, MetaRow, MissRow, RunRow, TrialRow
from db.validation import is_physical_time

_LIMIT = 20  # problems listed per check, so a badly broken database still gives a readable report


def find_problems(session: Session) -> list[str]:
    """Everything found wrong, as one line each; empty when the database is fine."""
    problems: list[str] = []
    connection = session.connection()
    if connection.dialect.name == "sqlite":
        problems += _sqlite_checks(connection)
    version = session.scalar(select(MetaRow.value).where(MetaRow.name == "schema_version"))
    if version != str(SCHEMA_VERSION):
        problems.append(f"autotune_meta.schema_version is {version!r}, expected {SCHEMA_VERSION}")
    for table, column in ((TrialRow, TrialRow.key_id), (BestRow, BestRow.key_id), (MissRow, MissRow.key_id)):
        orphans = session.scalars(select(column).where(column.not_in(select(KeyRow.id))).limit(_LIMIT)).all()
        problems += [f"{table.__tablename__} row with key_id {key_id} points at no key" for key_id in orphans]
    for table, column in ((TrialRow, TrialRow.run_id), (BestRow, BestRow.run_id)):
        orphans = session.scalars(select(column).where(column.is_not(None), column.not_in(select(RunRow.id)))
                                  .limit(_LIMIT)).all()
        problems += [f"{table.__tablename__} row with run_id {run_id} points at no run" for run_id in orphans]
    problems += _key_checks(session)
    problems += _trial_checks(session)
    for best_id, time_s, default, implementation, times in session.execute(
            select(BestRow.id, BestRow.time_s, BestRow.default_time_s, BestRow.implementation, BestRow.times)):
        for name, value in (("time_s", time_s), ("default_time_s", default)):
            if value is not None and not is_physical_time(value):
                problems.append(f"autotune_bests row {best_id} has {name} = {value!r}")
        if is_physical_time(time_s) and (times is not None or implementation != KERNEL_IMPLEMENTATION):
            try:
                check_winner(implementation, times, time_s)
            except ValueError as exc:
                problems.append(f"autotune_bests row {best_id} has an unreadable winner (read as the kernel's): {exc}")
    return problems


def _sqlite_checks(connection: Connection) -> list[str]:
    problems = [f"sqlite integrity_check: {row[0]}" for row in connection.exec_driver_sql(
        f"PRAGMA integrity_check({_LIMIT})") if row[0] != "ok"]
    problems += [f"sqlite foreign_key_check: {table} row {rowid} points at a missing {parent} row"
                 for table, rowid, parent, _fk in connection.execute(text("PRAGMA foreign_key_check"))]
    return problems


def _key_checks(session: Session) -> list[str]:
    problems: list[str] = []
    for row in session.scalars(select(KeyRow)):
        try:
            key = TuningKey(**{name: getattr(row, name) for name in TuningKey.__dataclass_fields__})
        except ValueError as exc:
            problems.append(f"autotune_keys row {row.id} is not a valid key: {exc}")
            continue
        if key.digest() != row.digest:
            problems.append(f"autotune_keys row {row.id} has digest {row.digest} but its fields hash to "
                            f"{key.digest()}")
        if len(problems) >= _LIMIT:
            break
    return problems


def _trial_checks(session: Session) -> list[str]:
    """Trial rows a reader skips (a config that is not a JSON object) or reads without figures (figures that do not
    fit db.figures' schema)."""
    problems: list[str] = []
    for trial_id, config, figures in session.execute(select(TrialRow.id, TrialRow.config, TrialRow.figures)):
        if not is_config_object(config):
            problems.append(f"autotune_trials row {trial_id} has a config that is not a JSON object")
        elif figures is not None:
            try:
                check_figures(figures)
            except (ValueError, TypeError) as exc:
                problems.append(f"autotune_trials row {trial_id} has figures that do not fit their schema: {exc}")
        if len(problems) >= _LIMIT:
            break
    return problems
