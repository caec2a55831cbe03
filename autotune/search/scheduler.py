"""Tuning a list of problems with other workers: each problem is claimed in the database by one worker at a time.

A problem another worker holds is come back to until it is done: if that worker dies, its claim stops getting
heartbeats, goes stale after $AUTOTUNE_CLAIM_TTL seconds and is taken over here, so every problem gets tuned once.
Nothing here knows about the command line; `autotune search` (autotune/cli/search.py) drives it.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

from autotune.search.heartbeat import Heartbeat
from autotune.keys import make_key
from autotune.kernel_protocol import KernelModule
from autotune.options import SearchOptions
from autotune.search.retime import AllCandidatesFailed
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


@dataclass
class ScheduleReport:
    """What a worker did with a list: the results of the problems it tuned, the failures, and whether time ran out
    before the list was done."""

    results: list = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    out_of_time: bool = False


def tune_list(specs: Sequence[ProblemSpec], *, store, owner: str, claim_ttl_s: float, claim_beat_s: float,
              options_for: Callable[[ProblemSpec, float | None], SearchOptions],
              tune: Callable[[ProblemSpec, SearchOptions], Any],
              claim_for: Callable[[ProblemSpec, SearchOptions], str] | None,
              timeout_s: float | None = None, on_skip: Callable[[int], None] = lambda index: None,
              clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
              ) -> ScheduleReport:
    """Tune every problem of the list once over all workers.

    `options_for(spec, remaining_s)` gives a problem's options with the time left; `tune(spec, options)` searches
    it (AllCandidatesFailed is a failure of that problem, not of the list); `claim_for` names a problem's claim
    (None: no claims, one problem). `on_skip(index)` is told once per problem first found held by another worker.
    """
    report = ScheduleReport()
    started = clock()
    pending = list(enumerate(specs))
    told: set[int] = set()
    while pending:
        held = []
        for index, spec in pending:
            remaining = None if timeout_s is None else timeout_s - (clock() - started)
            if remaining is not None and remaining <= 0:
                report.out_of_time = True
                return report
            options = options_for(spec, remaining)
            claim = claim_for(spec, options) if claim_for is not None else None
            with claimed(store, claim, owner, claim_ttl_s, claim_beat_s) as mine:
                if not mine:
                    if not store.claim_done(claim):
                        held.append((index, spec))
                    if index not in told:
                        told.add(index)
                        on_skip(index)
                    continue
                try:
                    report.results.append(tune(spec, options))
                except AllCandidatesFailed as exc:
                    report.failures.append(str(exc))
        pending = held
        if pending:
            sleep(min(5.0, claim_beat_s))
    return report
