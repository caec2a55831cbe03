"""The shapes-list scheduler without click: claims taken one worker at a time, held problems come back to, stale
claims taken over, failures kept apart, time running out; and the one heartbeat helper both claims and trials use."""
from __future__ import annotations

import threading

import pytest

from autotune.search.heartbeat import Heartbeat
from autotune.options import SearchOptions
from autotune.search.retime import AllCandidatesFailed
from autotune.search.scheduler import claimed, tune_list
from autotune.shapes import spec_from_fields

SPECS = [spec_from_fields({"batch": b, "seq_len": 32, "heads": 1, "head_dim": 16}) for b in (1, 2, 3)]



def claim_of(spec, options) -> str:
    return f"shape:test-{spec.problem.batch}:{options.trials}"


def run(store, tune, **kw):
    defaults = dict(store=store, owner="me", claim_ttl_s=60.0, claim_beat_s=0.05,
                    options_for=lambda spec, remaining: SearchOptions(trials=3, timeout_s=remaining),
                    tune=tune, claim_for=claim_of, sleep=lambda s: None)
    return tune_list(SPECS, **{**defaults, **kw})


def test_every_problem_is_tuned_once_and_marked_done(store):
    tuned = []
    report = run(store, lambda spec, options: tuned.append(spec.problem.batch) or spec.problem.batch)
    assert tuned == [1, 2, 3] and report.results == [1, 2, 3] and not report.failures and not report.out_of_time
    assert all(store.claim_done(claim_of(spec, SearchOptions(trials=3))) for spec in SPECS)
    again = run(store, lambda spec, options: pytest.fail("a done problem was tuned again"))
    assert again.results == []


def test_a_problem_held_by_a_live_worker_is_come_back_to_until_done(store):
    held = claim_of(SPECS[1], SearchOptions(trials=3))
    assert store.try_claim(held, "other", ttl_s=60.0)
    skipped, rounds = [], []

    def sleep(_seconds):  # the other worker finishes its problem while this one waits
        rounds.append(1)
        store.release_claim(held, "other", done=True)

    report = run(store, lambda spec, options: spec.problem.batch, on_skip=skipped.append, sleep=sleep)
    assert report.results == [1, 3] and skipped == [1] and len(rounds) == 1


def test_a_stale_claim_is_taken_over(store):
    stale = claim_of(SPECS[0], SearchOptions(trials=3))
    assert store.try_claim(stale, "dead worker", ttl_s=60.0)
    report = run(store, lambda spec, options: spec.problem.batch, claim_ttl_s=0.0)
    assert report.results == [1, 2, 3]


def test_a_problem_whose_candidates_all_fail_is_a_failure_and_the_rest_go_on(store):
    def tune(spec, options):
        if spec.problem.batch == 2:
            raise AllCandidatesFailed("every candidate failed for problem 2")
        return spec.problem.batch

    report = run(store, tune)
    assert report.results == [1, 3] and report.failures == ["every candidate failed for problem 2"]


def test_time_running_out_stops_before_the_next_problem(store):
    now = [0.0]

    def tune(spec, options):
        assert options.timeout_s == pytest.approx(10.0 - now[0])
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
