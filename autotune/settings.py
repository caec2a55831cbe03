"""The `AUTOTUNE_*` environment variables, read in this one place; a malformed one is a ValueError naming it.

Workers find each other only through the database: an Optuna study per tuning key (trials carry heartbeats, so a
worker that dies in the middle of a trial has that trial failed by whoever looks next), and a claim per problem of a
shapes list (with its own heartbeat, so a dead worker's problem is taken over). The timings below can be changed
through the environment, mostly so that tests need not wait for the production values:

  AUTOTUNE_DB_BUSY_TIMEOUT     seconds an SQLite writer waits for another process's lock (default 60)
  AUTOTUNE_HEARTBEAT_INTERVAL  seconds between the heartbeats of a running trial (default 5)
  AUTOTUNE_HEARTBEAT_GRACE     seconds without a heartbeat after which a running trial is failed (default 4
                               heartbeat intervals: 20)
  AUTOTUNE_CLAIM_TTL           seconds without a heartbeat after which a problem's claim is taken over (default 60)

The runtime's defaults (`autotune.configure` overrides them):

  AUTOTUNE_ON_MISS             what a lookup does on a miss: heuristic, nearest, error or tune (default heuristic)
  AUTOTUNE_TUNE_TRIALS         trials of the short search `tune` runs on a miss (default 8)

`AUTOTUNE_DB` (the default database) is read by db/urls.py, since db/ never imports autotune/; its errors name it
too. The README's table lists them all. And one switch of the runtime:

  AUTOTUNE_VERBOSE             1 prints, when a function is traced, which config each kernel call runs and where
                               it came from (default 0; `autotune.configure(verbose=...)` overrides it)
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

BUSY_TIMEOUT = "AUTOTUNE_DB_BUSY_TIMEOUT"
HEARTBEAT_INTERVAL = "AUTOTUNE_HEARTBEAT_INTERVAL"
HEARTBEAT_GRACE = "AUTOTUNE_HEARTBEAT_GRACE"
CLAIM_TTL = "AUTOTUNE_CLAIM_TTL"
ON_MISS = "AUTOTUNE_ON_MISS"
TUNE_TRIALS = "AUTOTUNE_TUNE_TRIALS"
MISS_POLICIES = ("heuristic", "nearest", "error", "tune")
DEFAULT_TUNE_TRIALS = 8
MAX_TRIALS = 1_000_000  # per study: far beyond any search space, and within every counter's range
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


def miss_policy() -> str | None:
    """$AUTOTUNE_ON_MISS, or None when it is not set (the default policy then applies)."""
    text = os.environ.get(ON_MISS, "").strip()
    if text and text not in MISS_POLICIES:
        raise ValueError(f"${ON_MISS} must be one of {', '.join(MISS_POLICIES)}, got {text!r}")
    return text or None


def tune_trials() -> int:
    """$AUTOTUNE_TUNE_TRIALS: the trials of the short search the `tune` policy runs on a miss (default 8)."""
    text = os.environ.get(TUNE_TRIALS, "").strip()
    if not text:
        return DEFAULT_TUNE_TRIALS
    if not re.fullmatch(r"[0-9]{1,7}", text) or not 1 <= int(text) <= MAX_TRIALS:
        raise ValueError(f"${TUNE_TRIALS} must be a whole number of trials from 1 to {MAX_TRIALS}, got {text!r}")
    return int(text)
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def verbose() -> bool:
    """$AUTOTUNE_VERBOSE as a switch (1/true/yes/on or 0/false/no/off; unset: off); ValueError naming it otherwise."""
    text = os.environ.get(VERBOSE, "").strip().lower()
    if text not in _TRUE + _FALSE:
        raise ValueError(f"${VERBOSE} must be 1 or 0 (true/false, yes/no, on/off), got {os.environ[VERBOSE]!r}")
    return text in _TRUE
