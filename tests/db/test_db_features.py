"""Tests of the database side of the attention features of schema version 4: tuning keys with a sliding window, a
soft-cap and padding lengths (validation, digests that stay those of older keys, round trips through the store and
export/import, nearest-shape neighbours that never mix them), miss reasons, and the upgrade of a version 3 database
on SQLite and PostgreSQL keeping everything it held."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sqlite3
from datetime import datetime, timezone
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from db import (SCHEMA_VERSION, ImportValidationError, MissRecord, Store, TuningKey, export_document,
                import_document)
from db.compile_transfer import merge_compile_trials, parse_compile_trials
from db.records import FEATURE_DEFAULTS
from db.store import MAX_REASON

from tests.db.test_db import H100, make_key, pg_db  # noqa: F401  (pg_db: a fresh PostgreSQL schema per test)

FEATURES = ("window_left", "window_right", "softcap", "lengths")
WINDOWED = {"window_left": 256, "window_right": 0}
FEATURED = [WINDOWED, {"window_left": None, "window_right": 64}, {"window_left": 0, "window_right": None},
            {"softcap": 30.0}, {"lengths": True}, {"window_left": 128, "window_right": 128, "softcap": 50.0,
                                                   "lengths": True}]


# -- TuningKey -----------------------------------------------------------------------------------------------------

def test_defaults_keep_every_old_digest() -> None:
    plain = make_key()
    old_fields = {name: value for name, value in plain.to_dict().items() if name not in FEATURES}
    canonical = json.dumps(old_fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    assert plain.digest() == hashlib.sha256(canonical.encode("ascii")).hexdigest()[:32]
    assert plain.digest() == "1c1949f20d6a197e577c8ef1f2827db4"  # what this key hashed to before version 4
    explicit = make_key(window_left=None, window_right=None, softcap=None, lengths=False)
    assert explicit == plain and explicit.digest() == plain.digest()
    assert set(FEATURES) <= set(plain.to_dict()) and list(FEATURE_DEFAULTS) == list(FEATURES)


@pytest.mark.parametrize("features", FEATURED)
def test_a_feature_makes_another_key(features: dict) -> None:
    key = make_key(**features)
    assert key.digest() != make_key().digest()
    assert TuningKey.from_dict(key.to_dict()) == key
    assert TuningKey.from_dict(json.loads(json.dumps(key.to_dict()))).digest() == key.digest()
    given = {name: value for name, value in key.to_dict().items()
             if name not in FEATURES or value != FEATURE_DEFAULTS[name]}
    canonical = json.dumps(given, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    assert key.digest() == hashlib.sha256(canonical.encode("ascii")).hexdigest()[:32]


def test_window_sides_and_a_zero_window_are_told_apart() -> None:
    digests = {make_key(window_left=left, window_right=right).digest()
               for left, right in [(None, None), (0, None), (None, 0), (0, 0), (8, 0), (0, 8)]}
    assert len(digests) == 6


def test_softcap_is_stored_as_a_float() -> None:
    key = make_key(softcap=30)
    assert isinstance(key.softcap, float) and key == make_key(softcap=30.0)
    assert key.digest() == make_key(softcap=30.0).digest()


@pytest.mark.parametrize("field, value, message", [
    ("window_left", -1, "window_left must be at least 0"),
    ("window_left", 1.5, "window_left must be an integer"),
    ("window_left", True, "window_left must be an integer"),
    ("window_right", "8", "window_right must be an integer"),
    ("window_right", 2**31, "window_right must be at most"),
    ("softcap", 0, "softcap must be a positive finite number"),
    ("softcap", -30.0, "softcap must be a positive finite number"),
    ("softcap", math.nan, "softcap must be a positive finite number"),
    ("softcap", math.inf, "softcap must be a positive finite number"),
    ("softcap", True, "softcap must be a positive finite number"),
    ("softcap", "30", "softcap must be a positive finite number"),
    ("softcap", 10**400, "softcap must be a finite number"),
    ("softcap", 1e39, r"softcap must be at most 2\*\*100"),  # no kernel runs it: never stored nor imported
    ("lengths", 1, "lengths must be true or false"),
    ("lengths", None, "lengths must be true or false"),
])
def test_bad_feature_values_are_refused_naming_the_field(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_key(**{field: value})
    with pytest.raises(ValueError, match=message):
        TuningKey.from_dict({**make_key().to_dict(), field: value})


def test_from_dict_reads_keys_exported_before_the_features() -> None:
    old = {name: value for name, value in make_key().to_dict().items() if name not in FEATURES}
    assert TuningKey.from_dict(old) == make_key()
    with pytest.raises(ValueError, match=r"unknown tuning key field\(s\): window"):
        TuningKey.from_dict({**old, "window": [1, 2]})
    del old["q_len"]
    with pytest.raises(ValueError, match=r"missing tuning key field\(s\): q_len"):
        TuningKey.from_dict(old)


# -- the store -----------------------------------------------------------------------------------------------------

def put_featured(store: Store) -> list[TuningKey]:
    """The plain key and one key per feature set, each with a best whose config names its key."""
    keys = [make_key()] + [make_key(**features) for features in FEATURED]
    for index, key in enumerate(keys):
        store.put_best(key, config={"block_q": 16 << index}, time_s=0.5 + index, default_time_s=9.0, trials=1)
    return keys


def check_featured(store: Store, keys: list[TuningKey]) -> None:
    for index, key in enumerate(keys):
        best = store.get_best(key)
        assert best is not None and best.key == key and best.config == {"block_q": 16 << index}
    assert {best.key for best in store.bests()} == set(keys)
    assert all(isinstance(best.key.softcap, float) for best in store.bests() if best.key.softcap is not None)


def test_featured_keys_round_trip_through_the_store(store: Store) -> None:
    keys = put_featured(store)
    check_featured(store, keys)
    assert len(store.keys()) == len(keys)
    store.add_trial(keys[1], config={"block_q": 64}, status="ok", time_s=1e-3)
    assert [trial.key for trial in store.trials(keys[1])] == [keys[1]] and store.trials(keys[0]) == []
    assert store.integrity_check() == []
    assert store.prune(kernel_version="k1", dry_run=True)["keys"] == len(keys)


def test_neighbours_never_mix_windowed_and_plain_keys(store: Store) -> None:
    shapes = [{"q_len": 512, "kv_len": 512}, {"q_len": 2048, "kv_len": 2048}]
    groups = [{}, WINDOWED, {"window_left": 256, "window_right": None}, {"window_left": 512, "window_right": 0},
              {"softcap": 30.0}, {"softcap": 50.0}, {"lengths": True}, {**WINDOWED, "softcap": 30.0}]
    for group in groups:
        for shape in shapes:
            store.put_best(make_key(**group, **shape), config={"group": repr(group)}, time_s=1.0,
                           default_time_s=None, trials=1)
    for group in groups:
        asked = make_key(**group, q_len=4096, kv_len=4096)  # a shape with no best of its own
        found = store.neighbours(asked)
        assert sorted((best.key.q_len for best in found)) == [512, 2048], group
        assert {best.config["group"] for best in found} == {repr(group)}
        for best in found:
            assert all(getattr(best.key, name) == getattr(asked, name) for name in FEATURES)


def test_featured_keys_survive_export_and_import(tmp_path: Path) -> None:
    compile_key = make_key(platform="gpu-compile", **WINDOWED, softcap=30.0, lengths=True)
    with Store(tmp_path / "a.db") as source, Store(tmp_path / "b.db") as target:
        keys = put_featured(source)
        source.add_trial(compile_key, config={"block_q": 32}, status="compiled",
                          figures={"target": "h100", "kernels": []})
        document = json.loads(json.dumps(export_document(source)))
        assert import_document(target, document) == {"imported": len(keys), "kept_existing": 0}
        check_featured(target, keys)
        [compiled] = parse_compile_trials(document)  # the CLI's import merges these after the bests
        assert compiled.key == compile_key and merge_compile_trials(target, [compiled]) == 1
        assert [trial.key for trial in target.trials(compile_key)] == [compile_key]
        assert len(target.keys()) == len(keys) + 1


def test_an_export_from_before_the_features_imports_as_plain_keys(store: Store) -> None:
    old_key = {name: value for name, value in make_key().to_dict().items() if name not in FEATURES}
    document = {"format": "pallas-autotune-results", "version": 1, "exported_at": "2025-01-02T00:00:00+00:00",
                "records": [{"key": old_key, "config": {"block_q": 64}, "time_s": 1.0, "default_time_s": None,
                             "trials": 1, "updated_at": "2025-01-01T00:00:00+00:00"}]}
    assert import_document(store, document) == {"imported": 1, "kept_existing": 0}
    assert store.get_best(make_key()).config == {"block_q": 64}
    assert store.get_best(make_key(**WINDOWED)) is None
    bad = json.loads(json.dumps(document))
    bad["records"][0]["key"]["softcap"] = -1
    with pytest.raises(ImportValidationError, match="record 0, field 'key': softcap must be a positive"):
        import_document(store, bad)


# -- misses and their reasons ----------------------------------------------------------------------------------------

def test_miss_reasons_are_stored_and_updated(store: Store) -> None:
    plain, windowed = make_key(), make_key(**WINDOWED)
    store.record_miss(plain, reason="bias is given (the kernels take no additive bias)")
    store.record_miss(plain)  # a miss without a reason keeps the stored one, and is counted apart
    store.record_miss(windowed)
    assert store.misses() == [(plain, 1), (windowed, 1)]
    records = store.miss_records()
    assert [(r.key, r.count, r.fallbacks, r.reason) for r in records] == [
        (plain, 1, 1, "bias is given (the kernels take no additive bias)"), (windowed, 1, 0, None)]
    assert all(isinstance(r, MissRecord) and r.last_seen.tzinfo == timezone.utc for r in records)
    store.record_miss(windowed, reason="an arbitrary mask is given")
    store.record_miss(plain, reason="a new reason")
    assert {r.key: (r.count, r.fallbacks, r.reason) for r in store.miss_records()} == {
        plain: (1, 2, "a new reason"), windowed: (1, 1, "an arbitrary mask is given")}
    with pytest.raises(dataclasses.FrozenInstanceError):
        records[0].count = 5  # type: ignore[misc]
    store.clear_miss(plain)
    assert [r.key for r in store.miss_records()] == [windowed]


def test_calls_the_kernels_cannot_run_never_hide_a_keys_tunable_misses(store: Store) -> None:
    """Issue 24, item 8: one bias call made every later plain miss of the key count as 'bias is given'."""
    key, bias_only = make_key(), make_key(q_len=4096, kv_len=4096)
    store.record_miss(key, reason="bias is given (the kernels take no additive bias)")
    for _ in range(3):
        store.record_miss(key)
    store.record_miss(bias_only, reason="bias is given (the kernels take no additive bias)")
    assert store.misses() == [(key, 3)]  # search --misses tunes `key`, and only it
    [first, second] = store.miss_records()
    assert (first.key, first.count, first.fallbacks) == (key, 3, 1)
    assert (second.key, second.count, second.fallbacks) == (bias_only, 0, 1)


def test_miss_reasons_are_cleaned_and_bounded(store: Store) -> None:
    key = make_key(softcap=30.0)
    store.record_miss(key, reason="mask\x1b[31m given\n\tsecond  line\x00")
    assert store.miss_records()[0].reason == "mask [31m given second line"
    store.record_miss(key, reason="x" * 20_000)
    reason = store.miss_records()[0].reason
    assert len(reason) == MAX_REASON and reason.endswith("...")
    store.record_miss(key, reason=" \n ")  # nothing left: like no reason, the stored one stays
    assert store.miss_records()[0].reason == reason
    with pytest.raises(ValueError, match="reason must be a string or None"):
        store.record_miss(make_key(), reason=42)  # type: ignore[arg-type]
    [record] = store.miss_records()  # two fallbacks; a reason that cleans to nothing is a plain miss
    assert (record.count, record.fallbacks) == (1, 2)  # and nothing was written for the refused call


# -- upgrading a version 3 database ------------------------------------------------------------------------------------

V3_SCHEMA = """
CREATE TABLE autotune_meta (name VARCHAR(64) NOT NULL PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE autotune_claims (name VARCHAR(255) NOT NULL PRIMARY KEY, owner VARCHAR NOT NULL,
    claimed_at {ts} NOT NULL, heartbeat_at {ts} NOT NULL, done BOOLEAN NOT NULL);
CREATE TABLE autotune_keys (
    id {id} NOT NULL PRIMARY KEY, digest VARCHAR(64) NOT NULL, kernel VARCHAR NOT NULL,
    kernel_version VARCHAR NOT NULL, platform VARCHAR NOT NULL, device_kind VARCHAR NOT NULL,
    jax_version VARCHAR NOT NULL, batch INTEGER NOT NULL, q_len INTEGER NOT NULL, kv_len INTEGER NOT NULL,
    heads INTEGER NOT NULL, kv_heads INTEGER NOT NULL, head_dim INTEGER NOT NULL, dtype VARCHAR NOT NULL,
    causal BOOLEAN NOT NULL, segments BOOLEAN NOT NULL, backward BOOLEAN NOT NULL, created_at {ts} NOT NULL);
CREATE INDEX ix_autotune_keys_family ON autotune_keys (kernel, kernel_version, platform, device_kind, dtype, causal,
    segments, backward);
CREATE UNIQUE INDEX ix_autotune_keys_digest ON autotune_keys (digest);
CREATE TABLE autotune_runs (
    id {id} NOT NULL PRIMARY KEY, host VARCHAR NOT NULL, device_kind VARCHAR NOT NULL, platform VARCHAR NOT NULL,
    jax_version VARCHAR NOT NULL, arguments JSON NOT NULL, started_at {ts} NOT NULL, ended_at {ts},
    status VARCHAR NOT NULL, message TEXT NOT NULL);
CREATE TABLE autotune_bests (
    id {id} NOT NULL PRIMARY KEY, key_id INTEGER NOT NULL REFERENCES autotune_keys (id), config JSON NOT NULL,
    time_s FLOAT NOT NULL, default_time_s FLOAT, trials INTEGER NOT NULL,
    run_id INTEGER REFERENCES autotune_runs (id) ON DELETE SET NULL, updated_at {ts} NOT NULL);
CREATE UNIQUE INDEX ix_autotune_bests_key_id ON autotune_bests (key_id);
CREATE TABLE autotune_misses (
    key_id INTEGER NOT NULL PRIMARY KEY REFERENCES autotune_keys (id), count INTEGER NOT NULL,
    last_seen {ts} NOT NULL);
CREATE TABLE autotune_trials (
    id {id} NOT NULL PRIMARY KEY, key_id INTEGER NOT NULL REFERENCES autotune_keys (id),
    run_id INTEGER REFERENCES autotune_runs (id) ON DELETE SET NULL, number INTEGER, config JSON NOT NULL,
    status VARCHAR NOT NULL, error_class VARCHAR, error_message TEXT, compile_s FLOAT, time_s FLOAT,
    time_spread_s FLOAT, time_count INTEGER, max_error FLOAT, figures JSON, created_at {ts} NOT NULL);
CREATE INDEX ix_autotune_trials_key_id ON autotune_trials (key_id);
INSERT INTO autotune_meta VALUES ('schema_version', '3')
"""
STAMP = datetime(2024, 5, 1, 12, tzinfo=timezone.utc)
V3_KEYS = [make_key(), make_key(q_len=2048, kv_len=2048, causal=False, backward=True)]


def v3_statements(postgres: bool) -> list[str]:
    """The version 3 tables holding two keys, each with a run's trial and a best, and a miss of the first."""
    schema = V3_SCHEMA.format(id="SERIAL" if postgres else "INTEGER",
                              ts="TIMESTAMP WITH TIME ZONE" if postgres else "DATETIME")
    stamp = "'2024-05-01 12:00:00+00'" if postgres else "'2024-05-01 12:00:00.000000'"
    statements = schema.split(";")
    statements.append(f"INSERT INTO autotune_runs VALUES (1, 'box', '{H100}', 'gpu', '0.10.2', '{{}}', {stamp}, "
                      f"{stamp}, 'ok', '')")
    for index, key in enumerate(V3_KEYS, start=1):
        fields = {name: value for name, value in key.to_dict().items() if name not in FEATURES}
        values = ", ".join(repr(value).lower() if isinstance(value, bool) and postgres else
                           str(int(value)) if isinstance(value, bool) else
                           f"'{value}'" if isinstance(value, str) else str(value) for value in fields.values())
        statements += [
            f"INSERT INTO autotune_keys (id, digest, {', '.join(fields)}, created_at) VALUES "
            f"({index}, '{key.digest()}', {values}, {stamp})",
            f"INSERT INTO autotune_trials VALUES ({index}, {index}, 1, 0, '{{\"block_q\": {64 * index}}}', 'ok', "
            f"NULL, NULL, 1.0, 0.{index}, 0.01, 7, 0.0, NULL, {stamp})",
            f"INSERT INTO autotune_bests VALUES ({index}, {index}, '{{\"block_q\": {64 * index}}}', 0.{index}, 1.0, "
            f"3, 1, {stamp})"]
    statements.append(f"INSERT INTO autotune_misses VALUES (1, 4, {stamp})")
    if postgres:  # rows inserted with explicit ids: move the sequences past them
        statements += [f"SELECT setval('{table}_id_seq', 10)" for table in
                       ("autotune_keys", "autotune_runs", "autotune_bests", "autotune_trials")]
    return [statement.strip() for statement in statements if statement.strip()]


def check_upgraded(store: Store) -> None:
    """Everything the version 3 database held is found, under the same digests, and the new fields work."""
    for index, key in enumerate(V3_KEYS, start=1):
        best = store.get_best(key)
        assert best is not None and best.id == index and best.key.digest() == key.digest()
        assert (best.config, best.time_s, best.trials, best.run_id) == ({"block_q": 64 * index}, index / 10, 3, 1)
        assert best.updated_at == STAMP
        [trial] = store.trials(key)
        assert (trial.time_s, trial.time_count, trial.run_id) == (index / 10, 7, 1)
        assert best.key.lengths is False and best.key.window_left is None and best.key.softcap is None
    assert store.misses() == [(V3_KEYS[0], 4)]
    [miss] = store.miss_records()
    assert (miss.key, miss.count, miss.last_seen, miss.reason) == (V3_KEYS[0], 4, STAMP, None)
    assert [best.key for best in store.neighbours(make_key(q_len=4096))] == [V3_KEYS[0]]
    assert [run.status for run in store.runs()] == ["ok"]
    assert store.integrity_check() == []

    windowed = make_key(**WINDOWED, softcap=30.0, lengths=True)
    store.put_best(windowed, config={"block_q": 16}, time_s=0.05, default_time_s=None, trials=1)
    store.record_miss(V3_KEYS[0], reason="bias is given")
    assert store.get_best(windowed).key == windowed and store.get_best(V3_KEYS[0]).config == {"block_q": 64}
    assert store.neighbours(make_key(q_len=4096)) == [store.get_best(V3_KEYS[0])]
    assert store.miss_records()[0].reason == "bias is given"
    assert store.integrity_check() == []


def test_a_version_3_database_upgrades_keeping_everything(tmp_path: Path) -> None:
    path = tmp_path / "v3.db"
    connection = sqlite3.connect(path)
    for statement in v3_statements(postgres=False):
        connection.execute(statement)
    connection.commit()
    connection.close()
    with Store(path) as store:
        check_upgraded(store)
    check = sqlite3.connect(path)
    try:
        assert check.execute("SELECT value FROM autotune_meta").fetchall() == [(str(SCHEMA_VERSION),)] == [("6",)]
        indexed = [row[2] for row in check.execute("PRAGMA index_info(ix_autotune_keys_family)")]
        assert indexed[-4:] == list(FEATURES)
        assert check.execute("SELECT lengths FROM autotune_keys WHERE id = 1").fetchone() == (0,)
    finally:
        check.close()
    with Store(path, read_only=True) as reader:  # opening it again changes nothing
        assert len(reader.bests()) == 3 and reader.misses()[0] == (V3_KEYS[0], 4)
        assert reader.miss_records()[0].fallbacks == 1


def test_a_fresh_database_has_the_version_4_columns(store: Store) -> None:
    with store.engine.connect() as connection:
        keys = {row[1]: row for row in connection.exec_driver_sql("PRAGMA table_info(autotune_keys)")}
        misses = {row[1] for row in connection.exec_driver_sql("PRAGMA table_info(autotune_misses)")}
    assert keys["lengths"][3] == 1 and keys["lengths"][4] is not None  # NOT NULL with a server default
    assert all(keys[name][3] == 0 for name in ("window_left", "window_right", "softcap")) and "reason" in misses


@pytest.mark.postgres
def test_postgres_version_3_database_upgrades_keeping_everything(pg_db: str, tmp_path: Path) -> None:
    engine = create_engine(pg_db)
    try:
        with engine.begin() as connection:
            for statement in v3_statements(postgres=True):
                connection.execute(text(statement.replace(":", r"\:")))
        with Store(pg_db) as store:
            check_upgraded(store)
            neighbours = store.neighbours(make_key(**WINDOWED, softcap=30.0, lengths=True, q_len=64))
            assert [best.config for best in neighbours] == [{"block_q": 16}]
            with Store(tmp_path / "copy.db") as copy_store:
                assert import_document(copy_store, export_document(store))["imported"] == 3
                assert {best.key for best in copy_store.bests()} == {best.key for best in store.bests()}
        with engine.connect() as connection:
            assert connection.execute(text("SELECT value FROM autotune_meta")).scalar_one() == str(SCHEMA_VERSION)
            assert connection.execute(text("SELECT lengths FROM autotune_keys WHERE id = 1")).scalar_one() is False
    finally:
        engine.dispose()
