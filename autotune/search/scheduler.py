"""Tuning a list of problems with other workers: each problem is claimed in the database by one worker at a time.

A problem another worker holds is come back to until it is done: if that worker dies, its claim stops getting
heartbeats, goes stale after $AUTOTUNE_CLAIM_TTL seconds and is taken over here, so every problem gets tuned once.
The scheduler hands out turns (`claimed_problems`); the command searches each problem it is handed
(`autotune/cli/search.py`). Nothing here knows about the command line or the search itself.
"""
from __future__ import annotations

import contextlib
import enum
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

from autotune.heartbeat import Heartbeat
from autotune.keys import make_key
from autotune.kernel_protocol import KernelModule
from autotune.options import SearchOptions
from autotune.shapes import ProblemSpec


def claim_name(kernel: KernelModule, spec: ProblemSpec, device, options: SearchOptions) -> str:
    """The claim of one problem of a list: its key's digest with the sampler and budget (another budget is another
    job)."""
    return f"shape:{make_key(kernel, spec.problem, device).digest()}:{options.sampler}:{options.trials}"


@contextlib.contextmanager
def claimed(store, name: str | None, owner: str, ttl_s: float = 60.0, beat_s: float = 10.0) -> Iterator[bool]:
    """Hold a claim on one problem of a shapes list while it is tuned, with heartbeats; no claim for one problem.

    Yields whether this worker holds it. A claim whose heartbeat is older than `ttl_s` is stale (its worker died)
    and may be taken over; the claim is released as done only when the body finished without an error."""
    if name is None:
        yield True
        return
    if store.claim_done(name) or not store.try_claim(name, owner, ttl_s=ttl_s):
        yield False
        return

    def beat() -> None:
        with contextlib.suppress(Exception):
            store.heartbeat_claim(name, owner)

    done = False
    try:
        with Heartbeat(beat_s, beat, name="claim-heartbeat"):
            yield True
            done = True
    finally:
        with contextlib.suppress(Exception):
            store.release_claim(name, owner, done=done)


class TurnKind(enum.Enum):
    """What the scheduler hands the command for one problem."""

    TUNE = "tune"  # this worker holds the problem's claim until it asks for the next turn: search it now
    HELD = "held"  # another worker holds it (said once per problem; it is come back to until done)
    OUT_OF_TIME = "out_of_time"  # the list's time ran out: the remaining problems are left for a later run


@dataclass(frozen=True)
class Turn:
    """One problem of the list (for OUT_OF_TIME, the one that was next), and the seconds left for it."""

    kind: TurnKind
    index: int
    spec: ProblemSpec
    remaining_s: float | None = None


@dataclass(frozen=True)
class ClaimTimings:
    """How long a claim lives without a heartbeat (then another worker takes it over), and how often it beats."""

    ttl_s: float = 60.0
    beat_s: float = 10.0


def claimed_problems(specs: Sequence[ProblemSpec], claim_names: Sequence[str | None], *, store, owner: str,
                     timings: ClaimTimings = ClaimTimings(), timeout_s: float | None = None,
                     clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                     ) -> Iterator[Turn]:
    """Every problem of the list, tuned once over all workers: a TUNE turn while this worker holds its claim.

    The claim is released as done when the caller asks for the next turn (a problem whose candidates all failed is
    done too), and released not done when the caller stops with an error: close the generator (contextlib.closing)
    so that happens at once. `claim_names[i]` names problem i's claim (None: no claim, a list of one problem).
    """
    started = clock()
    pending = list(enumerate(specs))
    told: set[int] = set()
    while pending:
        held = []
        for index, spec in pending:
            remaining = None if timeout_s is None else timeout_s - (clock() - started)
            if remaining is not None and remaining <= 0:
                yield Turn(TurnKind.OUT_OF_TIME, index, spec)
                return
            claim = claim_names[index]
            with claimed(store, claim, owner, timings.ttl_s, timings.beat_s) as mine:
                if mine:
                    yield Turn(TurnKind.TUNE, index, spec, remaining)
                    continue
                if not store.claim_done(claim):
                    held.append((index, spec))
                if index not in told:
                    told.add(index)
                    yield Turn(TurnKind.HELD, index, spec, remaining)
        pending = held
        if pending:
            sleep(min(5.0, timings.beat_s))
