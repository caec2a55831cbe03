"""Deleting whole keys (best, trials, misses and the key row) chosen by a query, or only counting them.

Keys go as a unit: a best without its trials or a trial without its key would only confuse later reports. Rows are
deleted children first, in chunks of ids, so the foreign keys hold at every step and no IN list grows past a
backend's parameter limit.
"""
from __future__ import annotations

from sqlalchemy import Select, delete, func, select
from sqlalchemy.orm import Session

from db.schema import BestRow, KeyRow, MissRow, TrialRow

_CHUNK = 500
_TABLES = (("trials", TrialRow, TrialRow.key_id), ("bests", BestRow, BestRow.key_id),
           ("misses", MissRow, MissRow.key_id), ("keys", KeyRow, KeyRow.id))


def prune_keys(session: Session, key_ids_query: Select[tuple[int]], *, dry_run: bool) -> dict[str, int]:
    """Delete (or with `dry_run` count) the rows of the keys the query selects; returns rows per table."""
    key_ids = list(session.scalars(key_ids_query))
    counts = {name: 0 for name, _table, _column in _TABLES}
    for start in range(0, len(key_ids), _CHUNK):
        chunk = key_ids[start:start + _CHUNK]
        for name, table, column in _TABLES:
            if dry_run:
                counts[name] += session.scalar(select(func.count()).select_from(table).where(column.in_(chunk)))
            else:
                counts[name] += session.execute(
                    delete(table).where(column.in_(chunk)).execution_options(synchronize_session=False)).rowcount
    return counts
