"""Search runs and their liveness: a run that was killed (SIGKILL, a lost machine) must not stay `running` for ever.

A running search holds a claim named `run:<id>` (the claims table already has owner and heartbeat columns, so no
schema change is needed) and refreshes its heartbeat while it works. A run whose heartbeat is older than the
caller's limit is marked `crashed`, with the time it was last seen alive as its end. Runs written before runs had
heartbeats are judged by their start time.

A run also names its process as the claim's owner (Linux: boot id, pid namespace, pid and the process's start time),
so a search started on the same machine right after a kill sees that the process is gone and marks the run crashed at
once, instead of after the heartbeat limit. A reused pid has another start time; on other systems, or for a run of
another machine, only the heartbeat counts.
"""
from __future__ import annotations

import os
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import delete, false, select, update
from sqlalchemy.orm import Session

from db.records import RunRecord
from db.schema import ClaimRow, RunRow

_NO_SYNC = {"synchronize_session": False}


def claim_name(run_id: int) -> str:
    """The claim a running run holds (shape claims are named `shape:...`, so the names never collide)."""
    return f"run:{run_id}"


PROCESS_PREFIX = "process"


def _machine() -> str | None:
    """This machine and pid namespace (pids mean the same process only within both), or None off Linux."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
    return f"{boot}/{namespace}"


def _started_ticks(pid: int) -> str | None:
    """The process's start time since boot (clock ticks) while it lives; None once it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (name) ": state is field 3, start time field 22
    return None if fields[0] in ("Z", "X") else fields[19]


def this_process() -> str | None:
    """The owner a run's claim names: this process on this machine, or None where that cannot be told."""
    machine, ticks = _machine(), _started_ticks(os.getpid())
    return None if machine is None or ticks is None else f"{PROCESS_PREFIX}:{machine}:{os.getpid()}:{ticks}"


def gone_pid(owner: str | None) -> int | None:
    """The pid of a run's process when it ran on this machine and is gone (no such process, or another one that
    started later under the same pid); None when it lives, or when this cannot be told here."""
    if not owner or not owner.startswith(PROCESS_PREFIX + ":"):
        return None
    machine, pid, ticks = owner[len(PROCESS_PREFIX) + 1:].rsplit(":", 2)
    if machine != _machine() or not pid.isdigit():
        return None
    return None if _started_ticks(int(pid)) == ticks else int(pid)


def start(session: Session, values: dict[str, Any], now: datetime) -> int:
    row = RunRow(**values, started_at=now, ended_at=None, status="running", message="")
    session.add(row)
    session.flush()
    name = claim_name(row.id)
    session.add(ClaimRow(name=name, owner=this_process() or name, claimed_at=now, heartbeat_at=now, done=False))
    session.flush()
    return row.id


def beat(session: Session, run_id: int, now: datetime) -> bool:
    """Refresh the run's heartbeat; False when the run is not running any more (finished, or marked crashed)."""
    result = session.execute(update(ClaimRow).where(ClaimRow.name == claim_name(run_id), ClaimRow.done == false())
                             .values(heartbeat_at=now).execution_options(**_NO_SYNC))
    return bool(result.rowcount)


def finish(session: Session, run_id: int, status: str, message: str, now: datetime) -> None:
    result = session.execute(update(RunRow).where(RunRow.id == run_id)
                             .values(status=status, message=message, ended_at=now).execution_options(**_NO_SYNC))
    if not result.rowcount:
        raise ValueError(f"run_id {run_id} is not a run in this database")
    session.execute(delete(ClaimRow).where(ClaimRow.name == claim_name(run_id)).execution_options(**_NO_SYNC))


def mark_crashed(session: Session, stale_after_s: float, now: datetime) -> list[int]:
    """Mark `crashed` every running run whose process on this machine is gone, or whose heartbeat (or, without one,
    start) is older than `stale_after_s`."""
    cutoff = now - timedelta(seconds=stale_after_s)
    running = session.execute(select(RunRow.id, RunRow.started_at).where(RunRow.status == "running")).all()
    if not running:
        return []
    names = [claim_name(run_id) for run_id, _started in running]
    claims = {name: (beat, owner) for name, beat, owner in session.execute(
        select(ClaimRow.name, ClaimRow.heartbeat_at, ClaimRow.owner).where(ClaimRow.name.in_(names))).all()}
    crashed = []
    for run_id, started_at in running:
        last_seen, owner = claims.get(claim_name(run_id), (started_at, None))
        pid = gone_pid(owner)
        if pid is not None:
            message = (f"its process (pid {pid} on this machine) is gone since its last heartbeat at "
                       f"{last_seen:%Y-%m-%d %H:%M:%S} UTC: the search was killed")
        elif last_seen >= cutoff:
            continue
        else:
            message = (f"no heartbeat since {last_seen:%Y-%m-%d %H:%M:%S} UTC: the search was killed or its machine "
                       "was lost")
        marked = session.execute(update(RunRow).where(RunRow.id == run_id, RunRow.status == "running")
                                 .values(status="crashed", ended_at=last_seen, message=message)
                                 .execution_options(**_NO_SYNC))
        session.execute(delete(ClaimRow).where(ClaimRow.name == claim_name(run_id)).execution_options(**_NO_SYNC))
        if marked.rowcount:
            crashed.append(run_id)
    return crashed


def run_record(row: RunRow) -> RunRecord:
    return RunRecord(id=row.id, host=row.host, device_kind=row.device_kind, platform=row.platform,
                     jax_version=row.jax_version, arguments=row.arguments, started_at=row.started_at,
                     ended_at=row.ended_at, status=row.status, message=row.message)
