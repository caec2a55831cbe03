"""`autotune list`, `show`, `export`, `import`, `prune` and `bench` against a database filled by a small search."""
from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner

from autotune.cli.app import main
from autotune.device import current_device
from autotune.keys import make_key
from autotune.search.loop import SearchOptions, search_problem
from autotune.options import TimingPolicy
from db import Store, TuningKey
from kernels import Problem
from tests import toy_kernel

FAST = TimingPolicy(warmup=1, samples=3, min_sample_s=1e-4)
TOY = "tests.toy_kernel"
CAUSAL = Problem(batch=1, q_len=32, kv_len=32, heads=2, kv_heads=1, head_dim=16, causal=True)
PLAIN = Problem(batch=1, q_len=32, kv_len=32, heads=1, kv_heads=1, head_dim=16)
CAUSAL_FLAGS = ["--batch", "1", "--seq-len", "32", "--heads", "2", "--kv-heads", "1", "--head-dim", "16", "--causal"]
# Grid order is the default (32, 32) first, then (16, 16), (16, 32): one failure class injected per problem.
SEARCHES = [(CAUSAL, {"compile_error": {"block_q": 16, "block_k": 32}}, 3),
            (PLAIN, {"mismatch": {"block_q": 16, "block_k": 16}}, 2)]
_FILLED: dict[str, Path] = {}


def fill_database(directory: Path) -> Path:
    """Once per test process (test_report shares it): two small grid searches of the toy kernel."""
    if "path" not in _FILLED:
        path = directory / "filled.db"
        store = Store(path)
        device = current_device()
        run_id = store.start_run(host=device.host, device_kind=device.device_kind, platform=device.platform,
                                 jax_version=device.jax_version, arguments={"test": True})
        saved = os.environ.get("AUTOTUNE_TOY_FAULTS")
        try:
            for problem, faults, trials in SEARCHES:
                os.environ["AUTOTUNE_TOY_FAULTS"] = json.dumps(faults)
                search_problem(problem, kernel_name=TOY, store=store, device=device, run_id=run_id, progress=False,
                               options=SearchOptions(trials=trials, sampler="grid", seed=0, timing=FAST,
                                                     compare_xla=False, retime_top=2))
        finally:
            os.environ.pop("AUTOTUNE_TOY_FAULTS", None)
            if saved is not None:
                os.environ["AUTOTUNE_TOY_FAULTS"] = saved
        store.finish_run(run_id, "ok")
        store.close()
        _FILLED["path"] = path
    return _FILLED["path"]


def copy_database(source: Path, target: Path) -> Path:
    """A private copy for tests that write (SQLite's backup API also copies what is still in the WAL)."""
    with sqlite3.connect(source) as src, sqlite3.connect(target) as dst:
        src.backup(dst)
    return target


@pytest.fixture(scope="module")
def filled(tmp_path_factory) -> Path:
    return fill_database(tmp_path_factory.mktemp("inspect"))


def run(*args: str, input: str | None = None):
    return CliRunner().invoke(main, [str(a) for a in args], input=input)


