"""A compile-only trial's config and figures against the schema the compile path writes (issue 24, item 2): the
compile path's own figures (and a performance model's prediction) pass and round-trip through export and import;
anything else is refused before a row is written; rows stored before are read as "no figures" or skipped."""
from __future__ import annotations

import copy
import dataclasses
import json
import random
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import pytest

from autotune.compile.figures import KernelFigures
from autotune.compile.results import figures_of
from autotune.config_check import check_any_kernel, check_fields_any_kernel
from db import ImportValidationError, Store, export_document
from db.compile_transfer import merge_compile_trials, parse_compile_trials
from autotune.compile.results import REJECTED, trial_verdict
from db.figures import KERNEL_FIELDS, RESOURCE_EXHAUSTED, check_figures
from db.transfer import read_document
from tests.db.test_db import make_key

FORWARD = KernelFigures(role="forward", name="flash_attention_fwd", memory_bytes=53248, registers=96,
                        spill_store_bytes=0, spill_load_bytes=0, stack_bytes=0, threads=128)
PREDICTION = {"seconds": 2.5e-5, "roofline_seconds": 1.1e-5, "bound": "memory",
              "parts": {"mxu": 1.0e-5, "dma": 2.1e-5}, "model_version": "tpu-1"}
CONFIG = {"block_q": 64, "block_k": 32, "num_warps": 4, "num_stages": 2, "bwd_block_q": 32, "bwd_block_k": 32,
          "bwd_num_warps": 4, "bwd_num_stages": 2}


def compiled_figures() -> dict:
    return figures_of(SimpleNamespace(kernels=(FORWARD,), ok=True), "h100")


def failed_figures() -> dict:
    return figures_of(SimpleNamespace(kernels=(), ok=False, failure_kind=RESOURCE_EXHAUSTED,
                                      requested_bytes=300_000, limit_bytes=232_448), "h100")


def test_the_compile_paths_own_figures_fit_the_schema() -> None:
    assert KERNEL_FIELDS == tuple(field.name for field in dataclasses.fields(KernelFigures))
    for figures in (compiled_figures(), failed_figures(), {**compiled_figures(), "prediction": PREDICTION}):
        assert check_figures(json.loads(json.dumps(figures))) == figures


def test_figures_and_trials_stored_with_the_old_spelling_read_as_out_of_memory() -> None:
    # versions before 2026-12 stored the failure kind as 'resources_exhausted' (the trial status had one 's' less)
    old = {**failed_figures(), "failure_kind": "resources_exhausted"}
    assert check_figures(old) == failed_figures()
    trial = SimpleNamespace(status=RESOURCE_EXHAUSTED, error_class="resources_exhausted", figures=old)
    assert trial_verdict(trial) == REJECTED


def test_a_compiles_prediction_is_stored_with_its_figures_and_one_off_the_schema_is_left_out() -> None:
    seconds = random.uniform(1e-6, 1e-2)
    prediction = {**PREDICTION, "seconds": seconds, "parts": {"dma": seconds / 2}}
    stored = figures_of(SimpleNamespace(kernels=(FORWARD,), ok=True, prediction=prediction), "v5e")
    assert stored["prediction"] == prediction and check_figures(stored) == stored
    unfit = {**prediction, "parts": {str(i): seconds for i in range(65)}}
    assert "prediction" not in figures_of(SimpleNamespace(kernels=(FORWARD,), ok=True, prediction=unfit), "v5e")
    failed = SimpleNamespace(kernels=(), ok=False, failure_kind="other", requested_bytes=None, limit_bytes=None,
                             prediction=prediction)
    assert "prediction" not in figures_of(failed, "v5e")


@pytest.mark.parametrize("change, named", [
    (lambda f: f.update(kernels="x"), "figures['kernels'] must be a list"),
    (lambda f: f.update(kernels=5), "figures['kernels'] must be a list"),
    (lambda f: f["kernels"][0].update(memory_bytes="53248"), "figures['kernels'][0]['memory_bytes'] must be an int"),
    (lambda f: f["kernels"][0].update(registers=-1), "figures['kernels'][0]['registers'] must be at least 0"),
    (lambda f: f["kernels"][0].update(role="everything"), "figures['kernels'][0]['role'] must be one of"),
    (lambda f: f["kernels"][0].update(extra=1), "figures['kernels'][0] has unknown field(s) ['extra']"),
    (lambda f: f.update(kernels=[f["kernels"][0]] * 17), "at most 16 kernels"),
    (lambda f: f["kernels"][0].update(name="x" * 71_000_000), "['name'] must be at most"),
    (lambda f: f.update(target=None), "figures['target'] is required"),
    (lambda f: f.pop("target"), "figures lacks ['target']"),
    (lambda f: f.update(failure_kind="melted"), "figures['failure_kind'] must be one of"),
    (lambda f: f.update(prediction={**PREDICTION, "seconds": float("nan")}), "['seconds'] must be a finite"),
    (lambda f: f.update(prediction={**PREDICTION, "parts": {"a": "1"}}), "['parts']['a'] must be a number"),
    (lambda f: f.update(prediction={k: v for k, v in PREDICTION.items() if k != "bound"}), "lacks ['bound']"),
    (lambda f: f.update(prediction={**PREDICTION, "parts": {str(i): 0.0 for i in range(65)}}), "at most 64"),
])
def test_figures_of_any_other_shape_are_refused_naming_the_part(change, named: str) -> None:
    figures = compiled_figures()
    change(figures)
    with pytest.raises(ValueError) as raised:
        check_figures(figures)
    assert named in str(raised.value)


