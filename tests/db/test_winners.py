"""The database side of issue 27: a best names the implementation that won its final re-timing (the kernel, or
jax.nn's XLA or cuDNN attention) with every implementation's time; bad winners are one clear line; export and import
carry them (format version 3), and older documents import as kernel wins."""
from __future__ import annotations

import json
import random
import sqlite3
from pathlib import Path

import pytest

from db import BestOffer, ImportValidationError, Store, export_document, import_document, read_document
from tests.db.test_db import make_key


def random_times() -> tuple[float, float]:
    """A kernel time and a clearly faster XLA time, fresh each test."""
    kernel = random.uniform(1e-3, 5e-3)
    return kernel, kernel * random.uniform(0.3, 0.8)


@pytest.mark.parametrize("changes, message", [
    ({"implementation": "triton"}, "implementation must be one of pallas, xla, cudnn"),
    ({"implementation": "xla", "times": None}, "times must give the kernel's time beside the winner's"),
    ({"implementation": "xla", "times": {"xla": "T"}}, "times must hold the 'pallas' time"),
    ({"implementation": "xla", "times": {"pallas": 2e-3, "xla": 1e-3}}, "time_s must be the winner's time"),
    ({"times": {"pallas": "T", "gpu": 1e-3}}, "times' implementation must be one of"),
    ({"times": {"pallas": "T", "xla": -1.0}}, "times['xla'] must be at least"),
    ({"times": [1e-3]}, "times must be an object of implementation names to seconds"),
])
def test_a_bad_winner_is_one_clear_line_naming_the_field(changes: dict, message: str) -> None:
    time_s = random.uniform(1e-3, 5e-3)
    if isinstance(changes.get("times"), dict):
        changes = {**changes, "times": {name: time_s if value == "T" else value
                                        for name, value in changes["times"].items()}}
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        BestOffer(key=make_key(), config={"block_q": 64}, time_s=time_s, **changes)


def test_a_baseline_win_is_stored_with_every_time_and_a_kernel_win_alone_reads_as_the_kernels(tmp_path: Path) -> None:
    kernel, xla = random_times()
    with Store(tmp_path / "results.db") as store:
        store.put_best(make_key(), config={"block_q": 64}, time_s=xla, default_time_s=kernel * 2, trials=5,
                       implementation="xla", times={"pallas": kernel, "xla": xla})
        store.put_best(make_key(batch=4), config={"block_q": 32}, time_s=kernel, default_time_s=None, trials=3)
        won, alone = store.get_best(make_key()), store.get_best(make_key(batch=4))
    assert (won.implementation, won.times, won.time_s, won.baseline_won) == ("xla", {"pallas": kernel, "xla": xla},
                                                                             xla, True)
    assert won.config == {"block_q": 64} and won.speedup == pytest.approx(kernel * 2 / xla)
    assert (alone.implementation, alone.times, alone.baseline_won) == ("pallas", {"pallas": kernel}, False)


def test_keep_the_faster_compares_the_winners_times(tmp_path: Path) -> None:
    kernel, xla = random_times()
    with Store(tmp_path / "results.db") as store:
        assert store.put_best(make_key(), config={"block_q": 64}, time_s=kernel, default_time_s=None, trials=2,
                              times={"pallas": kernel, "xla": kernel * 1.01})
        # another worker's run where XLA won: faster than the stored kernel win, so it replaces it
        assert store.put_best(make_key(), config={"block_q": 32}, time_s=xla, default_time_s=None, trials=4,
                              implementation="xla", times={"pallas": kernel * 1.1, "xla": xla})
        assert not store.put_best(make_key(), config={"block_q": 16}, time_s=kernel, default_time_s=None, trials=4)
        best = store.get_best(make_key())
    assert (best.implementation, best.config, best.time_s) == ("xla", {"block_q": 32}, xla)


def test_a_hand_edited_winner_reads_as_the_kernels_and_the_integrity_check_names_it(tmp_path: Path) -> None:
    kernel, xla = random_times()
    path = tmp_path / "results.db"
    with Store(path) as store:
        store.put_best(make_key(), config={"block_q": 64}, time_s=xla, default_time_s=None, trials=1,
                       implementation="xla", times={"pallas": kernel, "xla": xla})
    connection = sqlite3.connect(path)
    connection.execute("UPDATE autotune_bests SET implementation = 'warp-drive'")
    connection.commit()
    connection.close()
    with Store(path) as store:
        best = store.get_best(make_key())
        problems = store.integrity_check()
    assert (best.implementation, best.times) == ("pallas", {"pallas": xla})
    assert len(problems) == 1 and "unreadable winner" in problems[0] and "warp-drive" in problems[0]


def test_export_carries_the_winner_and_import_restores_it(tmp_path: Path) -> None:
    kernel, xla = random_times()
    with Store(tmp_path / "a.db") as source:
        source.put_best(make_key(), config={"block_q": 64}, time_s=xla, default_time_s=kernel, trials=5,
                        implementation="xla", times={"pallas": kernel, "xla": xla})
        source.put_best(make_key(batch=4), config={"block_q": 32}, time_s=kernel, default_time_s=None, trials=3)
        document = read_document(json.dumps(export_document(source)))
    assert document["version"] == 3
    assert [(r["implementation"], r["times"]) for r in document["records"]] == [
        ("xla", {"pallas": kernel, "xla": xla}), ("pallas", {"pallas": kernel})]
    with Store(tmp_path / "b.db") as target:
        assert import_document(target, document) == {"imported": 2, "kept_existing": 0}
        restored = target.get_best(make_key())
    assert (restored.implementation, restored.times, restored.time_s) == ("xla", {"pallas": kernel, "xla": xla}, xla)


def test_a_database_of_kernel_wins_alone_exports_as_version_1_which_older_versions_read(tmp_path: Path) -> None:
    kernel, _xla = random_times()
    with Store(tmp_path / "a.db") as source:
        source.put_best(make_key(), config={"block_q": 64}, time_s=kernel, default_time_s=None, trials=5)
        document = export_document(source)
    assert document["version"] == 1 and set(document["records"][0]) == {
        "key", "config", "time_s", "default_time_s", "trials", "updated_at"}
    with Store(tmp_path / "b.db") as target:
        import_document(target, document)
        best = target.get_best(make_key())
    assert (best.implementation, best.times) == ("pallas", {"pallas": kernel})


def document_of(version: int, **record_fields) -> dict:
    record = {"key": make_key().to_dict(), "config": {"block_q": 64}, "time_s": 1e-3, "default_time_s": None,
              "trials": 1, "updated_at": "2025-01-02T00:00:00+00:00", **record_fields}
    return {"format": "pallas-autotune-results", "version": version, "exported_at": "2025-01-02T00:00:00+00:00",
            "records": [record]}


@pytest.mark.parametrize("version, fields, message", [
    (1, {"implementation": "xla", "times": {"pallas": 2e-3, "xla": 1e-3}}, "record 0 has unknown field"),
    (3, {}, "record 0 is missing field\\(s\\): implementation, times"),
    (3, {"implementation": "fast", "times": {"pallas": 1e-3}}, "record 0, field 'implementation'"),
    (3, {"implementation": "xla", "times": {"xla": 1e-3}}, "record 0, field 'times'"),
    (4, {}, "reads versions 1, 2 and 3"),
])
def test_an_import_with_a_bad_winner_is_refused_before_anything_is_written(tmp_path: Path, version: int,
                                                                          fields: dict, message: str) -> None:
    with Store(tmp_path / "b.db") as target:
        with pytest.raises(ImportValidationError, match=message):
            import_document(target, document_of(version, **fields))
        assert target.bests() == []
