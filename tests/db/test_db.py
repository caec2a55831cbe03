"""Tests of the results database (db/): records, keep-the-faster, schema upgrades and refusals, concurrency,
export/import, claims, pruning and the PostgreSQL backend. SQLite tests use temporary files; the PostgreSQL ones
use the `pg_url` fixture (a throwaway server) and a fresh schema each."""
from __future__ import annotations

import copy
import hashlib
import json
import math
import multiprocessing
import os
import sqlite3
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import create_engine, event, make_url, text

import db
from db import (SCHEMA_VERSION, TRIAL_STATUSES, BestOffer, DatabaseError, ForeignDatabaseError, ImportValidationError,
                NotADatabaseError, SchemaTooNewError, Store, TuningKey, default_url, export_document,
                import_document, resolve_url)
from db.inspection import OPTUNA_TABLES
from db.records import FEATURE_DEFAULTS

H100 = "NVIDIA H100 80GB HBM3"


def make_key(**changes: object) -> TuningKey:
    fields: dict[str, object] = dict(
        kernel="flash_attention", kernel_version="k1", platform="gpu", device_kind=H100, jax_version="0.10.2",
        batch=2, q_len=1024, kv_len=1024, heads=16, kv_heads=16, head_dim=128, dtype="bfloat16", causal=True,
        segments=False, backward=False)
    fields.update(changes)
    return TuningKey(**fields)  # type: ignore[arg-type]