def document(store_path: Path, **trial_changes) -> dict:
    """An export document with one compile-only trial of the built-in GPU kernel (an old build: its fields are
    checked, not its limits), changed as asked."""
    key = make_key(platform="gpu-compile", kernel="flash_attention_gpu", kernel_version="0123456789ab")
    with Store(store_path) as store:
        store.add_trial(key, config=CONFIG, status="compiled", compile_s=2.3,
                        figures={**compiled_figures(), "prediction": PREDICTION})
        exported = json.loads(json.dumps(export_document(store)))
    exported["compile_trials"][0].update(trial_changes)
    return exported


def parse(doc: dict):
    return parse_compile_trials(read_document(json.dumps(doc)), check=check_any_kernel,
                                fields_check=check_fields_any_kernel)


def test_a_prediction_round_trips_through_export_and_import(tmp_path: Path) -> None:
    trials = parse(document(tmp_path / "a.db"))
    with Store(tmp_path / "b.db") as target:
        assert merge_compile_trials(target, trials) == 1
        [trial] = target.trials()
    assert trial.figures["prediction"] == PREDICTION and trial.config == CONFIG


@pytest.mark.parametrize("changes, named", [
    ({"figures": {"kernels": "x"}}, "field 'figures': figures lacks ['target']"),
    ({"figures": {"target": "h100", "kernels": 5}}, "field 'figures': figures['kernels'] must be a list"),
    ({"status": "resource_exhausted", "config": {"block_q": [1, 2]}}, "field 'config': config['block_q'] must be"),
    ({"status": "compile_error", "config": {**CONFIG, "block_q": "64"}}, "field 'config': config['block_q'] must"),
    ({"status": "compile_error", "config": {**CONFIG, "colour": 3}}, "unknown Config field(s) ['colour']"),
    ({"status": "compile_error", "config": {f"f{i}": 1 for i in range(65)}}, "at most 64 fields"),
])
def test_an_import_with_a_bad_compile_trial_is_refused_before_anything_is_written(tmp_path: Path, changes,
                                                                                     named: str) -> None:
    doc = document(tmp_path / "a.db", **changes)
    with pytest.raises(ImportValidationError) as raised:
        parse(doc)
    assert str(raised.value).startswith("compile trial 0, field") and named in str(raised.value)


def test_a_failed_trials_config_the_rules_refuse_still_imports(tmp_path: Path) -> None:
    """A failure's config may be one the validity rules now refuse (that is often why it failed); only its fields
    are checked."""
    huge = {**CONFIG, "block_q": 4096, "block_k": 4096}
    [trial] = parse(document(tmp_path / "a.db", status="resource_exhausted", config=huge,
                             figures=failed_figures()))
    assert trial.config == huge


def test_bad_rows_stored_before_are_read_as_no_figures_or_skipped(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    key = make_key(platform="gpu-compile")
    with Store(path) as store:
        ids = [store.add_trial(key, config=CONFIG, status="compiled", figures=compiled_figures()) for _ in range(5)]
    connection = sqlite3.connect(path)  # what an older version or a hand edit may have left
    for trial_id, column, value in ((ids[0], "figures", {"kernels": "x"}), (ids[1], "figures", {"kernels": 5}),
                                    (ids[2], "config", {"block_q": [1, 2]}), (ids[3], "config", [1, 2])):
        connection.execute(f"UPDATE autotune_trials SET {column} = ? WHERE id = ?", (json.dumps(value), trial_id))
    connection.commit()
    connection.close()
    with Store(path) as store:
        trials = store.trials(key)
        assert [t.id for t in trials] == [ids[0], ids[1], ids[2], ids[4]]  # a config that is no object: skipped
        assert [t.figures for t in trials] == [None, None, compiled_figures(), compiled_figures()]
        problems = store.integrity_check()
        assert len(problems) == 3 and all("autotune_trials row" in p for p in problems)
        doc = export_document(store)
    with pytest.raises(ImportValidationError, match="compile trial 2, field 'config'"):
        parse(copy.deepcopy(doc))  # what the compile path never writes is not carried on either


def test_the_nesting_check_reads_strings_without_a_cost_per_character() -> None:
    """Before parsing, the document's depth is measured with its strings taken out; the old pattern kept a
    backtracking entry per character of a string (8.6 GB of memory for one 71 MB string)."""
    import resource
    import time

    from db.transfer import _nesting_depth

    assert _nesting_depth('{"a": "x\\"[[[[", "b": [[1]], "c": "\\\\"}') == 3
    text = '{"kernels": [{"name": "' + "x" * 20_000_000 + '"}]}'
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    began = time.monotonic()
    assert _nesting_depth(text) == 3
    assert time.monotonic() - began < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: not GBs
