"""The settings of workers sharing one results database, read from the environment in this one place.

Workers find each other only through the database: an Optuna study per tuning key (trials carry heartbeats, so a
worker that dies in the middle of a trial has that trial failed by whoever looks next), and a claim per problem of a
shapes list (with its own heartbeat, so a dead worker's problem is taken over). The timings below can be changed
through the environment, mostly so that tests need not wait for the production values:

  AUTOTUNE_DB_BUSY_TIMEOUT     seconds an SQLite writer waits for another process's lock (default 60)
  AUTOTUNE_HEARTBEAT_INTERVAL  seconds between the heartbeats of a running trial (default 5)
  AUTOTUNE_HEARTBEAT_GRACE     seconds without a heartbeat after which a running trial is failed (default 4
                               heartbeat intervals: 20)
  AUTOTUNE_CLAIM_TTL           seconds without a heartbeat after which a problem's claim is taken over (default 60)

and one switch of the runtime:

  AUTOTUNE_VERBOSE             1 prints, when a function is traced, which config each kernel call runs and where
                               it came from (default 0; `autotune.configure(verbose=...)` overrides it)
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

BUSY_TIMEOUT = "AUTOTUNE_DB_BUSY_TIMEOUT"
HEARTBEAT_INTERVAL = "AUTOTUNE_HEARTBEAT_INTERVAL"
HEARTBEAT_GRACE = "AUTOTUNE_HEARTBEAT_GRACE"
CLAIM_TTL = "AUTOTUNE_CLAIM_TTL"
VERBOSE = "AUTOTUNE_VERBOSE"
DEFAULT_BUSY_TIMEOUT_S = 60.0
RUNTIME_BUSY_TIMEOUT_S = 1.0
MAX_SECONDS = 1e6  # about 11.6 days: no wait, lease or heartbeat is longer (and inf or NaN would never end)


@dataclass(frozen=True)
class WorkerSettings:
    busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S
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
    if not (value > 0 and math.isfinite(value) and value <= MAX_SECONDS):
        raise ValueError(f"${name} must be a positive number of seconds up to {MAX_SECONDS:g}, got {text!r}")
    return value


def settings() -> WorkerSettings:
    """The settings from the environment; ValueError naming the variable when one is malformed."""
    interval = int(_number(HEARTBEAT_INTERVAL, 5, integer=True))
    grace = int(_number(HEARTBEAT_GRACE, 4 * interval, integer=True))
    if grace <= interval:
        raise ValueError(f"${HEARTBEAT_GRACE} ({grace}) must be longer than ${HEARTBEAT_INTERVAL} ({interval}), "
                         "or live trials would be failed between two heartbeats")
    return WorkerSettings(busy_timeout_s=busy_timeout_s(), heartbeat_interval_s=interval,
                          grace_period_s=grace, claim_ttl_s=_number(CLAIM_TTL, 60.0, integer=False))


def busy_timeout_s(default: float = DEFAULT_BUSY_TIMEOUT_S) -> float:
    """$AUTOTUNE_DB_BUSY_TIMEOUT, else `default`: how long an SQLite writer waits for another process's lock. The one
    place it is read: the search and the commands wait 60 s by default, the runtime 1 s (`RUNTIME_BUSY_TIMEOUT_S`:
    inference is better served by the heuristic config than by a stalled model)."""
    return _number(BUSY_TIMEOUT, default, integer=False)


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def verbose() -> bool:
    """$AUTOTUNE_VERBOSE as a switch (1/true/yes/on or 0/false/no/off; unset: off); ValueError naming it otherwise."""
    text = os.environ.get(VERBOSE, "").strip().lower()
    if text not in _TRUE + _FALSE:
        raise ValueError(f"${VERBOSE} must be 1 or 0 (true/false, yes/no, on/off), got {os.environ[VERBOSE]!r}")
    return text in _TRUE