def snapshot(path: Path) -> tuple[str, list[str]]:
    """The file's hash and its directory's listing: refusing to open must change neither."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return digest, sorted(os.listdir(path.parent))


# -- TuningKey -----------------------------------------------------------------------------------------------------

def test_key_round_trip_and_stable_digest() -> None:
    key = make_key()
    assert TuningKey.from_dict(key.to_dict()) == key
    assert TuningKey.from_dict(json.loads(json.dumps(key.to_dict()))) == key
    canonical = ('{"backward":false,"batch":2,"causal":true,"device_kind":"NVIDIA H100 80GB HBM3","dtype":"bfloat16",'
                 '"head_dim":128,"heads":16,"jax_version":"0.10.2","kernel":"flash_attention","kernel_version":"k1",'
                 '"kv_heads":16,"kv_len":1024,"platform":"gpu","q_len":1024,"segments":false}')
    assert key.digest() == hashlib.sha256(canonical.encode()).hexdigest()[:32] == "1c1949f20d6a197e577c8ef1f2827db4"
    assert make_key(kernel_version="k2").digest() != key.digest()
    assert make_key(causal=False).digest() != key.digest()


@pytest.mark.parametrize("change, message", [
    ({"extra": 1}, "unknown tuning key field(s): extra"),
    ({"dtype": None}, "dtype"),
    ({"batch": "2"}, "batch must be an integer"),
    ({"batch": 2.0}, "batch must be an integer"),
    ({"batch": True}, "batch must be an integer"),
    ({"q_len": 0}, "q_len must be at least 1"),
    ({"causal": 1}, "causal must be true or false"),
    ({"platform": "cuda"}, "platform must be one of gpu, tpu, cpu-interpret"),
    ({"kernel": ""}, "kernel must not be empty"),
])
def test_key_from_dict_rejects_bad_fields(change: dict, message: str) -> None:
    data = {**make_key().to_dict(), **change}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TuningKey.from_dict(data)


def test_key_from_dict_rejects_missing_field() -> None:
    data = make_key().to_dict()
    del data["head_dim"]
    with pytest.raises(ValueError, match=r"missing tuning key field\(s\): head_dim"):
        TuningKey.from_dict(data)


# -- records round trip ----------------------------------------------------------------------------------------------

def test_runs_round_trip(store: Store) -> None:
    run_id = store.start_run(host="box", device_kind=H100, platform="gpu", jax_version="0.10.2",
                             arguments={"shapes": [[2, 1024]], "trials": 40})
    [run] = store.runs()
    assert (run.id, run.host, run.status, run.ended_at, run.message) == (run_id, "box", "running", None, "")
    assert run.arguments == {"shapes": [[2, 1024]], "trials": 40}
    assert run.started_at.tzinfo is not None
    store.finish_run(run_id, "interrupted", "ctrl-c")
    [run] = store.runs()
    assert (run.status, run.message) == ("interrupted", "ctrl-c")
    assert run.ended_at is not None and run.ended_at >= run.started_at
    with pytest.raises(ValueError, match="status"):
        store.finish_run(run_id, "bogus")
    with pytest.raises(ValueError, match="run_id 99"):
        store.finish_run(99, "ok")


def test_trials_round_trip(store: Store) -> None:
    key, other = make_key(), make_key(q_len=2048)
    run_id = store.start_run(host="box", device_kind=H100, platform="gpu", jax_version="0.10.2", arguments={})
    first = store.add_trial(key, config={"block_q": 128, "stages": [2, 3]}, status="ok", run_id=run_id, number=0,
                            compile_s=1.5, time_s=0.002, time_spread_s=0.0001, time_count=20, max_error=0.001)
    second = store.add_trial(other, config={"block_q": 256}, status="compile_error", number=1,
                             error_class="ValueError", error_message="too big")
    third = store.add_trial(key, config={"block_q": 64}, status="mismatch", run_id=run_id, number=2, time_s=0.003,
                            max_error=float("nan"))
    assert [trial.id for trial in store.trials()] == [first, second, third]
    [a, c] = store.trials(key)
    assert (a.key, a.run_id, a.number, a.config, a.status) == (key, run_id, 0, {"block_q": 128, "stages": [2, 3]},
                                                              "ok")
    assert (a.compile_s, a.time_s, a.time_spread_s, a.time_count, a.max_error) == (1.5, 0.002, 0.0001, 20, 0.001)
    assert (a.error_class, a.error_message) == (None, None)
    assert c.max_error == math.inf  # a NaN error means "output not finite"
    [b] = store.trials(other)
    assert (b.status, b.error_class, b.error_message, b.time_s, b.run_id) == ("compile_error", "ValueError",
                                                                             "too big", None, None)
    assert set(TRIAL_STATUSES) >= {"ok", "timeout"}
    with pytest.raises(ValueError, match="status"):
        store.add_trial(key, config={}, status="great")
    with pytest.raises(ValueError, match="run_id 42"):
        store.add_trial(key, config={}, status="ok", run_id=42)
    with pytest.raises(ValueError, match="config"):
        store.add_trial(key, config={"x": object()}, status="ok")
    assert len(store.trials()) == 3


def test_bests_keep_the_faster(store: Store) -> None:
    key = make_key()
    assert store.get_best(key) is None
    assert store.put_best(key, config={"block_q": 64}, time_s=2.0, default_time_s=4.0, trials=10) is True
    assert store.put_best(key, config={"block_q": 32}, time_s=3.0, default_time_s=4.0, trials=20) is False
    assert store.put_best(key, config={"block_q": 16}, time_s=2.0, default_time_s=4.0, trials=20) is False  # a tie
    run_id = store.start_run(host="box", device_kind=H100, platform="gpu", jax_version="0.10.2", arguments={})
    assert store.put_best(key, config={"block_q": 128}, time_s=1.0, default_time_s=4.0, trials=30,
                          run_id=run_id) is True
    best = store.get_best(key)
    assert best is not None
    assert (best.key, best.config, best.time_s, best.default_time_s, best.speedup, best.trials, best.run_id) == (
        key, {"block_q": 128}, 1.0, 4.0, 4.0, 30, run_id)
    assert best.updated_at.tzinfo is not None
    assert store.best_by_id(best.id) == best
    assert store.best_by_id(best.id + 100) is None
    # A new kernel version is a new key: its first result is stored even though it is slower.
    newer = make_key(kernel_version="k2")
    assert store.put_best(newer, config={"block_q": 64}, time_s=5.0, default_time_s=None, trials=1) is True
    assert store.get_best(newer).speedup is None
    assert store.get_best(key).time_s == 1.0


def test_a_kept_best_counts_the_trials_of_its_grown_study(store: Store) -> None:
    """`--trials` raised: the rerun's winner is slower than the stored best, which stays, but `list` must show the
    study's new trial count (as `show` does), never a smaller one."""
    key = make_key()
    assert store.put_best(key, config={"block_q": 64}, time_s=2.0, default_time_s=4.0, trials=8) is True
    assert store.put_best(key, config={"block_q": 32}, time_s=3.0, default_time_s=4.0, trials=16) is False
    best = store.get_best(key)
    assert (best.config, best.time_s, best.trials) == ({"block_q": 64}, 2.0, 16)
    assert store.put_best(key, config={"block_q": 32}, time_s=3.0, default_time_s=4.0, trials=4) is False
    assert store.get_best(key).trials == 16


def test_bests_filters_and_neighbours(store: Store) -> None:
    keys = [make_key(), make_key(q_len=4096), make_key(dtype="float32"), make_key(causal=False),
            make_key(device_kind="TPU v5e", platform="tpu"), make_key(jax_version="0.11.0", q_len=512)]
    for index, key in enumerate(keys):
        store.put_best(key, config={"i": index}, time_s=1.0 + index, default_time_s=None, trials=1)
    assert [b.config["i"] for b in store.bests()] == [0, 1, 2, 3, 4, 5]
    assert [b.config["i"] for b in store.bests(device_kind=H100, dtype="bfloat16", causal=True)] == [0, 1, 5]
    assert [b.config["i"] for b in store.bests(platform="tpu")] == [4]
    assert [b.config["i"] for b in store.bests(kernel="other")] == []
    assert [b.config["i"] for b in store.bests(causal=False)] == [3]
    assert [b.config["i"] for b in store.neighbours(make_key(q_len=8192, batch=7))] == [0, 1, 5]


def test_misses(store: Store) -> None:
    rare, common = make_key(q_len=512), make_key(q_len=8192)
    store.record_miss(rare)
    for _ in range(3):
        store.record_miss(common)
    assert store.misses() == [(common, 3), (rare, 1)]
    store.clear_miss(common)
    store.clear_miss(make_key(q_len=1))  # unknown key: nothing to do
    assert store.misses() == [(rare, 1)]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), -1.0])
