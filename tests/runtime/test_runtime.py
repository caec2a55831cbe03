"""Tuned kernels at runtime, after a real small search on the CPU (GPU kernel in interpret mode)."""
from __future__ import annotations

import json
import sqlite3
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from click.testing import CliRunner
from sqlalchemy import Engine, event, text

import autotune
from autotune.cli.app import main
from autotune.device import current_device
from autotune.keys import make_key
from autotune.search.loop import SearchOptions, search_problem
from autotune.options import TimingPolicy
from db import Store
from kernels import Problem, attention_reference, gpu, tolerance

FAST = TimingPolicy(warmup=1, samples=3, min_sample_s=1e-4)
TUNED = Problem(batch=1, q_len=32, kv_len=32, heads=2, kv_heads=1, head_dim=16, causal=True)


def inputs(problem: Problem, seed: int):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (problem.batch, problem.q_len, problem.heads, problem.head_dim))
    k = jax.random.normal(keys[1], (problem.batch, problem.kv_len, problem.kv_heads, problem.head_dim))
    v = jax.random.normal(keys[2], (problem.batch, problem.kv_len, problem.kv_heads, problem.head_dim))
    return q, k, v


@pytest.fixture(scope="module")
def tuned_db(tmp_path_factory):
    path = tmp_path_factory.mktemp("runtime") / "tuned.db"
    store = Store(path)
    search_problem(TUNED, kernel_name="gpu", store=store, device=current_device(),
                   options=SearchOptions(trials=3, seed=1, timing=FAST, compare_xla=False, retime_top=2),
                   progress=False)
    store.close()
    return path


@pytest.fixture(autouse=True)
def fresh_runtime():
    autotune.reload()
    yield
    autotune.reload()


def copy_db(source: Path, target: Path) -> Path:
    """A private copy of a results database, made with SQLite's backup API: it carries what is still in the
    source's write-ahead log, which copying the bare file would lose."""
    src, dst = sqlite3.connect(source), sqlite3.connect(target)
    try:
        src.backup(dst)
    finally:
        dst.close()
        src.close()
    return target


def runtime_warnings(record: list) -> list[warnings.WarningMessage]:
    return [w for w in record if issubclass(w.category, RuntimeWarning)]


def stored_config(db_path, problem: Problem) -> dict:
    store = Store(db_path)
    try:
        return store.get_best(make_key(gpu, problem, current_device())).config
    finally:
        store.close()


def test_jitted_call_uses_the_stored_config_and_matches_the_reference(tuned_db):
    q, k, v = inputs(TUNED, 0)
    with autotune.using(db=tuned_db):
        found = autotune.lookup(q.shape, k.shape, q.dtype, causal=True)
        out = jax.jit(lambda q, k, v: autotune.flash_attention(q, k, v, causal=True))(q, k, v)
    assert found.source == "tuned"
    assert found.config.to_dict() == stored_config(tuned_db, TUNED)
    atol, rtol = tolerance("float32")
    np.testing.assert_allclose(out, attention_reference(q, k, v, causal=True), atol=atol, rtol=rtol)


@pytest.mark.slow
def test_grad_and_vmap_work(tuned_db):
    q, k, v = inputs(TUNED, 1)
    with autotune.using(db=tuned_db):
        grads = jax.grad(lambda q, k, v: autotune.flash_attention(q, k, v, causal=True).sum(), (0, 1, 2))(q, k, v)
        stacked = jax.vmap(lambda q, k, v: autotune.flash_attention(q, k, v, causal=True))(
            jnp.stack([q, 2 * q]), jnp.stack([k, k]), jnp.stack([v, -v]))
    want = jax.grad(lambda q, k, v: attention_reference(q, k, v, causal=True).sum(), (0, 1, 2))(q, k, v)
    atol, rtol = tolerance("float32", grad=True)
    for got, expected in zip(grads, want):
        np.testing.assert_allclose(got, expected, atol=atol, rtol=rtol)
    atol, rtol = tolerance("float32")
    np.testing.assert_allclose(stacked[1], attention_reference(2 * q, k, -v, causal=True), atol=atol, rtol=rtol)


def test_the_database_is_queried_once_per_key(tuned_db):
    queries = []

    def count(conn, cursor, statement, *args):
        if "autotune_bests" in statement:
            queries.append(statement)

    q, k, v = inputs(TUNED, 2)
    event.listen(Engine, "before_cursor_execute", count)
    try:
        with autotune.using(db=tuned_db):
            for scale in (1.0, 2.0, 3.0):  # three separate traces of the same key
                jax.jit(lambda q, k, v, s=scale: s * autotune.flash_attention(q, k, v, causal=True))(q, k, v)
            autotune.lookup(q.shape, k.shape, q.dtype, causal=True)
    finally:
        event.remove(Engine, "before_cursor_execute", count)
    # one query for the forward key, one for the backward key peeked for jax.grad; then memory only
    assert len(queries) == 2


