"""Keep the faster: merging one offered best into its key's row, inside a transaction the store opens.

"Faster" is a conditional UPDATE (`... WHERE time_s > new`) plus an INSERT that the unique key_id guards, compared
again when a row appears between the two statements (PostgreSQL's read committed), so concurrent writers can never
both win or overwrite a faster result. A stored best that cannot be used (a config the kernel refuses, by the
caller's `ConfigCheck`, or a time no device can measure, from an older version or a hand edit) never blocks a
better one: it is replaced by any offer, and only if it is still the row that was judged.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.orm import Session

from db.records import KERNEL_IMPLEMENTATION, BestOffer, BestRecord, ConfigCheck, TuningKey, check_winner
from db.schema import BestRow, KeyRow, RunRow
from db.validation import is_physical_time, utc_now

log = logging.getLogger(__name__)


# Statements built once with bound parameters: building one per offer (literal values, a new cache key each time)
# cost more than running it, and a large import runs thousands.
_FIND_KEY = select(KeyRow.id).where(KeyRow.digest == bindparam("p_digest"))
_ADD_KEY = insert(KeyRow).returning(KeyRow.id)
_BEST_VALUES = {name: bindparam(f"p_{name}") for name in
                ("config", "time_s", "default_time_s", "trials", "run_id", "updated_at", "implementation", "times")}
_REPLACE_SLOWER = (update(BestRow).where(BestRow.key_id == bindparam("p_key_id"),
                                         BestRow.time_s > bindparam("p_time_s")).values(**_BEST_VALUES))
_FIND_BEST = select(BestRow.id, BestRow.time_s, BestRow.config).where(BestRow.key_id == bindparam("p_key_id"))
_ADD_BEST = insert(BestRow).values(key_id=bindparam("p_key_id"), **_BEST_VALUES)
_COUNT_TRIALS = (update(BestRow).where(BestRow.id == bindparam("p_best_id"), BestRow.trials < bindparam("p_trials"))
                 .values(trials=bindparam("p_trials")))
_REPLACE_JUDGED = (update(BestRow).where(BestRow.id == bindparam("p_best_id"),
                                         BestRow.time_s == bindparam("p_judged_time_s")).values(**_BEST_VALUES))


def key_row_id(session: Session, key: TuningKey) -> int:
    """The id of the key's row, inserting it if new (a racing insert fails on the unique digest; the store retries)."""
    if not isinstance(key, TuningKey):
        raise ValueError(f"key must be a TuningKey, got {type(key).__name__}")
    connection = session.connection()
    digest = key.digest()
    key_id = connection.execute(_FIND_KEY, {"p_digest": digest}).scalar()
    if key_id is None:
        key_id = connection.execute(_ADD_KEY, {"digest": digest, "created_at": utc_now(), **key.to_dict()}).scalar_one()
    return key_id


def require_run(session: Session, run_id: int | None) -> None:
    if run_id is not None and session.get(RunRow, run_id) is None:
        raise ValueError(f"run_id {run_id} is not a run in this database")


def offer_best(session: Session, offer: BestOffer, now: datetime, check: ConfigCheck | None) -> bool:
    """Store the offer as its key's best if it is faster than the stored one, or the stored one is unusable."""
    require_run(session, offer.run_id)
    connection = session.connection()
    key_id = key_row_id(session, offer.key)
    values = {"p_config": offer.config, "p_time_s": offer.time_s, "p_default_time_s": offer.default_time_s,
              "p_trials": offer.trials, "p_run_id": offer.run_id, "p_updated_at": offer.updated_at or now,
              "p_key_id": key_id, "p_implementation": offer.implementation, "p_times": offer.times}
    while True:
        if connection.execute(_REPLACE_SLOWER, values).rowcount:
            return True
        stored = connection.execute(_FIND_BEST, {"p_key_id": key_id}).first()
        if stored is None:  # a racing first insert for this key fails here on the unique key_id; retried
            connection.execute(_ADD_BEST, values)
            return True
        if stored.time_s > offer.time_s:
            continue  # committed by another writer after our UPDATE looked (PostgreSQL read committed): again
        if usable(offer.key, stored.time_s, stored.config, check):
            # the stored best is at least as fast, and it can run; the study behind it has grown, though
            connection.execute(_COUNT_TRIALS, {"p_best_id": stored.id, "p_trials": offer.trials})
            return False
        log.info("replacing the unusable stored best of key %s", offer.key.digest())
        if connection.execute(_REPLACE_JUDGED, {**values, "p_best_id": stored.id,
                                                "p_judged_time_s": stored.time_s}).rowcount:
            return True
        # another writer changed the row meanwhile: judge the new one


def usable(key: TuningKey, time_s: Any, config: Any, check: ConfigCheck | None) -> bool:
    """Whether a stored best could be used: a measurable time, a JSON object config, and one `check` accepts."""
    if not is_physical_time(time_s) or not isinstance(config, Mapping):
        return False
    if check is None:
        return True
    try:
        check(key, config)
    except (ValueError, TypeError) as exc:
        log.info("stored config %s of key %s cannot run: %s", config, key.digest(), exc)
        return False
    return True


def best_record(row: BestRow, key: TuningKey) -> BestRecord:
    """A row as a record; the speedup only when both times are measurable (never infinite, never NaN)."""
    speedup = None
    if is_physical_time(row.time_s) and is_physical_time(row.default_time_s):
        speedup = row.default_time_s / row.time_s
    implementation, times = stored_winner(row)
    return BestRecord(id=row.id, key=key, config=row.config, time_s=row.time_s, default_time_s=row.default_time_s,
                      speedup=speedup if speedup is not None and math.isfinite(speedup) else None,
                      trials=row.trials, run_id=row.run_id, updated_at=row.updated_at,
                      implementation=implementation, times=times)


def stored_winner(row: BestRow) -> tuple[str, dict[str, float]]:
    """The row's winner and times; a row from before version 6 (times NULL) is a kernel win timed alone, and one
    whose winner or times an older version or a hand edit made unreadable reads as that too (with a log line:
    reading never fails on a stored value, and `integrity_check` names the row)."""
    implementation = row.implementation or KERNEL_IMPLEMENTATION
    if row.times is None and implementation == KERNEL_IMPLEMENTATION:
        return implementation, {KERNEL_IMPLEMENTATION: row.time_s}
    try:
        return implementation, check_winner(implementation, row.times, row.time_s)
    except ValueError as exc:
        log.warning("autotune_bests row %s: its winner reads as the kernel's: %s", row.id, exc)
        return KERNEL_IMPLEMENTATION, {KERNEL_IMPLEMENTATION: row.time_s}