def test_non_finite_or_negative_times_rejected(store: Store, value: float) -> None:
    key = make_key()
    with pytest.raises(ValueError, match="time_s"):
        store.put_best(key, config={}, time_s=value, default_time_s=1.0, trials=1)
    with pytest.raises(ValueError, match="default_time_s"):
        store.put_best(key, config={}, time_s=1.0, default_time_s=value, trials=1)
    for field in ("compile_s", "time_s", "time_spread_s"):
        with pytest.raises(ValueError, match=field):
            store.add_trial(key, config={}, status="ok", **{field: value})
    with pytest.raises(ValueError, match="config"):
        store.put_best(key, config={"x": value if value != -1.0 else math.nan}, time_s=1.0, default_time_s=None,
                       trials=1)
    assert store.trials() == [] and store.bests() == []


def test_get_best_is_one_indexed_query(store: Store) -> None:
    key = make_key()
    store.put_best(key, config={"block_q": 64}, time_s=1.0, default_time_s=None, trials=1)
    store.put_best(make_key(q_len=64), config={}, time_s=1.0, default_time_s=None, trials=1)
    statements: list[tuple[str, object]] = []
    event.listen(store.engine, "before_cursor_execute",
                 lambda _conn, _cursor, statement, parameters, *_: statements.append((statement, parameters)))
    assert store.get_best(key).config == {"block_q": 64}
    assert len(statements) == 1
    assert store.get_best(make_key(q_len=999)) is None
    assert len(statements) == 2
    statement, parameters = statements[0]
    with store.engine.connect() as connection:
        plan = " ".join(str(row[-1]) for row in connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}",
                                                                          parameters))
    assert "SCAN" not in plan and "ix_autotune_keys_digest" in plan, plan


# -- pruning --------------------------------------------------------------------------------------------------------

def test_prune_removes_exactly_what_the_filters_name(store: Store) -> None:
    old_h100, old_a100, new_h100 = make_key(kernel_version="old"), make_key(kernel_version="old",
                                                                          device_kind="A100"), make_key()
    trials_only = make_key(kernel_version="old", q_len=64)  # matched by key filters though it has no best
    for key in (old_h100, old_a100, new_h100, trials_only):
        store.add_trial(key, config={}, status="ok", time_s=1.0)
        store.add_trial(key, config={}, status="timeout")
        store.record_miss(key)
    for key in (old_h100, old_a100, new_h100):
        store.put_best(key, config={}, time_s=1.0, default_time_s=None, trials=2)
    expected = {"bests": 1, "trials": 4, "misses": 2, "keys": 2}
    assert store.prune(kernel_version="old", device_kind=H100, dry_run=True) == expected
    assert len(store.trials()) == 8 and len(store.bests()) == 3
    assert store.prune(kernel_version="old", device_kind=H100) == expected
    assert {b.key for b in store.bests()} == {old_a100, new_h100}
    assert {t.key for t in store.trials()} == {old_a100, new_h100}
    assert {key for key, _count in store.misses()} == {old_a100, new_h100}
    assert store.prune(kernel="nothing-like-this") == {"bests": 0, "trials": 0, "misses": 0, "keys": 0}
    with pytest.raises(ValueError, match="at least one filter"):
        store.prune()
    assert store.integrity_check() == []


def test_prune_older_than(store: Store) -> None:
    stale, fresh = make_key(q_len=64), make_key(q_len=128)
    long_ago = datetime(2020, 1, 1, tzinfo=timezone.utc)
    store.put_bests([BestOffer(stale, {}, 1.0, updated_at=long_ago), BestOffer(fresh, {}, 1.0)])
    store.add_trial(stale, config={}, status="ok", time_s=1.0)
    cutoff = datetime.now(timezone.utc) - timedelta(days=1)
    assert store.prune(older_than=cutoff, dry_run=True) == {"bests": 1, "trials": 1, "misses": 0, "keys": 1}
    assert store.prune(older_than=cutoff.replace(tzinfo=None), device_kind=H100)["bests"] == 1  # naive means UTC
    assert [b.key for b in store.bests()] == [fresh]


# -- claims ---------------------------------------------------------------------------------------------------------

