"""How a search ends: every connection it opened closed (the SQLite log folded back into the file), a rerun whose
budget is met answered at once, no trial left looking like a failure that was never evaluated, and a summary that
says what was stored, why, and what to run next."""
from __future__ import annotations

import shutil
import sqlite3
import time

import optuna
import pytest
from click.testing import CliRunner

from autotune.cli.app import main
from autotune.device import current_device
from autotune.search.loop import SearchOptions, search_problem
from autotune.options import TimingPolicy
from db import Store
from db.urls import default_url, display_url
from kernels import Problem

FAST = TimingPolicy(warmup=1, samples=3, min_sample_s=1e-4)
TOY = "tests.toy_kernel"
PROBLEM = Problem(batch=1, q_len=32, kv_len=32, heads=1, kv_heads=1, head_dim=16)


def options(trials: int) -> SearchOptions:
    return SearchOptions(trials=trials, seed=0, timing=FAST, compare_xla=False, retime_top=2)


def test_after_a_search_the_bare_database_file_holds_the_best_and_can_be_locked(tmp_path):
    db = tmp_path / "results.db"
    store = Store(db)
    result = search_problem(PROBLEM, kernel_name=TOY, store=store, device=current_device(), options=options(2),
                            progress=False)
    store.close()
    copy = tmp_path / "copy" / "results.db"
    copy.parent.mkdir()
    shutil.copy(db, copy)  # the file alone, without any -wal or -shm beside it
    with Store(copy) as copied:
        best = copied.get_best(result.key)
    assert best is not None and best.config == result.best_config
    connection = sqlite3.connect(db, timeout=0)
    try:
        connection.execute("BEGIN EXCLUSIVE")  # no connection of the search is left open
        connection.rollback()
    finally:
        connection.close()


def test_a_rerun_whose_budget_is_met_answers_at_once_and_creates_no_trial(tmp_path):
    with Store(tmp_path / "results.db") as store:
        first = search_problem(PROBLEM, kernel_name=TOY, store=store, device=current_device(), options=options(3),
                               progress=False)
        study = optuna.load_study(study_name=first.key.digest(), storage=store.url)
        before = len(study.trials)
        started = time.perf_counter()
        again = search_problem(PROBLEM, kernel_name=TOY, store=store, device=current_device(), options=options(3),
                               progress=False)
        took = time.perf_counter() - started
        after = optuna.load_study(study_name=first.key.digest(), storage=store.url).trials
        recorded = store.trials(first.key)
    assert again.budget_met_before and not first.budget_met_before
    assert again.best_config == first.best_config and again.trials_run == 3 and not again.stored
    assert len(after) == before and len(recorded) == 3
    assert took < first.wall_s  # nothing compiled or timed
    # Nothing in the study reads as a failure that never ran: over-budget trials are not created.
    assert not [t for t in after if t.user_attrs.get("kind") == "over_budget"]
    # (A config asked again while its first trial still ran is set aside as a duplicate: pruned, with a note.)
    assert all(t.state == optuna.trial.TrialState.COMPLETE or (t.state == optuna.trial.TrialState.PRUNED
               and t.user_attrs.get("kind") == "duplicate" and "note" in t.user_attrs) for t in after), \
        [(t.state, t.user_attrs) for t in after]


def test_the_summary_says_what_was_stored_and_what_to_run_next(tmp_path):
    db = tmp_path / "cli.db"
    args = ["search", "--batch", "1", "--seq-len", "32", "--heads", "1", "--head-dim", "16", "--kernel", TOY,
            "--trials", "2", "--samples", "3", "--no-xla", "--quiet", "--seed", "1", "--db", str(db)]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    assert f"results in {db}" in first.output and "sqlite://" not in first.output
    assert "final re-timing" in first.output and "progress bar" in first.output
    assert f"Next: autotune show --id 1 --db {db}" in first.output
    assert f"autotune.lookup((1, 32, 1, 16), (1, 32, 1, 16), 'float32', kernel={TOY!r})" in first.output
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    assert "already has its 2 trials; nothing searched" in again.output
    with Store(db) as store:
        assert len(store.trials()) == 2 and len(store.bests()) == 1


def test_version_and_help():
    runner = CliRunner()
    version = runner.invoke(main, ["--version"])
    assert version.exit_code == 0 and version.output.startswith("autotune ")
    for command in ("bench", "show"):
        text = runner.invoke(main, [command, "--help"]).output
        assert "--backward" in text and "Tune forward" not in text
    search_help = runner.invoke(main, ["search", "--help"]).output
    # --db's default path in full (the help wraps long paths, at spaces or hyphens: compare without whitespace)
    assert "".join(display_url(default_url()).split()) in "".join(search_help.split())
    assert "Dtype of q, k and v" in search_help and "Timing samples per candidate" in search_help


@pytest.mark.parametrize("url, shown", [("postgresql+psycopg://tuner:secret@db-host/autotune",
                                         "postgresql+psycopg://tuner:***@db-host/autotune")])
def test_urls_in_messages_hide_the_password(url, shown):
    from db.urls import display_url

    assert display_url(url) == shown
