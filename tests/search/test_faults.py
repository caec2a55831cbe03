"""What goes wrong in a long tuning job, done for real to worker processes, and what the search makes of it.

A worker killed with SIGKILL in the middle of a trial, a candidate that kills its own process, a database locked
past the busy timeout, a read-only database, a full disk, a PostgreSQL server dropping the connection: each ends
with the trial failed (and the search going on) or the command stopped with one clear message, every recorded trial
kept, and a rerun that resumes to the budget. Bad problem files are refused before anything is compiled.
"""
from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import uuid
from contextlib import contextmanager
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner

from autotune.cli.app import main
from autotune.search.scheduler import claim_name
from autotune.device import current_device
from autotune.keys import make_key
from autotune.search.loop import SearchOptions
from autotune.shapes import load_shapes
from db import Store
from kernels import Problem
from tests import toy_kernel
from tests.worker_procs import (TOY, WIDE_SPACE, check_recorded_once, problem_args, run_worker, start_worker,
                                wait_for, worker_env)

GATED = "tests.gated_kernel"

PROBLEM = Problem(batch=1, q_len=32, kv_len=32, heads=1, kv_heads=1, head_dim=16)


def key_of(problem: Problem = PROBLEM):
    return make_key(toy_kernel, problem, current_device())


def sqlite_rows(path: Path) -> list[tuple]:
    """Our recorded trials, read straight from the file by another process's connection."""
    connection = sqlite3.connect(path, timeout=30)
    try:
        return connection.execute("SELECT number, status FROM autotune_trials ORDER BY id").fetchall()
    except sqlite3.OperationalError:
        return []  # the tables are not created yet
    finally:
        connection.close()