def test_claims(store: Store) -> None:
    name = make_key().digest()
    assert store.try_claim(name, "worker-1") is True
    assert store.try_claim(name, "worker-2") is False  # fresh: refused
    assert store.try_claim(name, "worker-1") is True  # ours already
    assert store.heartbeat_claim(name, "worker-1") is True
    assert store.try_claim(name, "worker-2", ttl_s=60.0) is False
    # Stale: worker-1's heartbeat is older than worker-2's ttl, so worker-2 takes over and worker-1 learns of it.
    assert store.try_claim(name, "worker-2", ttl_s=0.0) is True
    assert store.heartbeat_claim(name, "worker-1") is False
    assert store.try_claim(name, "worker-1") is False
    store.release_claim(name, "worker-1", done=False)  # not its claim any more: no effect
    assert store.try_claim(name, "worker-3") is False
    store.release_claim(name, "worker-2", done=False)  # given back unfinished: free for anyone
    assert store.try_claim(name, "worker-3") is True
    assert store.claim_done(name) is False
    store.release_claim(name, "worker-3", done=True)
    assert store.claim_done(name) is True
    assert store.try_claim(name, "worker-4", ttl_s=0.0) is False  # done shapes are never claimed again
    assert store.heartbeat_claim(name, "worker-3") is False
    store.release_claim("never-claimed", "worker-5", done=True)
    assert store.claim_done("never-claimed") is True
    assert store.claim_done("unknown") is False


# -- schema versions and refusals ------------------------------------------------------------------------------------

V1_SCHEMA = """
CREATE TABLE autotune_meta (name VARCHAR(64) NOT NULL PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE autotune_keys (
    id INTEGER NOT NULL PRIMARY KEY, digest VARCHAR(64) NOT NULL, kernel VARCHAR NOT NULL,
    kernel_version VARCHAR NOT NULL, platform VARCHAR NOT NULL, device_kind VARCHAR NOT NULL,
    jax_version VARCHAR NOT NULL, batch INTEGER NOT NULL, q_len INTEGER NOT NULL, kv_len INTEGER NOT NULL,
    heads INTEGER NOT NULL, kv_heads INTEGER NOT NULL, head_dim INTEGER NOT NULL, dtype VARCHAR NOT NULL,
    causal BOOLEAN NOT NULL, segments BOOLEAN NOT NULL, backward BOOLEAN NOT NULL, created_at DATETIME NOT NULL);
CREATE UNIQUE INDEX ix_autotune_keys_digest ON autotune_keys (digest);
CREATE TABLE autotune_runs (
    id INTEGER NOT NULL PRIMARY KEY, host VARCHAR NOT NULL, device_kind VARCHAR NOT NULL, platform VARCHAR NOT NULL,
    jax_version VARCHAR NOT NULL, arguments JSON NOT NULL, started_at DATETIME NOT NULL, ended_at DATETIME,
    status VARCHAR NOT NULL, message TEXT NOT NULL);
CREATE TABLE autotune_trials (
    id INTEGER NOT NULL PRIMARY KEY, key_id INTEGER NOT NULL REFERENCES autotune_keys (id),
    run_id INTEGER REFERENCES autotune_runs (id) ON DELETE SET NULL, number INTEGER, config JSON NOT NULL,
    status VARCHAR NOT NULL, error_class VARCHAR, error_message TEXT, compile_s FLOAT, time_s FLOAT, max_error FLOAT,
    created_at DATETIME NOT NULL);
CREATE TABLE autotune_bests (
    id INTEGER NOT NULL PRIMARY KEY, key_id INTEGER NOT NULL UNIQUE REFERENCES autotune_keys (id),
    config JSON NOT NULL, time_s FLOAT NOT NULL, default_time_s FLOAT,  trials INTEGER NOT NULL,
    run_id INTEGER REFERENCES autotune_runs (id) ON DELETE SET NULL, updated_at DATETIME NOT NULL);
CREATE TABLE autotune_misses (
    key_id INTEGER NOT NULL PRIMARY KEY REFERENCES autotune_keys (id), count INTEGER NOT NULL,
    last_seen DATETIME NOT NULL);
INSERT INTO autotune_meta VALUES ('schema_version', '1');
"""


def test_upgrade_from_version_1(tmp_path: Path) -> None:
    path, key = tmp_path / "v1.db", make_key()
    connection = sqlite3.connect(path)
    connection.executescript(V1_SCHEMA)
    stamp = "2024-05-01 12:00:00.000000"
    fields = {name: value for name, value in key.to_dict().items() if name not in FEATURE_DEFAULTS}  # version 4's
    connection.execute(f"INSERT INTO autotune_keys (id, digest, {', '.join(fields)}, created_at) VALUES "
                       f"(1, ?, {', '.join('?' * len(fields))}, ?)", [key.digest(), *fields.values(), stamp])
    connection.execute("INSERT INTO autotune_runs VALUES (1, 'box', ?, 'gpu', '0.10.2', '{}', ?, ?, 'ok', '')",
                       (H100, stamp, stamp))
    connection.execute("INSERT INTO autotune_trials VALUES (1, 1, 1, 0, '{\"block_q\": 64}', 'ok', NULL, NULL, "
                       "1.0, 0.5, 0.0, ?)", (stamp,))
    connection.execute("INSERT INTO autotune_bests VALUES (1, 1, '{\"block_q\": 64}', 0.5, 1.0, 1, 1, ?)", (stamp,))
    connection.execute("INSERT INTO autotune_misses VALUES (1, 4, ?)", (stamp,))
    connection.commit()
    connection.close()

    with Store(path) as store:
        best = store.get_best(key)
        assert (best.config, best.time_s, best.speedup, best.run_id) == ({"block_q": 64}, 0.5, 2.0, 1)
        assert best.updated_at == datetime(2024, 5, 1, 12, tzinfo=timezone.utc)
        [trial] = store.trials(key)
        assert (trial.time_s, trial.time_spread_s, trial.time_count) == (0.5, None, None)
        assert store.misses() == [(key, 4)]
        assert [run.status for run in store.runs()] == ["ok"]
        assert store.try_claim(key.digest(), "worker-1")  # the table version 2 added
        store.add_trial(key, config={}, status="ok", time_s=0.4, time_spread_s=0.01, time_count=9)
        assert store.integrity_check() == []
    check = sqlite3.connect(path)
    assert check.execute("SELECT value FROM autotune_meta").fetchall() == [(str(SCHEMA_VERSION),)]
    check.close()
    with Store(path) as store:  # opening an up-to-date database again changes nothing
        assert store.trials(key)[-1].time_count == 9


