"""Four `autotune search` processes on one results database: on one study, and on a shapes list.

On SQLite (one machine, e.g. one process per GPU) and on a real PostgreSQL server (the distributed case). The
workers are real OS processes that share nothing but the database.
"""
from __future__ import annotations

import json
import uuid
from collections import Counter

import pytest

from autotune.search.scheduler import claim_name
from autotune.device import current_device
from autotune.keys import make_key
from autotune.search.loop import SearchOptions
from autotune.shapes import load_shapes
from db import Store
from kernels import Problem
from tests import toy_kernel
from tests.worker_procs import (PATIENT_TIMINGS, WIDE_SPACE, check_best, check_recorded_once, problem_args,
                                start_worker, worker_env)

WORKERS = 4
pytestmark = pytest.mark.slow


def fresh_pg_database(pg_url: str, name: str) -> str:
    """A new empty database on the test server, so tests sharing the server cannot see each other's studies."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    engine = create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return make_url(pg_url).set(database=name).render_as_string(hide_password=False)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "shared.db")
    return fresh_pg_database(request.getfixturevalue("pg_url"), f"workers_{uuid.uuid4().hex[:10]}")


def test_four_workers_share_one_study(db_url, tmp_path):
    budget = 8
    env = worker_env(AUTOTUNE_TOY_SPACE=WIDE_SPACE, **PATIENT_TIMINGS)  # no worker dies here: none may look dead
    workers = [start_worker(db_url, [*problem_args(), "--trials", str(budget), "--seed", str(i)],
                            out=tmp_path / f"worker{i}.log", env=env) for i in range(WORKERS)]
    for worker in workers:
        assert worker.wait(timeout=400) == 0, worker.text
    store = Store(db_url)
    problem = Problem(batch=1, q_len=32, kv_len=32, heads=1, kv_heads=1, head_dim=16)
    key = make_key(toy_kernel, problem, current_device())
    study, rows = check_recorded_once(store, key, store.url, budget)
    assert len({r.run_id for r in rows}) > 1, "the trials should be shared out among the workers"
    assert all(r.status == "ok" for r in rows)
    check_best(store, key, rows, budget, toy_kernel.Config.default(problem).to_dict())
    runs = store.runs()
    assert len(runs) == WORKERS and all(r.status == "ok" for r in runs)
    assert store.integrity_check() == []
    store.close()


SHAPES = [dict(batch=1, seq_len=n, heads=1, head_dim=16) for n in (24, 32, 40, 48)]


def test_four_workers_share_a_shapes_list(db_url, tmp_path):
    budget = 2
    shapes = tmp_path / "shapes.json"
    shapes.write_text(json.dumps({"problems": SHAPES}))
    env = worker_env(**PATIENT_TIMINGS)  # no worker dies here: a claim must not go stale under a live worker
    workers = [start_worker(db_url, ["--shapes", str(shapes), "--trials", str(budget), "--seed", str(i)],
                            out=tmp_path / f"worker{i}.log", env=env) for i in range(WORKERS)]
    for worker in workers:
        assert worker.wait(timeout=400) == 0, worker.text
    store = Store(db_url)
    device = current_device()
    assert len(store.bests()) == len(SHAPES)
    tuned_by = Counter()
    for spec in load_shapes(shapes):
        key = make_key(toy_kernel, spec.problem, device)
        _study, rows = check_recorded_once(store, key, store.url, budget)
        runs = {r.run_id for r in rows}
        assert len(runs) == 1, f"{spec.problem} was tuned by several workers: runs {runs}"
        tuned_by[runs.pop()] += 1
        check_best(store, key, rows, budget, toy_kernel.Config.default(spec.problem).to_dict())
        claim = claim_name(toy_kernel, spec, device, SearchOptions(trials=budget))
        assert store.claim_done(claim)
    assert sum(tuned_by.values()) == len(SHAPES)
    assert all(r.status == "ok" for r in store.runs())
    assert store.integrity_check() == []
    store.close()