def assert_clean_failure(result, message: str) -> None:
    """Exit code 1, the message said, and no traceback."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert message in result.output and "Traceback" not in result.output


# ---------------------------------------------------------------- list


def test_list_shows_one_row_per_tuned_key(filled):
    result = run("list", "--db", filled)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:4] == ["id", "device", "kernel", "problem"]
    rows = [line for line in lines if "toy_flash_attention@" in line]
    assert len(rows) == 2
    assert "b1 q32 kv32 h2/1 d16 float32 causal" in result.output and "b1 q32 kv32 h1/1 d16 float32 " in result.output


def test_list_json_matches_the_database(filled):
    result = run("list", "--json", "--db", filled)
    assert result.exit_code == 0, result.output
    listed = json.loads(result.stdout)
    bests = Store(filled).bests()
    assert [row["id"] for row in listed] == [b.id for b in bests]
    for row, best in zip(listed, bests):
        assert TuningKey.from_dict(row["key"]) == best.key and row["digest"] == best.key.digest()
        assert row["config"] == best.config and row["time_s"] == best.time_s
        assert row["default_time_s"] == best.default_time_s and row["trials"] == best.trials
        assert row["speedup"] == pytest.approx(best.default_time_s / best.time_s)
        assert row["updated_at"] == best.updated_at.isoformat()


@pytest.mark.parametrize("flags, expected", [
    (["--causal"], [True]), (["--no-causal"], [False]), (["--kernel", TOY], [True, False]),
    (["--device", current_device().device_kind, "--dtype", "float32"], [True, False]),
])
def test_list_filters(filled, flags, expected):
    result = run("list", "--json", *flags, "--db", filled)
    assert result.exit_code == 0, result.output
    assert [row["key"]["causal"] for row in json.loads(result.stdout)] == expected


@pytest.mark.parametrize("flags", [["--dtype", "bfloat16"], ["--device", "TPU v9"], ["--kernel", "tpu"]])
def test_list_with_nothing_matching_says_so(filled, flags):
    assert_clean_failure(run("list", *flags, "--db", filled), "no tuned results in")


# ---------------------------------------------------------------- show


def test_show_by_flags_and_by_id_agree_with_the_database(filled):
    key = make_key(toy_kernel, CAUSAL, current_device())
    store = Store(filled)
    best = store.get_best(key)
    by_flags = run("show", *CAUSAL_FLAGS, "--kernel", TOY, "--json", "--db", filled)
    by_id = run("show", "--id", best.id, "--json", "--db", filled)
    assert by_flags.exit_code == 0 and by_id.exit_code == 0, by_flags.output + by_id.output
    shown = json.loads(by_flags.stdout)
    assert shown == json.loads(by_id.stdout)
    assert shown["digest"] == key.digest() and shown["best"]["config"] == best.config
    trials = store.trials(key)
    assert [t["id"] for t in shown["trials"]] == [t.id for t in sorted(trials, key=lambda t: t.number)]
    assert shown["status_counts"] == {"ok": 2, "compile_error": 1} and shown["failures"] == {"compile_error": 1}
    ok = [t for t in shown["trials"] if t["status"] == "ok"]
    assert all(t["time_s"] > 0 and t["time_spread_s"] >= 0 and t["compile_s"] > 0 for t in ok)
    failed = next(t for t in shown["trials"] if t["status"] == "compile_error")
    assert failed["error_message"] == "injected compile failure" and failed["config"]["block_k"] == 32


def test_show_table_lists_trials_and_failure_classes(filled):
    result = run("show", *CAUSAL_FLAGS, "--kernel", TOY, "--db", filled)
    assert result.exit_code == 0, result.output
    assert "3 trial(s)" in result.output and "RuntimeError: injected compile failure" in result.output
    assert "failures: compile_error 1" in result.output
    assert "block_k=16 block_q=16" in result.output  # the fields that vary between trials
    plain = run("show", "--batch", "1", "--seq-len", "32", "--heads", "1", "--head-dim", "16", "--kernel", TOY,
                "--db", filled)
    assert "failures: mismatch 1" in plain.output and "differs from the reference" in plain.output


def test_show_a_key_with_trials_but_no_best(filled, tmp_path):
    db = copy_database(filled, tmp_path / "partial.db")
    problem = CAUSAL.replace(batch=2)
    Store(db).add_trial(make_key(toy_kernel, problem, current_device()), config={"block_q": 16}, status="timeout",
                        error_class="Timeout", error_message="compiling took too long")
    result = run("show", "--batch", "2", *CAUSAL_FLAGS[2:], "--kernel", TOY, "--db", db)
    assert result.exit_code == 0, result.output
    assert "none stored" in result.output and "Timeout: compiling took too long" in result.output


def test_show_unknown_keys_and_ids_say_so(filled):
    assert_clean_failure(run("show", "--id", "999", "--db", filled), "no tuned result with id 999")
    unknown = run("show", "--batch", "7", *CAUSAL_FLAGS[2:], "--kernel", TOY, "--db", filled)
    assert_clean_failure(unknown, "no results for b7 q32 kv32")
    assert run("show", "--db", filled).exit_code == 2  # neither --id nor a problem
    assert run("show", "--id", "1", "--batch", "1", "--db", filled).exit_code == 2


# ---------------------------------------------------------------- export / import


def test_export_then_import_into_an_empty_database_reproduces_list(filled, tmp_path):
    document = tmp_path / "results.json"
    exported = run("export", document, "--db", filled)
    assert exported.exit_code == 0, exported.output
    assert json.loads(document.read_text())["format"] == "pallas-autotune-results"
    empty = tmp_path / "empty.db"
    imported = run("import", document, "--db", empty)
    assert imported.exit_code == 0 and "Imported 2 of 2" in imported.output
    assert run("list", "--db", empty).output == run("list", "--db", filled).output
    strip = lambda rows: [{k: v for k, v in row.items() if k != "run_id"} for row in rows]  # noqa: E731
    assert strip(json.loads(run("list", "--json", "--db", empty).stdout)) == \
        strip(json.loads(run("list", "--json", "--db", filled).stdout))
    again = run("import", document, "--json", "--db", empty)
    assert json.loads(again.stdout) == {"records": 2, "selected": 2, "imported": 0, "kept_existing": 2}


def test_export_and_import_filter_like_list(filled, tmp_path):
    document = tmp_path / "causal.json"
    assert run("export", document, "--causal", "--db", filled).exit_code == 0
    assert [r["key"]["causal"] for r in json.loads(document.read_text())["records"]] == [True]
    everything = tmp_path / "all.json"
    run("export", everything, "--db", filled)
    result = run("import", everything, "--no-causal", "--json", "--db", tmp_path / "plain.db")
    assert json.loads(result.stdout)["imported"] == 1
    assert [r["key"]["causal"] for r in json.loads(run("list", "--json", "--db", tmp_path / "plain.db").stdout)] \
        == [False]


def test_import_rejects_bad_documents_clearly(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "something else"}')
    assert_clean_failure(run("import", bad, "--db", tmp_path / "x.db"), "missing field(s)")
    bad.write_text("not json")
    assert_clean_failure(run("import", bad, "--db", tmp_path / "x.db"), "is not a JSON document")
    assert_clean_failure(run("import", tmp_path / "missing.json", "--db", tmp_path / "x.db"), "cannot read")
    assert not (tmp_path / "x.db").exists()  # nothing is written before the document is read and checked


# ---------------------------------------------------------------- prune


def foreign_key(device_kind: str) -> TuningKey:
    return TuningKey(kernel="flash_attention_gpu", kernel_version="old", platform="gpu", device_kind=device_kind,
                     jax_version="0.4.1", batch=1, q_len=128, kv_len=128, heads=1, kv_heads=1, head_dim=64,
                     dtype="bfloat16", causal=False, segments=False, backward=False)


def test_prune_removes_exactly_what_the_filter_names(filled, tmp_path):
    db = copy_database(filled, tmp_path / "prune.db")
    store = Store(db)
    for device_kind in ("Fake GPU A", "Fake GPU B"):
        store.put_best(foreign_key(device_kind), config={"block_q": 64}, time_s=1e-3, default_time_s=2e-3, trials=2)
        store.add_trial(foreign_key(device_kind), config={"block_q": 64}, status="ok", time_s=1e-3)
    store.record_miss(foreign_key("Fake GPU A"))
    before = json.loads(run("list", "--json", "--db", db).stdout)

    dry = run("prune", "--device", "Fake GPU A", "--dry-run", "--json", "--db", db)
    assert json.loads(dry.stdout) == {"removed": False, "keys": 1, "bests": 1, "trials": 1, "misses": 1,
                                      "optuna_studies": 0}
    declined = run("prune", "--device", "Fake GPU A", "--db", db, input="n\n")
    assert declined.exit_code == 1 and "Remove 1 key with 1 best, 1 trial, 1 miss row" in declined.output
    assert json.loads(run("list", "--json", "--db", db).stdout) == before

    removed = run("prune", "--device", "Fake GPU A", "--db", db, input="y\n")
    assert removed.exit_code == 0 and "Removed 1 key with 1 best, 1 trial, 1 miss row" in removed.output
    assert json.loads(run("list", "--json", "--db", db).stdout) == [r for r in before
                                                                  if r["key"]["device_kind"] != "Fake GPU A"]
    assert not store.misses()

    nothing = run("prune", "--older-than", "2000-01-01", "--yes", "--db", db)
    assert nothing.exit_code == 0 and "no rows removed" in nothing.output
    assert len(store.bests()) == 3


def test_prune_by_kernel_takes_the_optuna_studies_too(filled, tmp_path):
    db = copy_database(filled, tmp_path / "studies.db")
    url = Store(db).url
    assert len(optuna.get_all_study_names(url)) == 2
    result = run("prune", "--kernel", TOY, "--yes", "--json", "--db", db)
    assert json.loads(result.stdout) == {"removed": True, "keys": 2, "bests": 2, "trials": 5, "misses": 0,
                                         "optuna_studies": 2}
    assert optuna.get_all_study_names(url) == [] and not Store(db).trials()
    assert_clean_failure(run("list", "--db", db), "no tuned results in")


def test_prune_needs_a_filter(filled):
    result = run("prune", "--yes", "--db", filled)
    assert result.exit_code == 2 and "prune needs a filter" in result.output
    assert run("prune", "--older-than", "last week", "--db", filled).exit_code == 2


# ---------------------------------------------------------------- empty databases


READERS = [["list"], ["list", "--json"], ["show", "--id", "1"], ["export", "out.json"], ["prune", "--device", "x"]]


@pytest.mark.parametrize("command", READERS[:4])
def test_an_empty_database_gives_a_clear_message(tmp_path, command):
    Store(tmp_path / "empty.db").close()
    assert_clean_failure(run(*command, "--db", tmp_path / "empty.db"), "no tuned result")


@pytest.mark.parametrize("command", READERS)
def test_a_missing_database_is_reported_not_created(tmp_path, command):
    assert_clean_failure(run(*command, "--db", tmp_path / "missing.db"), "no results database at")
    assert not (tmp_path / "missing.db").exists()


# ---------------------------------------------------------------- bench


def test_bench_times_every_implementation_side_by_side(filled, tmp_path):
    shapes = tmp_path / "shapes.toml"
    shapes.write_text("[[problem]]\nbatch = 1\nseq_len = 32\nheads = 2\nkv_heads = 1\nhead_dim = 16\ncausal = true\n"
                      "\n[[problem]]\nbatch = 1\nseq_len = 32\nheads = 2\nhead_dim = 16\n")
    result = run("bench", "--shapes", shapes, "--kernel", TOY, "--samples", "3", "--peak-size", "256", "--json",
                 "--db", filled)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    peak = report["peaks"]["float32"]
    assert peak["size"] == 256 and peak["tflops"] == pytest.approx(2 * 256 ** 3 / peak["time_s"] / 1e12)
    tuned, untuned = report["problems"]
    names = [r["name"] for r in tuned["results"]]
    assert names == ["tuned", "default", "jax pallas mha", "xla dot_product_attention",
                     "cudnn dot_product_attention", "einsum reference"]
    rows = {r["name"]: r for r in tuned["results"]}
    assert rows["tuned"]["config"] == Store(filled).get_best(make_key(toy_kernel, CAUSAL, current_device())).config
    assert tuned["flops"] == 4 * 1 * 2 * (32 * 33 // 2) * 16  # the visible (query, key) pairs, diagonal included
    for name in ("tuned", "default", "jax pallas mha", "xla dot_product_attention", "einsum reference"):
        row = rows[name]
        assert row["time_s"] > 0, row
        assert row["tflops"] == pytest.approx(tuned["flops"] / row["time_s"] / 1e12)
        assert row["peak_share"] == pytest.approx(row["tflops"] / peak["tflops"])
    assert rows["cudnn dot_product_attention"]["time_s"] is None
    assert rows["cudnn dot_product_attention"]["note"] == "GPU only"
    untuned_rows = {r["name"]: r for r in untuned["results"]}
    assert untuned["best_id"] is None and untuned_rows["tuned"]["note"].startswith("not tuned")
    assert untuned_rows["default"]["time_s"] > 0 and untuned_rows["einsum reference"]["time_s"] > 0