def test_refuses_newer_schema_and_leaves_file_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    Store(path).close()
    connection = sqlite3.connect(path)
    connection.execute("UPDATE autotune_meta SET value = ? WHERE name = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    connection.commit()
    connection.close()
    before = snapshot(path)
    with pytest.raises(SchemaTooNewError, match=f"{path}.*version {SCHEMA_VERSION + 1}"):
        Store(path)
    assert snapshot(path) == before
    # In use by another process in WAL mode: the newest state (in the -wal file) is read, and nothing is changed.
    holder = sqlite3.connect(path)
    holder.execute("UPDATE autotune_meta SET value = ? WHERE name = 'schema_version'", (str(SCHEMA_VERSION + 5),))
    holder.commit()
    files = {name: hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() for name in ("future.db",
                                                                                          "future.db-wal")}
    with pytest.raises(SchemaTooNewError, match=f"version {SCHEMA_VERSION + 5}"):
        Store(path)
    assert files == {name: hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() for name in files}
    holder.close()


@pytest.mark.parametrize("content", [
    os.urandom(4096),
    b"just some notes\n" * 100,
    b"x",
    b"SQLite format 3\x00" + os.urandom(8000),  # right magic, garbage after it
], ids=["random-bytes", "text", "one-byte", "damaged-sqlite"])
def test_refuses_a_file_that_is_not_a_database(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "results.db"
    path.write_bytes(content)
    before = snapshot(path)
    with pytest.raises(NotADatabaseError, match=str(path)):
        Store(path)
    assert snapshot(path) == before


def test_refuses_a_directory(tmp_path: Path) -> None:
    with pytest.raises(NotADatabaseError, match="not a file"):
        Store(tmp_path)


def test_refuses_a_foreign_database_and_leaves_it_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "shop.db"
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
    connection.execute("INSERT INTO customers (name) VALUES ('ada')")
    connection.commit()
    connection.close()
    before = snapshot(path)
    with pytest.raises(ForeignDatabaseError, match=f"{path}.*customers"):
        Store(path)
    assert snapshot(path) == before
    assert issubclass(ForeignDatabaseError, DatabaseError)


def test_locked_database_gives_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "results.db"
    with Store(path, busy_timeout_s=0.2) as store:
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # another process in the middle of a long write
        with pytest.raises(DatabaseError, match="locked"):
            store.add_trial(make_key(), config={}, status="ok")
        holder.execute("ROLLBACK")
        holder.close()
        store.add_trial(make_key(), config={}, status="ok")


def test_unreachable_server_gives_a_clear_error() -> None:
    with pytest.raises(DatabaseError, match="cannot open the results database postgresql"):
        Store("postgresql://nobody:secret@/results?host=/nonexistent-socket-dir")


def test_shares_a_database_with_optuna(tmp_path: Path) -> None:
    optuna = pytest.importorskip("optuna")
    from optuna.storages._rdb import models

    assert OPTUNA_TABLES == set(models.BaseModel.metadata.tables) | {"alembic_version"}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    path, key = tmp_path / "shared.db", make_key()
    url = resolve_url(path)
    study = optuna.create_study(storage=url, study_name=key.digest())  # Optuna's tables first
    study.optimize(lambda trial: trial.suggest_int("block_q", 16, 128), n_trials=2)
    with Store(path) as store:
        assert store.url == url
        store.put_best(key, config={"block_q": 16}, time_s=1.0, default_time_s=None, trials=2)
    other = make_key(q_len=64)
    optuna.create_study(storage=url, study_name=other.digest()).optimize(lambda t: t.suggest_float("x", 0, 1),
                                                                           n_trials=1)
    assert len(optuna.load_study(storage=url, study_name=key.digest()).trials) == 2
    with Store(path) as store:
        assert store.get_best(key).config == {"block_q": 16}
        assert store.integrity_check() == []
    optuna_only = tmp_path / "optuna-only.db"
    optuna.create_study(storage=resolve_url(optuna_only), study_name="s")
    with Store(optuna_only) as store:  # only Optuna's tables: fine, ours are added
        assert store.bests() == []


# -- several processes at once ------------------------------------------------------------------------------------

ROUNDS = 25
SHARED_KEYS = 5


def shared_key(index: int) -> TuningKey:
    return make_key(q_len=128 * (1 + index % SHARED_KEYS))


def trial_time(worker: int, index: int) -> float:
    return 1.0 + ((worker * ROUNDS + index) * 37 % 1000) / 10000  # distinct for every (worker, index)


def hammer(url: str, worker: int, rounds: int, barrier) -> None:
    """One writer process: opens the (maybe not yet existing) database as the others do, then writes."""
    barrier.wait(timeout=60)
    store = Store(url)
    for index in range(rounds):
        key, config = shared_key(index), {"worker": worker, "index": index}
        store.add_trial(key, config=config, status="ok", number=index, time_s=trial_time(worker, index))
        store.put_best(key, config=config, time_s=trial_time(worker, index), default_time_s=2.0, trials=index + 1)
        store.record_miss(key)
        assert store.get_best(key).time_s <= trial_time(worker, index)
    store.close()


def run_writers(url: str, workers: int, rounds: int) -> None:
    # fork: the writers start at once instead of each importing everything again (which costs seconds on 2 cores)
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    barrier = context.Barrier(workers)
    processes = [context.Process(target=hammer, args=(url, worker, rounds, barrier)) for worker in range(workers)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert [process.exitcode for process in processes] == [0] * workers


def check_writers(store: Store, workers: int, rounds: int) -> None:
    trials = store.trials()
    assert len(trials) == workers * rounds
    assert {(t.config["worker"], t.config["index"]) for t in trials} == {
        (w, i) for w in range(workers) for i in range(rounds)}
    for slot in range(SHARED_KEYS):
        candidates = [(trial_time(w, i), w, i) for w in range(workers) for i in range(rounds)
                      if i % SHARED_KEYS == slot]
        fastest, worker, index = min(candidates)
        best = store.get_best(shared_key(slot))
        assert (best.time_s, best.config) == (fastest, {"worker": worker, "index": index})
    assert sum(count for _key, count in store.misses()) == workers * rounds
    assert len(store.misses()) == SHARED_KEYS
    assert store.integrity_check() == []


def test_several_processes_write_at_once(tmp_path: Path) -> None:
    path = tmp_path / "busy.db"  # not created yet: the writers also race to create it
    run_writers(resolve_url(path), workers=4, rounds=ROUNDS)
    with Store(path) as store:
        check_writers(store, workers=4, rounds=ROUNDS)


# -- export / import ------------------------------------------------------------------------------------------------

def fill(store: Store) -> list[TuningKey]:
    keys = [make_key(), make_key(q_len=4096), make_key(dtype="float32"), make_key(causal=False, backward=True),
            make_key(platform="cpu-interpret", device_kind="cpu")]
    for index, key in enumerate(keys):
        store.put_best(key, config={"block_q": 16 << index, "note": "é"}, time_s=0.5 + index,
                       default_time_s=None if index == 2 else 3.0 + index, trials=index + 1)
    return keys


def best_rows(store: Store) -> list[tuple]:
    return sorted((b.key.digest(), b.config, b.time_s, b.default_time_s, b.trials, b.updated_at)
                  for b in store.bests())


def test_export_then_import_into_an_empty_database(tmp_path: Path) -> None:
    with Store(tmp_path / "a.db") as source, Store(tmp_path / "b.db") as target:
        fill(source)
        document = json.loads(json.dumps(export_document(source)))  # must survive real JSON
        assert (document["format"], document["version"]) == ("pallas-autotune-results", 1)
        assert set(document["records"][0]) == {"key", "config", "time_s", "default_time_s", "trials", "updated_at"}
        assert import_document(target, document) == {"imported": 5, "kept_existing": 0}
        assert best_rows(target) == best_rows(source)
        assert import_document(target, document) == {"imported": 0, "kept_existing": 5}
        only_f32 = export_document(source, dtype="float32")
        assert [r["key"]["dtype"] for r in only_f32["records"]] == ["float32"]
        assert len(export_document(source, device_kind=H100, causal=True)["records"]) == 3

        faster, slower = copy.deepcopy(document["records"][0]), copy.deepcopy(document["records"][1])
        faster.update(time_s=0.1, config={"block_q": 1})
        slower.update(time_s=99.0, config={"block_q": 2})
        merged = {**document, "records": [faster, slower]}
        assert import_document(target, merged) == {"imported": 1, "kept_existing": 1}
        assert target.get_best(TuningKey.from_dict(faster["key"])).config == {"block_q": 1}
        assert target.get_best(TuningKey.from_dict(slower["key"])).time_s == 2.5 - 1


def _valid_document() -> dict:
    records = [{"key": make_key(q_len=64 * (index + 1)).to_dict(), "config": {"block_q": 64}, "time_s": 1.0,
                "default_time_s": 2.0, "trials": 3, "updated_at": "2025-01-01T00:00:00+00:00"} for index in range(3)]
    return {"format": "pallas-autotune-results", "version": 1, "exported_at": "2025-01-02T00:00:00+00:00",
            "records": records}


def _record(field: str, value: object):
    def mutate(document: dict) -> None:
        document["records"][2][field] = value
    return mutate


def _key_field(field: str, value: object):
    def mutate(document: dict) -> None:
        document["records"][2]["key"][field] = value
    return mutate


def _drop(field: str):
    def mutate(document: dict) -> None:
        del document["records"][2][field]
    return mutate


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d.update(format="something-else"), ["format"]),
    (lambda d: d.update(version=2), ["format version is 2"]),
    (lambda d: d.update(version=True), ["format version is True"]),
    (lambda d: d.pop("records"), ["missing field(s): records"]),
    (lambda d: d.update(extra=1), ["unknown field(s): extra"]),
    (lambda d: d.update(records={"a": 1}), ["records must be a list"]),
    (lambda d: d.update(exported_at="soon"), ["exported_at"]),
    (lambda d: d["records"].__setitem__(2, "not a record"), ["record 2", "object"]),
    (_record("speed", 3), ["record 2", "unknown field(s): speed"]),
    (_drop("trials"), ["record 2", "missing field(s): trials"]),
    (_record("time_s", float("nan")), ["record 2", "'time_s'", "finite"]),
    (_record("time_s", float("inf")), ["record 2", "'time_s'", "finite"]),
    (_record("time_s", -1.0), ["record 2", "'time_s'"]),
    (_record("time_s", "1.0"), ["record 2", "'time_s'", "number"]),
    (_record("default_time_s", float("nan")), ["record 2", "'default_time_s'"]),
    (_record("trials", True), ["record 2", "'trials'"]),
    (_record("trials", -3), ["record 2", "'trials'"]),
    (_record("config", [1, 2]), ["record 2", "'config'"]),
    (_record("config", {"x": float("nan")}), ["record 2", "'config'"]),
    (_record("updated_at", "yesterday"), ["record 2", "'updated_at'"]),
    (_key_field("batch", "2"), ["record 2", "'key'", "batch"]),
    (_key_field("platform", "cuda"), ["record 2", "'key'", "platform"]),
    (_key_field("colour", "red"), ["record 2", "'key'", "colour"]),
    (lambda d: d["records"][2]["key"].pop("dtype"), ["record 2", "'key'", "dtype"]),
    (_record("key", None), ["record 2", "'key'"]),
])
def test_malformed_import_documents_are_rejected(store: Store, mutate, expected: list[str]) -> None:
    document = _valid_document()
    mutate(document)
    with pytest.raises(ImportValidationError) as raised:
        import_document(store, document)
    for part in expected:
        assert part in str(raised.value)
    assert store.bests() == []  # records 0 and 1 were valid, but nothing is written