def test_miss_policies(tuned_db):
    other = TUNED.replace(q_len=48, kv_len=48)
    shape_q, shape_k = (1, 48, 2, 16), (1, 48, 1, 16)
    with autotune.using(db=tuned_db, on_miss="heuristic"):
        with warnings.catch_warnings(record=True) as inspected:
            warnings.simplefilter("always")
            found = autotune.lookup(shape_q, shape_k, "float32", causal=True)  # only inspects: no warning
        with pytest.warns(RuntimeWarning, match="autotune search --batch 1 --seq-len 48") as record:
            autotune.flash_attention(*inputs(other, 9), causal=True)
    assert not runtime_warnings(inspected)
    assert f"--causal --db {tuned_db}" in str(record[0].message)  # tunes into the database the runtime reads
    assert found.source == "heuristic" and found.config == gpu.Config.default(other)
    assert "no tuned config for this problem" in found.detail

    autotune.reload()
    with autotune.using(db=tuned_db, on_miss="nearest"):
        found = autotune.lookup(shape_q, shape_k, "float32", causal=True)
    assert found.source == "nearest"
    assert found.config.to_dict() == stored_config(tuned_db, TUNED)

    autotune.reload()
    with autotune.using(db=tuned_db, on_miss="error"):
        with pytest.raises(autotune.TuningMissError, match="q_len"):
            autotune.lookup(shape_q, shape_k, "float32", causal=True)


