"""The words for a database that fails: one clear sentence instead of a driver's traceback.

A lock held past the busy timeout, a read-only file or directory, a full disk, a server that dropped the
connection: each is named with what to do next. Used by the command line (autotune/cli/common.py).
"""
from __future__ import annotations

import os
import shutil

from autotune.settings import BUSY_TIMEOUT, busy_timeout_s
from db.urls import sqlite_file


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
                f"({busy_timeout_s():g} s; ${BUSY_TIMEOUT} changes it)")
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
    try:
        path = sqlite_file(url)
    except Exception:  # noqa: BLE001 - an unparsable URL has its own message already
        return message
    if path is None or not path.exists():
        return message
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