def test_import_rejects_a_non_object(store: Store) -> None:
    with pytest.raises(ImportValidationError, match="JSON object"):
        import_document(store, [1, 2])


# -- integrity ------------------------------------------------------------------------------------------------------

def test_integrity_check_reports_problems(tmp_path: Path) -> None:
    path = tmp_path / "results.db"
    with Store(path) as store:
        fill(store)
        store.add_trial(make_key(), config={}, status="ok")
        assert store.integrity_check() == []
    connection = sqlite3.connect(path)  # foreign keys are off by default here, so damage gets in
    connection.execute("UPDATE autotune_keys SET batch = 99 WHERE id = 1")
    connection.execute("INSERT INTO autotune_trials (key_id, config, status, created_at) "
                       "VALUES (777, '{}', 'ok', '2025-01-01 00:00:00.000000')")
    connection.commit()
    connection.close()
    with Store(path) as store:
        problems = store.integrity_check()
    assert any("autotune_keys row 1 has digest" in problem for problem in problems), problems
    assert any("key_id 777 points at no key" in problem for problem in problems), problems
    assert any("foreign_key_check" in problem for problem in problems), problems


# -- where the database lives ---------------------------------------------------------------------------------------

def test_default_url_and_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AUTOTUNE_DB", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    expected = tmp_path / "cache" / "pallas-autotune" / "results.db"
    assert default_url() == f"sqlite:///{expected}"
    with Store() as store:  # the parent directory is created on first use
        assert store.url == default_url()
    assert expected.is_file()

    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # not absolute: ignored, as the XDG spec says
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_url() == f"sqlite:///{tmp_path / 'home' / '.cache' / 'pallas-autotune' / 'results.db'}"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_url() == f"sqlite:///{tmp_path / 'home' / '.cache' / 'pallas-autotune' / 'results.db'}"

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AUTOTUNE_DB", "here.db")
    assert default_url() == f"sqlite:///{tmp_path / 'here.db'}"
    monkeypatch.setenv("AUTOTUNE_DB", "sqlite:///rel/x.db")
    assert default_url() == f"sqlite:///{tmp_path / 'rel' / 'x.db'}"
    monkeypatch.setenv("AUTOTUNE_DB", "postgresql://tuner:secret@dbhost:5433/results")
    assert default_url() == "postgresql+psycopg://tuner:secret@dbhost:5433/results"
    assert resolve_url(tmp_path / "a b?.db").startswith("sqlite:///")
    assert make_url(resolve_url(tmp_path / "a b?.db")).database == str(tmp_path / "a b?.db")
    with pytest.raises(ValueError):
        resolve_url("  ")


