"""Predicted bests through the command line, from compile-only trials with predictions written through the db API
(as `search --target` writes them): `list` and `show --target` label them predicted, apart from timings, and
`export`/`import` carry them so `lookup(device_kind=...)` finds the same predicted best in the copy; documents
from before predictions still import."""
from __future__ import annotations

import json
import random

import jax
import pytest
from click.testing import CliRunner

import autotune
from autotune.cli.app import main
from autotune.compile.model.prediction import TPU_MODEL_VERSION
from autotune.compile.results import compile_key
from autotune.compile.targets import get_target
from autotune.space import Space
from db import Store
from kernels import Problem, tpu

V5E = get_target("v5e")
PROBLEM = Problem(batch=1, q_len=512, kv_len=512, heads=4, kv_heads=2, head_dim=128, dtype="bfloat16", causal=True)
FLAGS = ["--batch", "1", "--seq-len", "512", "--heads", "4", "--kv-heads", "2", "--head-dim", "128", "--dtype",
         "bfloat16", "--causal"]
LOOKUP = ((1, 512, 4, 128), (1, 512, 2, 128), "bfloat16")


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(autouse=True)
def fresh_runtime():
    autotune.reload()
    yield
    autotune.reload()
    autotune.configure()


@pytest.fixture
def predicted_db(tmp_path):
    """v5e compile-only trials of PROBLEM, four with predictions in a random order and one failed compile."""
    db = tmp_path / "results.db"
    key = compile_key(tpu.NAME, tpu.VERSION, "tpu", V5E.device_kind, jax.__version__, PROBLEM)
    configs = random.sample(Space(tpu, PROBLEM, V5E.device_kind).valid_configs(), 5)
    seconds = [random.uniform(1e-4, 1e-2) for _ in configs[:4]]
    with Store(db) as store:
        for config, time_s in zip(configs, seconds):
            prediction = {"seconds": time_s, "roofline_seconds": time_s * random.uniform(0.2, 0.9),
                          "bound": random.choice(["compute", "memory", "overhead"]),
                          "parts": {"dma": time_s / 3}, "model_version": TPU_MODEL_VERSION}
            store.add_trial(key, config=config.to_dict(), status="compiled", compile_s=random.uniform(0.5, 3),
                            figures={"target": "v5e", "prediction": prediction,
                                     "kernels": [{"role": "forward", "name": "fwd", "memory_bytes": 4096}]})
        store.add_trial(key, config=configs[4].to_dict(), status="resource_exhausted", compile_s=0.4,
                        error_class="resources_exhausted", error_message="E1001: CompileTimeScopedVmemOom",
                        figures={"target": "v5e", "kernels": [], "failure_kind": "resources_exhausted",
                                 "requested_bytes": 99, "limit_bytes": 98})
    best = min(zip(seconds, configs), key=lambda pair: pair[0])
    return db, best[1].to_dict(), best[0], sorted(seconds)


def test_list_and_show_label_the_predicted_best_apart_from_timings(predicted_db):
    db, best, best_s, ordered = predicted_db
    listed = invoke("list", "--db", db)
    assert listed.exit_code == 0, listed.output  # predicted bests only: listed, not "no tuned results"
    assert "Predicted bests" in listed.output and "NOT timed" in listed.output and "best ms" not in listed.output
    [row] = [line for line in listed.output.splitlines() if line.startswith("v5e ")]
    assert f"{best_s * 1e3:.4g}" in row and TPU_MODEL_VERSION in row and " 4" in row
    [entry] = json.loads(invoke("list", "--json", "--db", db).output)
    assert entry["source"] == "predicted" and entry["time_s"] is None and entry["speedup"] is None
    assert entry["times"] == {} and entry["implementation"] == "pallas"  # no timing of anything, the kernel runs
    assert entry["config"] == best and entry["predicted_s"] == best_s and entry["model_version"] == TPU_MODEL_VERSION
    assert invoke("list", "--device", "TPU v4", "--db", db).exit_code == 1

    shown = invoke("show", "--target", "v5e", *FLAGS, "--db", db)
    assert shown.exit_code == 0, shown.output
    assert "best       none measured" in shown.output and "ranked by PREDICTED time" in shown.output
    rows = [line.split() for line in shown.output.splitlines()
            if line.startswith("- ") and line.split()[1] in ("compiled", "resource_exhausted")]
    ranks = [next((cell for cell in row if cell.startswith("#")), row[1]) for row in rows]
    assert ranks == ["#1", "#2", "#3", "#4", "resource_exhausted"]  # predicted order, the failure after them
    as_json = json.loads(invoke("show", "--target", "v5e", *FLAGS, "--json", "--db", db).output)
    assert [r["predicted_s"] for r in as_json["predicted"]["ranked"]] == ordered
    assert as_json["predicted"]["predicted_best"]["config"] == best


def test_export_import_carries_the_predicted_best_and_older_documents_still_import(predicted_db, tmp_path):
    db, best, best_s, _ordered = predicted_db
    exported = tmp_path / "predicted.json"
    assert invoke("export", exported, "--db", db).exit_code == 0
    copy = tmp_path / "copy.db"
    imported = invoke("import", exported, "--json", "--db", copy)
    assert imported.exit_code == 0 and json.loads(imported.output)["compile_trials_added"] == 5, imported.output
    autotune.configure(db=str(copy))
    found = autotune.lookup(*LOOKUP, causal=True, device_kind=V5E.device_kind)
    assert found.source == "predicted" and found.config.to_dict() == best
    assert found.prediction.seconds == best_s and found.prediction.model_version == TPU_MODEL_VERSION

    older = json.loads(exported.read_text())  # as exported before predictions: the same trials without them
    for trial in older["compile_trials"]:
        trial["figures"].pop("prediction", None)
    old_file = tmp_path / "older.json"
    old_file.write_text(json.dumps(older))
    old_copy = tmp_path / "old-copy.db"
    assert invoke("import", old_file, "--db", old_copy).exit_code == 0
    autotune.configure(db=str(old_copy))
    autotune.reload()
    assert autotune.lookup(*LOOKUP, causal=True, device_kind=V5E.device_kind).source == "heuristic"