def traced(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def assert_clean_failure(worker, *words: str) -> str:
    text = worker.text
    assert worker.process.returncode not in (0, None), text
    assert "Traceback" not in text, text
    assert "Error: " in text and "run the same command again to resume" in text, text
    for word in words:
        assert word in text, text
    return text


def assert_rerun_resumes(db, args, tmp_path, env) -> None:
    """The same command run again ends well, with every trial recorded once and the database intact."""
    rerun = run_worker(str(db), args, out=tmp_path / "rerun.log", env=env)
    assert rerun.process.returncode == 0, rerun.text
    store = Store(db)
    check_recorded_once(store, key_of(), store.url, 6)
    assert store.integrity_check() == []
    store.close()


# ---------------------------------------------------------------- workers killed in the middle of a trial


@pytest.mark.slow
def test_worker_killed_mid_trial_is_failed_on_restart_and_the_search_resumes(tmp_path):
    db, log = tmp_path / "killed.db", tmp_path / "traced.jsonl"
    args = [*problem_args(), "--sampler", "grid", "--trials", "4"]  # the grid: (32,32) default, then (16,16), ...
    hang = {"hang": {"block_q": 16, "block_k": 16}}
    first = start_worker(str(db), args, out=tmp_path / "first.log",
                         env=worker_env(AUTOTUNE_TOY_FAULTS=json.dumps(hang), AUTOTUNE_TOY_LOG=str(log)))
    # The default (trial 0) is evaluated while (16,16) hangs in a compile thread; then (16,32) is asked and
    # compiled ahead, and the worker waits for (16,16) for ever: kill it there, with trials 1 and 2 running.
    wait_for(lambda: {(c["block_q"], c["block_k"]) for c in traced(log)} >= {(16, 16), (16, 32)}, 120,
             "the worker to hang in the middle of a trial")
    study = optuna.load_study(study_name=key_of().digest(), storage=f"sqlite:///{db}")
    running = wait_for(lambda: [t.number for t in study.get_trials(states=(optuna.trial.TrialState.RUNNING,))]
                       if study.trials[0].state == optuna.trial.TrialState.COMPLETE else None, 60,
                       "the default to be evaluated")
    assert running == [1, 2]
    first.process.send_signal(signal.SIGKILL)
    first.wait()
    before = sqlite_rows(db)

    second = run_worker(str(db), args, out=tmp_path / "second.log")
    assert second.process.returncode == 0, second.text
    store = Store(db)
    _study, rows = check_recorded_once(store, key_of(), store.url, 4)
    assert all(row in [(r.number, r.status) for r in rows] for row in before), "a recorded trial was lost"
    lost = [r for r in rows if r.error_class == "WorkerLost"]
    assert {r.number for r in lost} == set(running)
    assert any(r.config["block_q"] == 16 and r.config["block_k"] == 16 for r in lost)
    assert all(r.status == "runtime_error" for r in lost)
    assert store.get_best(key_of()) is not None
    assert store.integrity_check() == []
    store.close()


@pytest.mark.slow
def test_a_rerun_right_after_a_kill_marks_the_killed_run_crashed_at_once(tmp_path):
    """Issue 24 item 14: the killed worker's run row is `crashed` as soon as a search starts on the same machine
    (its process is gone), though its heartbeat is fresh and the claim TTL is five minutes."""
    db, log = tmp_path / "killed.db", tmp_path / "traced.jsonl"
    slow_ttl = {"AUTOTUNE_HEARTBEAT_GRACE": "3", "AUTOTUNE_CLAIM_TTL": "300"}
    doomed = start_worker(str(db), [*problem_args(), "--trials", "2", "--seed", "0"], out=tmp_path / "doomed.log",
                          env=worker_env(AUTOTUNE_TOY_FAULTS=json.dumps({"hang": {}}), AUTOTUNE_TOY_LOG=str(log),
                                         **slow_ttl))
    wait_for(lambda: traced(log), 120, "the doomed worker to start a trial")
    doomed.process.send_signal(signal.SIGKILL)
    doomed.wait()
    with Store(db) as store:
        [killed] = [run.id for run in store.runs() if run.status == "running"]
    rerun = run_worker(str(db), [*problem_args(seq_len=40), "--trials", "1", "--seed", "0"],
                       out=tmp_path / "rerun.log", env=worker_env(**slow_ttl))
    assert rerun.process.returncode == 0, rerun.text
    with Store(db) as store:
        runs = {run.id: run for run in store.runs()}
    assert runs[killed].status == "crashed", runs[killed]
    assert f"pid {doomed.process.pid} on this machine) is gone" in runs[killed].message
    assert sorted(run.status for run in runs.values()) == ["crashed", "ok"]


@pytest.mark.slow
@pytest.mark.postgres
def test_killed_workers_trial_and_claim_are_taken_over_by_another_worker(pg_url, tmp_path):
    url = fresh_pg_database(pg_url)
    shapes = tmp_path / "shapes.toml"
    shapes.write_text("[[problem]]\nbatch = 1\nseq_len = 32\nheads = 1\nhead_dim = 16\n\n"
                      "[[problem]]\nbatch = 1\nseq_len = 40\nheads = 1\nhead_dim = 16\n")
    log = tmp_path / "traced.jsonl"
    args = ["--shapes", str(shapes), "--trials", "3", "--seed", "0"]
    doomed = start_worker(url, args, out=tmp_path / "doomed.log",
                          env=worker_env(AUTOTUNE_TOY_FAULTS=json.dumps({"hang": {}}), AUTOTUNE_TOY_LOG=str(log)))
    wait_for(lambda: traced(log), 120, "the doomed worker to start a trial")
    # The survivor's claim TTL is long enough that a live doomed worker's late heartbeats on a loaded machine
    # cannot make its claim look stale; the doomed worker is killed only once the survivor has seen the claim held.
    survivor = start_worker(url, args, out=tmp_path / "survivor.log", env=worker_env(AUTOTUNE_CLAIM_TTL="8"))
    wait_for(lambda: "Skipping problem 1 for now" in survivor.text or survivor.process.poll() is not None, 180,
             "the survivor to find problem 1 claimed by the doomed worker")
    assert "Skipping problem 1 for now" in survivor.text, survivor.text
    doomed.process.send_signal(signal.SIGKILL)
    doomed.wait()
    assert survivor.wait() == 0, survivor.text  # it came back to problem 1 once the claim went stale, and tuned it

    store = Store(url)
    device = current_device()
    specs = load_shapes(shapes)
    for spec in specs:
        key = make_key(toy_kernel, spec.problem, device)
        _study, rows = check_recorded_once(store, key, url, 3)
        assert store.get_best(key) is not None
        assert store.claim_done(claim_name(toy_kernel, spec, device, SearchOptions(trials=3)))
    lost = [r for r in store.trials(make_key(toy_kernel, specs[0].problem, device)) if r.error_class == "WorkerLost"]
    assert lost, "the doomed worker's running trials should be failed by the survivor"
    assert store.integrity_check() == []
    store.close()


@pytest.mark.slow
def test_trial_of_a_worker_killed_before_its_first_heartbeat_is_failed(tmp_path):
    db = tmp_path / "early.db"
    url = f"sqlite:///{db}"
    Store(db).close()
    study = optuna.create_study(study_name=key_of().digest(), storage=url, direction="minimize")
    orphan = study.ask()  # asked, then the worker "died": no heartbeat was ever recorded for it
    orphan.suggest_int("block_q", 0, 1)
    orphan.set_user_attr("config", {**toy_kernel.Config.default(PROBLEM).to_dict(), "block_q": 16})
    worker = run_worker(str(db), [*problem_args(), "--trials", "2", "--seed", "0"], out=tmp_path / "w.log")
    assert worker.process.returncode == 0, worker.text
    store = Store(db)
    _study, rows = check_recorded_once(store, key_of(), url, 2)
    assert [r.error_class for r in rows if r.number == orphan.number] == ["WorkerLost"]
    store.close()


# ---------------------------------------------------------------- a candidate that kills its process


@pytest.mark.slow
def test_isolated_candidate_that_kills_its_process_is_a_failed_trial(tmp_path):
    db = tmp_path / "isolated.db"
    env = worker_env(AUTOTUNE_TOY_FAULTS=json.dumps({"crash": {"block_q": 16}}),
                     AUTOTUNE_TOY_INVALID=json.dumps({"small_k": {"block_k": 16}}))
    worker = run_worker(str(db), [*problem_args(), "--isolate", "--sampler", "grid", "--trials", "2"],
                        out=tmp_path / "w.log", env=env)
    assert worker.process.returncode == 0, worker.text
    store = Store(db)
    rows = {(r.config["block_q"], r.config["block_k"]): r for r in store.trials(key_of()) if r.status != "invalid"}
    assert set(rows) == {(16, 32), (32, 32)}
    crashed = rows[(16, 32)]
    assert (crashed.status, crashed.error_class) == ("runtime_error", "ProcessDied")
    assert "SIGKILL" in crashed.error_message
    assert rows[(32, 32)].status == "ok"
    assert store.get_best(key_of()).config["block_q"] == 32
    store.close()


# ---------------------------------------------------------------- the database failing under the search


@pytest.mark.slow
def test_database_locked_past_the_busy_timeout_stops_cleanly_and_a_rerun_resumes(tmp_path):
    db = tmp_path / "locked.db"
    args = [*problem_args(), "--trials", "6", "--seed", "0"]
    env = worker_env(AUTOTUNE_TOY_SPACE=WIDE_SPACE, AUTOTUNE_DB_BUSY_TIMEOUT="1")
    worker = start_worker(str(db), args, out=tmp_path / "locked.log", env=env)
    wait_for(lambda: len(sqlite_rows(db)) >= 2, 120, "two recorded trials")
    locker = sqlite3.connect(db, isolation_level=None, timeout=30)
    locker.execute("BEGIN EXCLUSIVE")  # another process holds the write lock far longer than the busy timeout
    try:
        before = sqlite_rows(db)
        worker.wait(timeout=120)
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert_clean_failure(worker, "locked", "busy timeout")
    assert set(before) <= set(sqlite_rows(db))

    assert_rerun_resumes(db, args, tmp_path, env)


@contextmanager
def tiny_filesystem(where: Path, size: str):
    """A small tmpfs of our own (root can mount here); skips the test where mounting is not allowed."""
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.mark.slow
def test_read_only_database_stops_cleanly_and_a_rerun_resumes(tmp_path):
    with tiny_filesystem(tmp_path / "fs", "8m") as fs:
        db = fs / "results.db"
        args = [*problem_args(), "--trials", "3", "--seed", "0"]
        first = run_worker(str(db), [*problem_args(), "--trials", "2", "--seed", "0"], out=tmp_path / "first.log")
        assert first.process.returncode == 0, first.text
        before = sqlite_rows(db)
        subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)
        try:
            refused = run_worker(str(db), args, out=tmp_path / "ro.log")
        finally:
            subprocess.run(["mount", "-o", "remount,rw", str(fs)], check=True)
        text = refused.text
        assert refused.process.returncode == 1 and "Traceback" not in text, text
        assert "read-only" in text and str(db) in text, text
        assert sqlite_rows(db) == before
        rerun = run_worker(str(db), args, out=tmp_path / "rerun.log")
        assert rerun.process.returncode == 0, rerun.text
        store = Store(db)
        _study, rows = check_recorded_once(store, key_of(), store.url, 3)
        assert set(before) <= {(r.number, r.status) for r in rows}
        store.close()