def test_public_api_is_exported() -> None:
    for name in ("TuningKey", "RunRecord", "TrialRecord", "BestRecord", "TRIAL_STATUSES", "Store", "default_url",
                 "resolve_url", "DatabaseError", "SchemaTooNewError", "NotADatabaseError", "ForeignDatabaseError",
                 "ImportValidationError", "SCHEMA_VERSION", "export_document", "import_document"):
        assert hasattr(db, name), name
    assert issubclass(ImportValidationError, DatabaseError)


# -- PostgreSQL -----------------------------------------------------------------------------------------------------

@pytest.fixture
def pg_db(pg_url: str):
    """A URL whose search_path is a fresh schema, so every test starts from an empty database."""
    schema = f"test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = make_url(pg_url).update_query_dict({"options": f"-csearch_path={schema}"})
    yield url.render_as_string(hide_password=False)
    with admin.connect() as connection:
        connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


@pytest.mark.postgres
def test_postgres_round_trip(pg_db: str, tmp_path: Path) -> None:
    key = make_key()
    with Store(pg_db) as store:
        assert store.url.startswith("postgresql+psycopg://")
        run_id = store.start_run(host="box", device_kind=H100, platform="gpu", jax_version="0.10.2",
                                 arguments={"a": [1]})
        store.add_trial(key, config={"block_q": 64}, status="ok", run_id=run_id, time_s=1.0, time_spread_s=0.1,
                        time_count=5, max_error=float("nan"))
        assert store.put_best(key, config={"block_q": 64}, time_s=1.0, default_time_s=2.0, trials=1, run_id=run_id)
        assert not store.put_best(key, config={"block_q": 32}, time_s=1.5, default_time_s=2.0, trials=2)
        assert store.put_best(key, config={"block_q": 128}, time_s=0.5, default_time_s=2.0, trials=3)
        store.record_miss(key)
        store.record_miss(key)
        store.finish_run(run_id, "ok")
        fill(store)
    with Store(pg_db) as store:  # reopening finds the schema current
        best = store.get_best(key)
        assert (best.config, best.speedup, best.updated_at.tzinfo) == ({"block_q": 128}, 4.0, timezone.utc)
        [trial] = store.trials(key)
        assert (trial.time_count, trial.max_error, trial.run_id) == (5, math.inf, run_id)
        assert store.misses() == [(key, 2)] and store.runs()[0].status == "ok"
        assert store.try_claim("shape", "w1") and not store.try_claim("shape", "w2")
        assert store.try_claim("shape", "w2", ttl_s=0.0)
        store.release_claim("shape", "w2", done=True)
        assert store.claim_done("shape")
        with Store(tmp_path / "copy.db") as copy_store:
            assert import_document(copy_store, export_document(store))["imported"] == 5
            assert best_rows(copy_store) == best_rows(store)
        assert store.prune(kernel_version="k1", device_kind="cpu") == {
            "bests": 1, "trials": 0, "misses": 0, "keys": 1}
        assert store.integrity_check() == []
        with pytest.raises(ValueError, match="time_s"):
            store.put_best(key, config={}, time_s=float("nan"), default_time_s=None, trials=1)


