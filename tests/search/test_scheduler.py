"""The shapes-list scheduler without click: claims taken one worker at a time, held problems come back to, stale
claims taken over, failures kept apart, time running out; and the one heartbeat helper both claims and trials use."""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field

import pytest

from autotune.heartbeat import Heartbeat
from autotune.search.retime import AllCandidatesFailed
from autotune.search.scheduler import ClaimTimings, TurnKind, claimed, claimed_problems
from autotune.shapes import spec_from_fields

SPECS = [spec_from_fields({"batch": b, "seq_len": 32, "heads": 1, "head_dim": 16}) for b in (1, 2, 3)]
CLAIMS = [f"shape:test-{spec.problem.batch}" for spec in SPECS]


@dataclass
class Report:
    results: list = field(default_factory=list)
    failures: list = field(default_factory=list)
    held: list = field(default_factory=list)
    out_of_time: bool = False


def run(store, tune, *, timeout_s=None, clock=None, sleep=lambda s: None, ttl_s=60.0) -> Report:
    """Drive the scheduler as `autotune search` does: `tune(spec, remaining_s)` for each turn this worker holds."""
    report = Report()
    kw = {} if clock is None else {"clock": clock}
    turns = claimed_problems(SPECS, CLAIMS, store=store, owner="me", timings=ClaimTimings(ttl_s, 0.05),
                             timeout_s=timeout_s, sleep=sleep, **kw)
    with contextlib.closing(turns):
        for turn in turns:
            if turn.kind is TurnKind.HELD:
                report.held.append(turn.index)
            elif turn.kind is TurnKind.OUT_OF_TIME:
                report.out_of_time = True
            else:
                try:
                    report.results.append(tune(turn.spec, turn.remaining_s))
                except AllCandidatesFailed as exc:
                    report.failures.append(str(exc))
    return report


def test_every_problem_is_tuned_once_and_marked_done(store):
    tuned = []
    report = run(store, lambda spec, remaining: tuned.append(spec.problem.batch) or spec.problem.batch)
    assert tuned == [1, 2, 3] and report.results == [1, 2, 3] and not report.failures and not report.out_of_time
    assert all(store.claim_done(claim) for claim in CLAIMS)
    again = run(store, lambda spec, remaining: pytest.fail("a done problem was tuned again"))
    assert again.results == []


def test_a_problem_held_by_a_live_worker_is_come_back_to_until_done(store):
    held = CLAIMS[1]
    assert store.try_claim(held, "other", ttl_s=60.0)
    rounds = []

    def sleep(_seconds):  # the other worker finishes its problem while this one waits
        rounds.append(1)
        store.release_claim(held, "other", done=True)

    report = run(store, lambda spec, remaining: spec.problem.batch, sleep=sleep)
    assert report.results == [1, 3] and report.held == [1] and len(rounds) == 1


def test_a_stale_claim_is_taken_over(store):
    assert store.try_claim(CLAIMS[0], "dead worker", ttl_s=60.0)
    report = run(store, lambda spec, remaining: spec.problem.batch, ttl_s=0.0)
    assert report.results == [1, 2, 3]


def test_a_problem_whose_candidates_all_fail_is_a_failure_and_the_rest_go_on(store):
    def tune(spec, remaining):
        if spec.problem.batch == 2:
            raise AllCandidatesFailed("every candidate failed for problem 2")
        return spec.problem.batch

    report = run(store, tune)
    assert report.results == [1, 3] and report.failures == ["every candidate failed for problem 2"]


def test_time_running_out_stops_before_the_next_problem(store):
    now = [0.0]

    def tune(spec, remaining):
        assert remaining == pytest.approx(10.0 - now[0])
        now[0] += 6.0
        return spec.problem.batch

    report = run(store, tune, timeout_s=10.0, clock=lambda: now[0])
    assert report.results == [1, 2] and report.out_of_time


def test_a_claim_is_kept_alive_while_held_and_released_not_done_on_an_error(store):
    beats = []
    original = store.heartbeat_claim
    store.heartbeat_claim = lambda name, owner: beats.append(name) or original(name, owner)
    with pytest.raises(KeyboardInterrupt):
        with claimed(store, "shape:x", "me", ttl_s=60.0, beat_s=0.01) as mine:
            assert mine
            threading.Event().wait(0.2)
            raise KeyboardInterrupt
    assert beats and not store.claim_done("shape:x")
    with claimed(store, "shape:x", "other", ttl_s=60.0) as mine:  # released: another worker may take it
        assert mine


def test_heartbeat_ticks_and_kicks():
    ticks, kicks = threading.Semaphore(0), threading.Semaphore(0)
    beat = Heartbeat(0.05, ticks.release, kicks.release).start()
    try:
        assert ticks.acquire(timeout=5) and ticks.acquire(timeout=5)
        beat.kick()
        assert kicks.acquire(timeout=5)
    finally:
        beat.stop()
    beat._thread.join(timeout=5)
    assert not beat._thread.is_alive()


def test_a_turn_ended_by_an_error_releases_its_claim_not_done(store):
    turns = claimed_problems(SPECS, CLAIMS, store=store, owner="me", timings=ClaimTimings(60.0, 0.05))
    with pytest.raises(KeyboardInterrupt), contextlib.closing(turns):
        for turn in turns:
            assert turn.kind is TurnKind.TUNE and not store.try_claim(CLAIMS[0], "other", ttl_s=60.0)
            raise KeyboardInterrupt
    assert not store.claim_done(CLAIMS[0]) and store.try_claim(CLAIMS[0], "other", ttl_s=60.0)
