"""Stored schema versions (issue 24, items 11 and 12): an unreadable one is one clear line, and an older database
on storage that cannot be written is read as it is, without upgrading it, when its upgrades only added columns."""
from __future__ import annotations

import json
import shutil
import sqlite3
import tempfile
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from db import SCHEMA_VERSION, DatabaseError, Store
from db.migrations import COLUMNS_ADDED, STEPS, columns_missing
from tests.db.test_db_features import V3_KEYS, v3_statements
from tests.test_hostile import _in_unwritable_folder, folder_state


def older_database(path: Path, version: int) -> Path:
    """A version-3 database with two keys, their trials and bests and a miss, walked up to `version` by the real
    upgrade steps."""
    connection = sqlite3.connect(path)
    for statement in v3_statements(postgres=False):
        connection.execute(statement)
    connection.commit()
    connection.close()
    engine = create_engine(f"sqlite:///{path}")
    with engine.begin() as connection:
        for step in range(3, version):
            STEPS[step](connection)
        connection.execute(text("UPDATE autotune_meta SET value = :v"), {"v": str(version)})
    engine.dispose()
    path.chmod(0o644)
    return path


def columns(path: Path) -> dict[str, set[str]]:
    connection = sqlite3.connect(path)
    try:
        tables = [row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {table: {row[1] for row in connection.execute(f"PRAGMA table_info({table})")} for table in tables}
    finally:
        connection.close()


def everything(store: Store) -> dict:
    """What a reader sees of the database, as plain JSON values."""
    return {"bests": sorted((b.key.digest(), b.config, b.time_s, b.implementation, b.times) for b in store.bests()),
            "keys": sorted(k.digest() for k in store.keys()),
            "trials": sorted((t.key.digest(), t.config, t.time_s, t.figures) for t in store.trials()),
            "misses": [(m.key.digest(), m.count, m.fallbacks, m.reason) for m in store.miss_records()],
            "neighbours": [b.key.digest() for b in store.neighbours(V3_KEYS[0])]}


@pytest.mark.parametrize("raw", ["-1", "0", "", "abc", "4.5", "+4", "1e3", "9" * 5000])
def test_an_unreadable_schema_version_is_one_clear_line(tmp_path: Path, raw: str) -> None:
    path = older_database(tmp_path / "vx.db", 4)
    connection = sqlite3.connect(path)
    connection.execute("UPDATE autotune_meta SET value = ?", (raw,))
    connection.commit()
    connection.close()
    before = folder_state(path)
    for options in ({}, {"read_only": True}, {"create": False, "read_only": None}):
        with pytest.raises(DatabaseError, match=f"{path} has an autotune_meta table but no readable schema version"):
            Store(path, **options)
    assert folder_state(path) == before


def test_the_column_only_upgrades_are_recorded_as_what_they_add(tmp_path: Path) -> None:
    path = older_database(tmp_path / "v3.db", 3)
    before = columns(path)
    Store(path).close()
    after = columns(path)
    added = {table: after[table] - before[table] for table in before if after[table] - before[table]}
    assert added == {table: set(cols) for table, cols in columns_missing(3).items()}
    assert sorted(COLUMNS_ADDED) == [2, 3, 4, 5] and columns_missing(SCHEMA_VERSION) == {}
    assert columns_missing(1) is None  # version 2 added a table: read only after an upgrade


@pytest.mark.parametrize("version", [3, 4, 5])
def test_an_older_database_on_read_only_storage_is_read_as_it_is(version: int) -> None:
    folder = Path(tempfile.mkdtemp(prefix="autotune-legacy-"))  # not under pytest's root-only tmp folders
    try:
        folder.chmod(0o755)
        path = older_database(folder / "old.db", version)
        shutil.copy(path, folder / "upgraded.db")
        with Store(folder / "upgraded.db", read_only=True) as upgraded:  # writable: upgraded, then read
            want = everything(upgraded)
            assert upgraded.notice is None
        (folder / "upgraded.db").unlink()
        before = folder_state(path)

        def read() -> list:
            with Store(path, read_only=True) as reader:
                seen = everything(reader)
                notice = reader.notice
            with Store(path, create=False, read_only=None) as runtime:  # the runtime's way
                assert runtime.read_only and runtime.get_best(V3_KEYS[0]).config == {"block_q": 64}
            return [seen, notice]

        seen, notice = _in_unwritable_folder(folder, read)
        assert seen == {name: [list(item) if isinstance(item, tuple) else item for item in items]
                        for name, items in want.items()}
        assert f"schema version {version}" in notice and "without upgrading it" in notice
        assert folder_state(path) == before
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def raw_rows(path: Path) -> dict[str, list[tuple]]:
    """Every row of our tables as SQLite holds it (the columns every version has, in one order)."""
    connection = sqlite3.connect(path)
    try:
        return {"bests": connection.execute("SELECT key_id, config, time_s, default_time_s, trials, run_id "
                                            "FROM autotune_bests ORDER BY id").fetchall(),
                "trials": connection.execute("SELECT key_id, config, status, time_s FROM autotune_trials "
                                             "ORDER BY id").fetchall(),
                "misses": connection.execute("SELECT key_id, count FROM autotune_misses ORDER BY key_id").fetchall(),
                "keys": connection.execute("SELECT id, digest FROM autotune_keys ORDER BY id").fetchall()}
    finally:
        connection.close()


@pytest.mark.parametrize("version", [4, 5])
def test_an_older_database_upgrades_with_every_best_a_kernel_win_timed_alone(tmp_path: Path, version: int) -> None:
    path = older_database(tmp_path / f"v{version}.db", version)
    before = raw_rows(path)
    assert before["bests"] and before["trials"] and before["misses"]
    with Store(path) as store:  # upgraded in place to the current version
        bests = {b.key.digest(): b for b in store.bests()}
    assert raw_rows(path) == before  # every record kept as it was
    assert columns(path)["autotune_bests"] >= {"implementation", "times"}
    digests = dict(before["keys"])
    stored = {digests[key_id]: (json.loads(config), time_s) for key_id, config, time_s, *_ in before["bests"]}
    assert {digest: (b.config, b.time_s) for digest, b in bests.items()} == stored
    for best in bests.values():
        assert best.implementation == "pallas" and not best.baseline_won
        assert best.times == {"pallas": best.time_s}
    with Store(path) as store:  # the upgraded database takes a baseline's win beside the old kernel wins
        key = next(iter(bests.values())).key
        faster = bests[key.digest()].time_s / 2
        assert store.put_best(key, config={"block_q": 64}, time_s=faster, default_time_s=None, trials=1,
                              implementation="xla", times={"pallas": faster * 3, "xla": faster})
        assert store.get_best(key).implementation == "xla"
        assert store.integrity_check() == []