@pytest.mark.slow
def test_full_disk_stops_cleanly_and_a_rerun_resumes(tmp_path):
    with tiny_filesystem(tmp_path / "fs", "8m") as fs:
        db = fs / "results.db"
        args = [*problem_args(), "--trials", "6", "--seed", "0"]
        env = worker_env(AUTOTUNE_TOY_SPACE=WIDE_SPACE)
        worker = start_worker(str(db), args, out=tmp_path / "full.log", env=env)
        wait_for(lambda: len(sqlite_rows(db)) >= 2, 120, "two recorded trials")
        filler = fs / "filler"
        with open(filler, "wb", buffering=0) as handle:  # fill the disk to the last byte
            try:
                while handle.write(b"\0" * 65536):
                    pass
            except OSError:
                pass
        before = sqlite_rows(db)
        worker.wait(timeout=120)
        assert_clean_failure(worker, "disk is full")
        filler.unlink()
        assert set(before) <= set(sqlite_rows(db))
        assert_rerun_resumes(db, args, tmp_path, env)


def fresh_pg_database(pg_url: str) -> str:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"faults_{uuid.uuid4().hex[:10]}"
    engine = create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return make_url(pg_url).set(database=name).render_as_string(hide_password=False)


@pytest.mark.slow
@pytest.mark.postgres
def test_postgres_dropping_connections(pg_url, tmp_path):
    """Connections the server drops while idle are replaced (pool pre-ping) and the search goes on; once the
    server drops them all and refuses new ones, the search stops with a clear message; a rerun resumes."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    url = fresh_pg_database(pg_url)
    name = make_url(url).database
    admin = create_engine(pg_url, isolation_level="AUTOCOMMIT")
    drop = ("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :name "
            "AND pid <> pg_backend_pid()")
    args = [*problem_args(), "--sampler", "grid", "--trials", "4"]
    log = tmp_path / "traced.jsonl"
    # The grid's four candidates wait at gates while compiling, so the test acts on a worker that only waits (its
    # heartbeats are 30 s apart here), however long the test takes to get there. The first two: every connection
    # the worker has is idle in the pool when the server drops them; the gate opens after the drop. The last two:
    # all four trials are asked, with their configs chosen, when the server drops everything and refuses new
    # connections; the worker then fails on its next write.
    first, last = tmp_path / "gate1", tmp_path / "gate2"
    gates = [[str(first), {"block_q": 32, "block_k": 32}], [str(first), {"block_q": 16, "block_k": 16}],
             [str(last), {"block_q": 16, "block_k": 32}], [str(last), {"block_q": 32, "block_k": 16}]]
    env = worker_env(AUTOTUNE_TOY_GATES=json.dumps(gates), AUTOTUNE_TOY_LOG=str(log),
                     AUTOTUNE_HEARTBEAT_INTERVAL="30", AUTOTUNE_HEARTBEAT_GRACE="60")
    store = Store(url)
    worker = start_worker(url, args, out=tmp_path / "dropped.log", env=env, kernel=GATED)
    compiling = lambda: {(c["block_q"], c["block_k"]) for c in traced(log)}  # noqa: E731
    try:
        wait_for(lambda: compiling() >= {(32, 32), (16, 16)}, 120, "the first two candidates to be compiling")
        store.engine.dispose()
        with admin.connect() as connection:
            dropped = len(connection.execute(text(drop + " AND state = 'idle'"), {"name": name}).all())
        first.touch()
        assert dropped >= 1
        wait_for(lambda: len(compiling()) == 4 and len(store.trials(key_of())) == 2
                 or worker.process.poll() is not None, 120,
                 "the first two trials recorded and the last two candidates compiling")
        assert worker.process.poll() is None, f"the worker should survive the drop:\n{worker.text}"
        assert [r.status for r in store.trials(key_of())] == ["ok", "ok"]
        with admin.connect() as connection:  # now the server drops every connection and lets no new one in
            connection.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
            store.engine.dispose()
            connection.execute(text(drop), {"name": name})
        last.touch()
        worker.wait(timeout=120)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
        admin.dispose()
    assert_clean_failure(worker, "connection to the database server was lost")
    before = {(r.number, r.status) for r in store.trials(key_of())}
    rerun = run_worker(url, args, out=tmp_path / "rerun.log")
    assert rerun.process.returncode == 0, rerun.text
    _study, rows = check_recorded_once(store, key_of(), url, 4)
    assert before <= {(r.number, r.status) for r in rows}
    assert store.integrity_check() == []
    store.close()


# ---------------------------------------------------------------- bad problem files


GOOD = {"batch": 1, "seq_len": 32, "heads": 2, "head_dim": 16}


@pytest.mark.parametrize("bad, field", [
    ({"block_size": 64}, "block_size"),
    ({"batch": 0}, "batch"),
    ({"seq_len": -32}, "seq_len"),
    ({"head_dim": 0}, "head_dim"),
    ({"kv_seq_len": -1}, "kv_seq_len"),
    ({"heads": 3, "kv_heads": 2}, "kv_heads"),
    ({"dtype": "float8"}, "dtype"),
    ({"segments": -2}, "segments"),
    ({"batch": "one"}, "batch"),
])
@pytest.mark.parametrize("suffix", ["toml", "json"])
def test_bad_problem_file_is_refused_before_anything_runs(tmp_path, monkeypatch, bad, field, suffix):
    log = tmp_path / "traced.jsonl"
    monkeypatch.setenv("AUTOTUNE_TOY_LOG", str(log))
    problems = [dict(GOOD), {**GOOD, **bad}]
    shapes = tmp_path / f"shapes.{suffix}"
    if suffix == "json":
        shapes.write_text(json.dumps({"problems": problems}))
    else:
        shapes.write_text("\n".join("[[problem]]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in p.items())
                                    for p in problems))
    db = tmp_path / "never.db"
    run = CliRunner().invoke(main, ["search", "--shapes", str(shapes), "--kernel", TOY, "--quiet", "--db", str(db)])
    assert run.exit_code == 2, run.output
    assert f"shapes.{suffix}: problem 2" in run.output and field in run.output, run.output
    assert not db.exists() and not log.exists()  # nothing written, nothing compiled
