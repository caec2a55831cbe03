"""Worker claims: at most one worker tunes a given shape at a time in a multi-worker `--shapes` run.

A claim is a row named after the shape (its key digest). Taking one is a single conditional UPDATE ("free, mine
already, or stale") followed by an INSERT when no row exists; the database serialises concurrent writers, and a
concurrent INSERT of the same name fails on the primary key and is retried by the caller, so two workers never both
get the claim. Times come from the workers' clocks: hosts sharing a server database need synchronised clocks (NTP).
"""
from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import case, delete, false, or_, select, update
from sqlalchemy.orm import Session

from db.schema import ClaimRow

_NO_SYNC = {"synchronize_session": False}


def try_claim(session: Session, name: str, owner: str, ttl_s: float, now: datetime) -> bool:
    """Take the claim if it is free, already ours, or its heartbeat is older than `ttl_s`; never once done."""
    stale_before = now - timedelta(seconds=ttl_s)
    taken = session.execute(
        update(ClaimRow)
        .where(ClaimRow.name == name, ClaimRow.done == false(),
               or_(ClaimRow.owner == owner, ClaimRow.heartbeat_at < stale_before))
        .values(owner=owner, heartbeat_at=now,
                claimed_at=case((ClaimRow.owner == owner, ClaimRow.claimed_at), else_=now))
        .execution_options(**_NO_SYNC))
    if taken.rowcount:
        return True
    if session.scalar(select(ClaimRow.name).where(ClaimRow.name == name)) is not None:
        return False  # held by a live worker, or done
    session.add(ClaimRow(name=name, owner=owner, claimed_at=now, heartbeat_at=now, done=False))
    session.flush()  # a racing INSERT of the same name raises IntegrityError here; the caller retries
    return True


def heartbeat(session: Session, name: str, owner: str, now: datetime) -> bool:
    """Refresh our claim; False when it is no longer ours (taken over after going stale, or released)."""
    result = session.execute(
        update(ClaimRow).where(ClaimRow.name == name, ClaimRow.owner == owner, ClaimRow.done == false())
        .values(heartbeat_at=now).execution_options(**_NO_SYNC))
    return bool(result.rowcount)


def release(session: Session, name: str, owner: str, done: bool, now: datetime) -> None:
    """Give the claim up; `done` marks the shape finished for good, whoever holds the claim by now."""
    if not done:
        session.execute(delete(ClaimRow).where(ClaimRow.name == name, ClaimRow.owner == owner,
                                               ClaimRow.done == false()).execution_options(**_NO_SYNC))
        return
    marked = session.execute(update(ClaimRow).where(ClaimRow.name == name)
                             .values(owner=owner, heartbeat_at=now, done=True).execution_options(**_NO_SYNC))
    if not marked.rowcount:
        session.add(ClaimRow(name=name, owner=owner, claimed_at=now, heartbeat_at=now, done=True))
        session.flush()


def is_done(session: Session, name: str) -> bool:
    """Whether the shape was marked finished."""
    return bool(session.scalar(select(ClaimRow.done).where(ClaimRow.name == name)))