@pytest.mark.postgres
def test_postgres_several_processes_write_at_once(pg_db: str) -> None:
    run_writers(pg_db, workers=4, rounds=ROUNDS)
    with Store(pg_db) as store:
        check_writers(store, workers=4, rounds=ROUNDS)


@pytest.mark.postgres
def test_postgres_refuses_a_foreign_database(pg_db: str) -> None:
    engine = create_engine(pg_db)
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE customers (id INTEGER PRIMARY KEY)"))
    with pytest.raises(ForeignDatabaseError, match="customers"):
        Store(pg_db)
    with engine.connect() as connection:
        tables = connection.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"))
        assert [row[0] for row in tables] == ["customers"]
    engine.dispose()


@pytest.mark.postgres
def test_postgres_best_committed_between_our_statements(pg_db: str) -> None:
    """Read committed gives each statement a fresh snapshot: a slower best that another writer commits after our
    UPDATE found no row must not make us give up (regression: the faster result was lost)."""
    key = make_key()
    with Store(pg_db) as racer, Store(pg_db) as other:
        other.record_miss(key)  # the key row exists, the best does not yet
        interleaved: list[bool] = []

        @event.listens_for(racer.engine, "after_cursor_execute")
        def commit_a_slower_best(_conn, _cursor, statement, *_rest) -> None:
            if statement.startswith("UPDATE autotune_bests") and not interleaved:
                interleaved.append(other.put_best(key, config={"slow": True}, time_s=2.0, default_time_s=None,
                                                  trials=1))

        assert racer.put_best(key, config={"fast": True}, time_s=1.0, default_time_s=None, trials=1) is True
        assert interleaved == [True]
        assert racer.get_best(key).config == {"fast": True}