@pytest.mark.slow
def test_tune_on_miss_runs_a_short_search_and_stores_it(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOTUNE_TUNE_TRIALS", "2")
    db = tmp_path / "tune.db"
    Store(db).close()
    problem = Problem(batch=1, q_len=24, kv_len=24, heads=1, kv_heads=1, head_dim=16)
    q, k, v = inputs(problem, 3)
    with autotune.using(db=db, on_miss="tune"):
        out = autotune.flash_attention(q, k, v)
        found = autotune.lookup(q.shape, k.shape, q.dtype)
    assert found.source == "tuned"
    assert stored_config(db, problem) == found.config.to_dict()
    np.testing.assert_allclose(out, attention_reference(q, k, v), atol=5e-3, rtol=5e-3)


@pytest.mark.slow
def test_misses_are_counted_and_search_misses_tunes_them(tmp_path):
    db = tmp_path / "miss.db"
    Store(db).close()
    problem = Problem(batch=1, q_len=20, kv_len=20, heads=2, kv_heads=2, head_dim=16)
    q, k, v = inputs(problem, 4)
    with autotune.using(db=db), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        autotune.flash_attention(q, k, v)
    autotune.reload()
    with autotune.using(db=db), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        autotune.flash_attention(q, k, v)  # a second process-worth of misses for the same key
    store = Store(db)
    [(key, count)] = store.misses()
    assert (key.q_len, key.heads, count) == (20, 2, 2)
    store.close()
    run = CliRunner().invoke(main, ["search", "--misses", "--trials", "2", "--samples", "3", "--no-xla", "--quiet",
                                    "--db", str(db)])
    assert run.exit_code == 0, run.output
    store = Store(db)
    assert store.get_best(key) is not None and store.misses() == []
    store.close()
    autotune.reload()
    with autotune.using(db=db):
        assert autotune.lookup(q.shape, k.shape, q.dtype).source == "tuned"


def test_a_missing_database_falls_back_without_creating_it(tmp_path):
    db = tmp_path / "nowhere" / "results.db"
    q, k, v = inputs(TUNED, 5)
    with autotune.using(db=db), pytest.warns(RuntimeWarning, match="no results database"):
        out = autotune.flash_attention(q, k, v, causal=True)
    assert not db.exists()
    np.testing.assert_allclose(out, attention_reference(q, k, v, causal=True), atol=5e-3, rtol=5e-3)


def test_a_read_only_database_still_serves_lookups(tuned_db, tmp_path):
    db = copy_db(tuned_db, tmp_path / "read-only.db")
    with Store(db) as store:
        misses = store.misses()
    url = f"sqlite:///file:{db}?mode=ro&uri=true"
    q, k, v = inputs(TUNED, 6)
    with autotune.using(db=url):
        found = autotune.lookup(q.shape, k.shape, q.dtype, causal=True)
        other = autotune.lookup((1, 40, 2, 16), (1, 40, 1, 16), q.dtype, causal=True)
        with pytest.warns(RuntimeWarning, match="no tuned config"):  # a miss it cannot count
            autotune.flash_attention(*inputs(TUNED.replace(q_len=40, kv_len=40), 6), causal=True)
        out = autotune.flash_attention(q, k, v, causal=True)
    assert found.source == "tuned" and found.config.to_dict() == stored_config(db, TUNED)
    assert other.source == "heuristic"
    np.testing.assert_allclose(out, attention_reference(q, k, v, causal=True), atol=5e-3, rtol=5e-3)
    with Store(db) as store:
        assert store.misses() == misses  # nothing was written through the read-only URL


def test_a_locked_database_falls_back_to_the_heuristic(tuned_db, tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOTUNE_DB_BUSY_TIMEOUT", "0.2")
    db = copy_db(tuned_db, tmp_path / "locked.db")
    holder = sqlite3.connect(db, timeout=0.1)
    holder.execute("PRAGMA locking_mode=EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with autotune.using(db=db):
            found = autotune.lookup((1, 32, 2, 16), (1, 32, 1, 16), "float32", causal=True)
    finally:
        holder.rollback()
        holder.close()
    assert found.source == "heuristic" and "locked" in found.detail
    autotune.reload()
    with autotune.using(db=db):  # the lock is gone: the stored best is served
        assert autotune.lookup((1, 32, 2, 16), (1, 32, 1, 16), "float32", causal=True).source == "tuned"


def test_a_corrupted_stored_config_is_ignored_with_a_warning(tuned_db, tmp_path):
    db = copy_db(tuned_db, tmp_path / "corrupt.db")
    store = Store(db)
    bad = {**stored_config(db, TUNED), "block_q": 24}  # not a power of two: invalid for any problem
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE autotune_bests SET config = :c"), {"c": json.dumps(bad)})
    store.close()
    with autotune.using(db=db):
        found = autotune.lookup((1, 32, 2, 16), (1, 32, 1, 16), "float32", causal=True)
    assert found.source == "heuristic" and "ignoring the stored config" in found.detail


def test_a_result_for_another_kernel_version_is_a_miss(tuned_db, tmp_path):
    db = tmp_path / "stale.db"
    store = Store(db)
    key = make_key(gpu, TUNED, current_device())
    stale = type(key).from_dict({**key.to_dict(), "kernel_version": "0ld0ld0ld0ld"})
    store.put_best(stale, config=gpu.Config.default(TUNED).to_dict(), time_s=1e-3, default_time_s=1e-3, trials=1)
    store.close()
    with autotune.using(db=db), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert autotune.lookup((1, 32, 2, 16), (1, 32, 1, 16), "float32", causal=True).source == "heuristic"


def test_bad_inputs_raise_the_kernels_errors(tuned_db):
    q, k, v = inputs(TUNED, 7)
    with autotune.using(db=tuned_db):
        with pytest.raises(ValueError, match="head_dim"):
            autotune.flash_attention(q, k[..., :8], v[..., :8])
        with pytest.raises(TypeError, match="dtype"):
            autotune.flash_attention(q.astype(jnp.int32), k, v)
    with pytest.raises(ValueError, match="on_miss"):
        autotune.configure(on_miss="sometimes")


def test_one_call_on_a_missing_database_warns_once_at_the_callers_line(tmp_path):
    db = tmp_path / "absent" / "results.db"
    q, k, v = inputs(TUNED, 8)
    with autotune.using(db=db), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        line = sys._getframe().f_lineno + 1
        out = jax.jit(lambda q, k, v: autotune.flash_attention(q, k, v, causal=True))(q, k, v)
        autotune.flash_attention(q, k, v, causal=True)  # the same key again: remembered, no second warning
    [warning] = runtime_warnings(record)
    message = str(warning.message)
    assert f"there is no results database at {db}" in message
    assert message.endswith(f"Tune it with: autotune search --batch 1 --seq-len 32 --heads 2 --kv-heads 1 "
                            f"--head-dim 16 --dtype float32 --causal --db {db}")
    assert (warning.filename, warning.lineno) == (__file__, line)
    np.testing.assert_allclose(out, attention_reference(q, k, v, causal=True), atol=5e-3, rtol=5e-3)


def test_the_miss_warning_names_no_db_for_the_default_database(tuned_db, tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOTUNE_DB", str(copy_db(tuned_db, tmp_path / "default.db")))
    autotune.reload()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        line = sys._getframe().f_lineno + 1
        autotune.flash_attention(*inputs(Problem(batch=1, q_len=56, kv_len=56, heads=2, kv_heads=1, head_dim=16), 10))
    [warning] = runtime_warnings(record)
    assert str(warning.message).endswith("Tune it with: autotune search --batch 1 --seq-len 56 --heads 2 "
                                         "--kv-heads 1 --head-dim 16 --dtype float32")
    assert (warning.filename, warning.lineno) == (__file__, line)
