"""Many workers on one results database, and surviving their crashes: the settings and the error messages.

Workers find each other only through the database: an Optuna study per tuning key (trials carry heartbeats, so a
worker that dies in the middle of a trial has that trial failed by whoever looks next), and a claim per problem of a
shapes list (with its own heartbeat, so a dead worker's problem is taken over). The timings below can be changed
through the environment, mostly so that tests need not wait for the production values:

  AUTOTUNE_DB_BUSY_TIMEOUT     seconds an SQLite writer waits for another process's lock (default 60)
  AUTOTUNE_HEARTBEAT_INTERVAL  seconds between the heartbeats of a running trial (default 5)
  AUTOTUNE_HEARTBEAT_GRACE     seconds without a heartbeat after which a running trial is failed (default 4
                               heartbeat intervals: 20)
  AUTOTUNE_CLAIM_TTL           seconds without a heartbeat after which a problem's claim is taken over (default 60)
"""
from __future__ import annotations

import os
from dataclasses import dataclass

BUSY_TIMEOUT = "AUTOTUNE_DB_BUSY_TIMEOUT"
HEARTBEAT_INTERVAL = "AUTOTUNE_HEARTBEAT_INTERVAL"
HEARTBEAT_GRACE = "AUTOTUNE_HEARTBEAT_GRACE"
CLAIM_TTL = "AUTOTUNE_CLAIM_TTL"


@dataclass(frozen=True)
class WorkerSettings:
    busy_timeout_s: float = 60.0
    heartbeat_interval_s: int = 5
    grace_period_s: int = 20
    claim_ttl_s: float = 60.0

    @property
    def claim_beat_s(self) -> float:
        """How often a held claim is refreshed: several times per TTL, so one slow write cannot lose it."""
        return max(0.2, self.claim_ttl_s / 6)


def _number(name: str, default: float, *, integer: bool) -> float:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        kind = "a whole number of seconds" if integer else "a number of seconds"
        raise ValueError(f"${name} must be {kind}, got {text!r}") from None
    if not value > 0:
        raise ValueError(f"${name} must be positive, got {text!r}")
    return value


def settings() -> WorkerSettings:
    """The settings from the environment; ValueError naming the variable when one is malformed."""
    interval = int(_number(HEARTBEAT_INTERVAL, 5, integer=True))
    grace = int(_number(HEARTBEAT_GRACE, 4 * interval, integer=True))
    if grace <= interval:
        raise ValueError(f"${HEARTBEAT_GRACE} ({grace}) must be longer than ${HEARTBEAT_INTERVAL} ({interval}), "
                         "or live trials would be failed between two heartbeats")
    return WorkerSettings(busy_timeout_s=_number(BUSY_TIMEOUT, 60.0, integer=False), heartbeat_interval_s=interval,
                          grace_period_s=grace, claim_ttl_s=_number(CLAIM_TTL, 60.0, integer=False))


def describe_database_error(exc: BaseException, where: str) -> str:
    """One clear sentence for a database failure in the middle of a search (locked, read-only, full, dropped)."""
    reason = exc
    for _ in range(5):  # Optuna wraps driver errors (StorageInternalError from sqlalchemy's from the driver's)
        inner = getattr(reason, "orig", None) or reason.__cause__
        if inner is None or inner is reason:
            break
        reason = inner
    text = (str(reason).strip().splitlines() or [type(reason).__name__])[0]
    lowered = f"{text} {exc}".lower()
    if "locked" in lowered:
        what = (f"it stayed locked by another process for longer than the busy timeout "
                f"({settings().busy_timeout_s:g} s; ${BUSY_TIMEOUT} changes it)")
    elif "readonly" in lowered or "read-only" in lowered or "read only" in lowered:
        what = f"it is read-only ({text})"
    elif "disk is full" in lowered or "no space left" in lowered or "disk full" in lowered:
        what = f"the disk is full ({text})"
    elif any(s in lowered for s in ("terminating connection", "server closed the connection", "connection refused",
                                    "connection failed", "connection is closed", "consuming input failed",
                                    "the connection is lost", "no such file or directory", "could not connect",
                                    "not currently accepting connections", "can't reconnect until invalid")):
        if "can't reconnect until invalid" in lowered:  # SQLAlchemy's words for a session whose connection died
            text = "the server closed a connection in the middle of a transaction"
        what = f"the connection to the database server was lost ({text})"
    else:
        what = f"it failed: {text}"
    return (f"the results database {where} cannot be used: {what}. Every trial recorded before this is kept; "
            "run the same command again to resume.")


def explain_open_failure(url: str, message: str) -> str:
    """`message` (why a database could not be opened), with the likely cause when SQLite's own words hide it: a
    read-only file, directory or filesystem ("unable to open database file") or a full disk ("disk I/O error")."""
    from db.urls import sqlite_file

    try:
        path = sqlite_file(url)
    except Exception:  # noqa: BLE001 - an unparsable URL has its own message already
        return message
    if path is None or not path.exists():
        return message
    import shutil

    folder = path.parent
    if not os.access(path, os.W_OK) or not os.access(folder, os.W_OK):
        what = path if not os.access(path, os.W_OK) else folder
        return (f"{message} (the database is read-only: {what} cannot be written, and SQLite needs to write both "
                "the file and its directory, for its journal)")
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return message
    if free < 1 << 20:
        return f"{message} (the disk is full: {free} bytes free on the filesystem of {folder})"
    return message
