"""`autotune search --target`: real deviceless compiles recorded as compile-only trials, shown by `show`, and used by
the device search to skip what spilled or what the compiler rejected. The compilers are never faked: the device is
(a DeviceInfo claiming the H100's device kind while the kernels run in interpret mode)."""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from dataclasses import dataclass

import jax
import optuna
import pytest
from click.testing import CliRunner

from autotune.cli.app import main
from autotune.cli.compile_listing import size_text
from autotune.compile.results import REJECTED, SPILLS, XLA_KERNEL, ahead_of_time, compile_key
from autotune.compile.pool import INSTALL_HINT, compilers_missing
from autotune.device import DeviceInfo
from autotune.keys import make_key
from autotune.kernel_protocol import load_kernel
from autotune.search.loop import Search, SearchOptions, search_problem
from autotune.space import Space
from autotune.compile.search import TargetPlan, run_plans
from autotune.compile.targets import get_target
from autotune.options import TimingPolicy
from db import SCHEMA_VERSION, Store
from db.records import RESOURCE_EXHAUSTED
from kernels import Problem, gpu

H100 = get_target("h100")
TINY = ["--batch", "1", "--seq-len", "32", "--heads", "2", "--kv-heads", "1", "--head-dim", "16"]
TINY_TPU = ["--batch", "1", "--seq-len", "256", "--heads", "2", "--kv-heads", "1", "--head-dim", "128",
            "--dtype", "bfloat16"]
FAST = TimingPolicy(warmup=1, samples=3, min_sample_s=1e-4)
# A problem small enough to run in interpret mode, where 128-row blocks with 4 warps spill registers on H100.
SPILLY = Problem(batch=1, q_len=128, kv_len=128, heads=2, kv_heads=1, head_dim=64, dtype="float32")


def needs(platform: str) -> None:
    reason = compilers_missing(platform)
    if reason:
        pytest.skip(f"no {platform.upper()} compiler here: {reason} (install: {INSTALL_HINT})")


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@dataclass(frozen=True)
class ClaimedH100(DeviceInfo):
    """The device double: an H100's device kind on the GPU platform, while the kernels run in interpret mode."""

    @property
    def interpret(self) -> bool:
        return True


def h100_double() -> ClaimedH100:
    return ClaimedH100("gpu", H100.device_kind, jax.__version__, "test-host")


# ---------------------------------------------------------------- a real compile-only search, shown


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """Both targets' compile-only searches through the CLI, into one database: {target: (db, problem args)}."""
    folder = tmp_path_factory.mktemp("target-search")
    db = folder / "results.db"
    done = {}
    for name, args in (("h100", TINY), ("v5e", TINY_TPU)):
        if compilers_missing(get_target(name).platform):
            continue
        result = invoke("search", "--target", name, *args, "--trials", "3", "--seed", "1", "--quiet", "--db", db)
        assert result.exit_code == 0, result.output
        done[name] = (db, args, result.output)
    return done


@pytest.mark.parametrize("name", ["h100", "v5e"])
def test_compile_only_search_records_real_figures_that_show_displays(swept, name):
    needs(get_target(name).platform)
    db, args, output = swept[name]
    assert "compiled" in output and name in output
    assert "Estimated time: about " in output and f"{name} 3 x " in output  # said before it starts (item 4)
    with Store(db) as store:
        keys = [k for k in store.keys(device_kind=get_target(name).device_kind) if k.kernel != XLA_KERNEL]
        assert len(keys) == 1 and keys[0].platform == get_target(name).platform + "-compile"
        trials = store.trials(keys[0])
        assert store.bests() == []  # nothing timed, nothing stored as tuned
    assert 1 <= len(trials) <= 3 and all(t.time_s is None for t in trials)
    compiled = [t for t in trials if t.status == "compiled"]
    assert compiled and all(t.compile_s > 0 for t in trials)
    for trial in compiled:
        kernels = trial.figures["kernels"]
        assert trial.figures["target"] == name and [k["role"] for k in kernels] == ["forward"]
        # a TPU kernel whose operands XLA placed in VMEM itself (S(1) layouts, a problem this small) reports no
        # scoped VMEM of its own: 0 is the compiler's figure then, so only the bound and one real use are asserted
        assert 0 <= kernels[0]["memory_bytes"] <= get_target(name).memory_limit_bytes
        if name == "h100":
            assert kernels[0]["registers"] > 0 and kernels[0]["threads"] % 32 == 0
    assert max(t.figures["kernels"][0]["memory_bytes"] for t in compiled) > 0
    study = optuna.load_study(study_name=keys[0].digest(), storage=f"sqlite:///{db}")
    assert len(study.trials) == len(trials)
    predictions = {json.dumps(t.config, sort_keys=True): t.figures["prediction"] for t in compiled}
    for frozen in study.trials:  # the value is the predicted time, labelled so; no timing is claimed
        assert frozen.state == optuna.trial.TrialState.COMPLETE and frozen.user_attrs["kind"] == "compile_only"
        stored = predictions[json.dumps(frozen.user_attrs["config"], sort_keys=True)]
        assert frozen.value == stored["seconds"] and frozen.user_attrs["predicted"] is True
        assert frozen.user_attrs["value"] == f"predicted seconds (model {stored['model_version']})"
    ranked = sorted(predictions.values(), key=lambda p: p["seconds"])
    assert "ranked by PREDICTED time" in output and f"model {ranked[0]['model_version']}" in output
    assert f"{ranked[0]['seconds'] * 1e3:.4g} ms predicted" in output.split("predicted best: ")[1]

    shown = invoke("show", "--target", name, *args, "--db", db)
    assert shown.exit_code == 0, shown.output
    assert "compile-only" in shown.output and f"[{get_target(name).platform}-compile]" in shown.output
    assert size_text(compiled[0].figures['kernels'][0]['memory_bytes']) in shown.output
    if name == "h100":
        assert f"r{compiled[0].figures['kernels'][0]['registers']}" in shown.output
    as_json = json.loads(invoke("show", "--target", name, *args, "--json", "--db", db).output)
    by_config = {json.dumps(t.config, sort_keys=True): t.figures for t in trials}
    assert {json.dumps(t["config"], sort_keys=True): t["figures"] for t in as_json["trials"]} == by_config
    seconds = [t["figures"]["prediction"]["seconds"] for t in as_json["trials"] if t["status"] == "compiled"]
    assert seconds == sorted(seconds)  # `show --target` lists the compiled trials by predicted time
    listed = invoke("list", "--db", db)  # no measured best: the predicted best, labelled so
    assert listed.exit_code == 0 and "Predicted bests" in listed.output and "best ms" not in listed.output


def test_a_second_run_resumes_without_compiling_again(swept):
    needs("gpu")
    db, args, _ = swept["h100"]
    with Store(db) as store:
        before = len(store.trials())
    result = invoke("search", "--target", "h100", *args, "--trials", "3", "--seed", "1", "--quiet", "--db", db)
    assert result.exit_code == 0, result.output
    with Store(db) as store:
        assert len(store.trials()) == before
    # issue 25, item 7: it printed empty `0config` bars and "0 compiles"; item 4: the next steps
    assert "all 3 configs of each target and problem are already recorded; raise --trials" in result.output
    assert "0config" not in result.output and "0 compiles" not in result.output
    flags = " ".join(args)
    assert f"Next: autotune show --target h100 {flags} --dtype float32 --db {db}" in result.output
    assert f"then run `autotune search {flags} --dtype float32 --db {db}` there" in result.output
    assert "h100's results apply on: NVIDIA H100 80GB HBM3" in result.output


def test_report_maps_each_target_and_export_import_carry_the_trials(swept, tmp_path):
    needs("gpu")
    db, args, _ = swept["h100"]
    page = tmp_path / "report.html"
    result = invoke("report", page, "--db", db)
    assert result.exit_code == 0 and "compile-only trial(s)" in result.output, result.output
    text = page.read_text()
    assert "What compiles, per target" in text and "h100 (NVIDIA H100 80GB HBM3, compile-only)" in text
    assert 'data-chart="compile-' in text and "Trial times by block_q and block_k" in text
    predicted = text.split("Predicted times, per target (static model, not timed)")[1]
    assert "ranked by PREDICTED time" in predicted and "<th>predicted ms</th>" in predicted
    assert "compiled" not in text.split("<h2>Failure classes</h2>")[1].split("<h2>")[0]  # not a failure class

    exported = tmp_path / "sweep.json"
    assert invoke("export", exported, "--db", db).exit_code == 0
    document = json.loads(exported.read_text())
    assert document["version"] == 2 and document["records"] == []
    other = tmp_path / "other.db"
    first = invoke("import", exported, "--json", "--db", other)
    again = invoke("import", exported, "--json", "--db", other)
    assert first.exit_code == 0 and again.exit_code == 0, first.output + again.output
    assert json.loads(first.output)["compile_trials_added"] == len(document["compile_trials"]) > 0
    assert json.loads(again.output)["compile_trials_added"] == 0
    with Store(db) as source, Store(other) as copy:
        assert sorted(json.dumps([t.key.to_dict(), t.config, t.status, t.figures], sort_keys=True)
                      for t in copy.trials()) == sorted(
            json.dumps([t.key.to_dict(), t.config, t.status, t.figures], sort_keys=True) for t in source.trials())


# ---------------------------------------------------------------- the device search uses them


@pytest.fixture(scope="module")
def spilled(tmp_path_factory):
    """Real H100 compiles of SPILLY: two configs that spill, one that does not."""
    needs("gpu")
    store = Store(tmp_path_factory.mktemp("spills") / "results.db")
    kernel = load_kernel("gpu")
    space = Space(kernel, SPILLY, H100.device_kind)
    base = space.default.to_dict()
    configs = [gpu.Config.from_dict({**base, "block_q": 128, "block_k": 128, "num_warps": 4, "num_stages": s})
               for s in (1, 2)] + [gpu.Config.from_dict({**base, "block_q": 32, "block_k": 32, "num_warps": 4})]
    assert space.default not in configs  # the default is never skipped (the baseline): kept out of this test
    key = compile_key(kernel.NAME, kernel.VERSION, "gpu", H100.device_kind, jax.__version__, SPILLY)
    from autotune.shapes import ProblemSpec

    plan = TargetPlan(H100, ProblemSpec(SPILLY), key, space, tuple(configs), valid=len(configs))
    [summary] = run_plans([plan], store)
    yield store, configs, summary
    store.close()


def test_device_search_skips_configs_that_spilled_ahead_of_time(spilled):
    store, configs, summary = spilled
    trials = {json.dumps(t.config, sort_keys=True): t for t in store.trials()}
    spills = [c for c in configs if trials[json.dumps(c.to_dict(), sort_keys=True)].figures["kernels"][0]
              ["spill_store_bytes"]]
    assert summary.spilled == len(spills) >= 1, "the real compiler no longer spills these configs"
    device = h100_double()
    options = SearchOptions(trials=2, seed=0, sampler="random", timing=FAST, compare_xla=False, retime_top=1)
    search = Search(SPILLY, load_kernel("gpu"), "gpu", store, device, options, progress=False)
    assert all(search.space.skip_reason(c) == SPILLS for c in spills)
    assert search.skip_note.startswith(f"{len(spills)} of {len(search.space.valid_configs())} candidates skipped: "
                                       f"{len(spills)} spill")
    allowed = Search(SPILLY, load_kernel("gpu"), "gpu", store, device,
                     SearchOptions(**{**options.__dict__, "allow_spills": True}), progress=False)
    assert allowed.skip_note is None and all(allowed.space.skip_reason(c) is None for c in spills)

    # The spilling configs come first (enqueued after the default): they are set aside, and the budget of 2 is
    # spent on configs that did not spill.
    key = make_key(load_kernel("gpu"), SPILLY, device)
    study = optuna.create_study(study_name=key.digest(), storage=store.url, direction="minimize")
    for config in [search.space.default, *spills]:
        study.enqueue_trial(search.space.params(config))
    result = search_problem(SPILLY, kernel_name="gpu", store=store, device=device, options=options, progress=False)
    rows = store.trials(key)
    skipped = [t for t in rows if t.error_class == "SpillsAheadOfTime"]
    assert sorted(json.dumps(t.config, sort_keys=True) for t in skipped) == sorted(
        json.dumps(c.to_dict(), sort_keys=True) for c in spills)
    assert all(t.status == "invalid" for t in skipped)
    evaluated = [t for t in rows if t.status == "ok"]
    assert len(evaluated) == 2 and not {json.dumps(t.config, sort_keys=True) for t in evaluated} & {
        json.dumps(c.to_dict(), sort_keys=True) for c in spills}
    assert result.trials_run == 2 and result.ahead_of_time == search.skip_note


def test_a_config_the_compiler_rejected_is_skipped_as_rejected(tmp_path):
    """The checks refuse this config too; compiled anyway (the compile workers ignore the checks), the real
    compiler rejects it, and the device search's verdict for it is 'rejected'."""
    needs("gpu")
    problem = Problem(batch=1, q_len=1024, kv_len=1024, heads=1, kv_heads=1, head_dim=64, dtype="float32")
    kernel = load_kernel("gpu")
    space = Space(kernel, problem, H100.device_kind)
    config = gpu.Config.from_dict({**space.default.to_dict(), "block_q": 128, "block_k": 128, "num_warps": 4,
                                   "num_stages": 4})
    key = compile_key(kernel.NAME, kernel.VERSION, "gpu", H100.device_kind, jax.__version__, problem)
    from autotune.shapes import ProblemSpec

    with Store(tmp_path / "r.db") as store:
        [summary] = run_plans([TargetPlan(H100, ProblemSpec(problem), key, space, (config,))], store)
        [trial] = store.trials(key)
        assert summary.failed == {RESOURCE_EXHAUSTED: 1}
        assert trial.status == trial.error_class == RESOURCE_EXHAUSTED
        assert trial.figures["requested_bytes"] > trial.figures["limit_bytes"] == H100.memory_limit_bytes
        ahead = ahead_of_time(store, make_key(kernel, problem, h100_double()))
    assert ahead is not None and ahead.skip_reason(config.to_dict()) == REJECTED
    assert "1 rejected by the compiler ahead of time" in ahead.describe([config.to_dict()])
    assert Space(kernel, problem, None, ahead).skip_reason(config) == REJECTED


# ---------------------------------------------------------------- bad input: refused before anything is written


@pytest.mark.parametrize("args, named", [
    (["--target", "h200x"], "known targets: h100, h100-pcie, h200, a100"),
    (["--target", "v5e", "--kernel", "gpu"], "--kernel tpu"),
    (["--target", "h100,v9"], "unknown target 'v9'"),
    (["--target", "h100", "--kernel", "tests.toy_kernel"], "'gpu' or 'tpu'"),
])
def test_bad_targets_are_refused_before_anything_is_written(tmp_path, args, named):
    result = invoke("search", *TINY, *args, "--quiet", "--db", tmp_path / "new.db")
    assert result.exit_code == 2, result.output
    last = [line for line in result.output.splitlines() if line.strip()][-1]
    assert last.startswith("Error") and "--target" in last and named in last
    assert os.listdir(tmp_path) == []


def test_a_missing_compiler_names_its_install_before_anything_is_written(tmp_path, monkeypatch):
    import autotune.compile.search as target_search

    monkeypatch.setattr(target_search, "compilers_missing",
                        lambda platform: f"libtpu is not installed ({INSTALL_HINT})" if platform == "tpu" else None)
    result = invoke("search", *TINY_TPU, "--target", "v5e", "--quiet", "--db", tmp_path / "new.db")
    assert result.exit_code == 2 and INSTALL_HINT in result.output and "v5e" in result.output
    assert os.listdir(tmp_path) == []


def test_target_list_names_every_target(tmp_path):
    result = invoke("search", "--target", "list", "--db", tmp_path / "new.db")
    assert result.exit_code == 0 and all(name in result.output for name in ("h100", "a100", "v5e", "v6e", "tpu7x"))
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- the database: schema 3 keeps the figures


def test_a_version_2_database_gains_the_figures_column_in_place(tmp_path):
    path = tmp_path / "old.db"
    problem = Problem(batch=1, q_len=32, kv_len=32, heads=1, kv_heads=1, head_dim=16)
    key = make_key(gpu, problem, h100_double())
    with Store(path) as store:
        store.add_trial(key, config={"block_q": 16}, status="ok", time_s=1e-3)
    connection = sqlite3.connect(path)  # back to version 2: no figures column
    connection.execute("ALTER TABLE autotune_trials DROP COLUMN figures")
    connection.execute("UPDATE autotune_meta SET value = '2' WHERE name = 'schema_version'")
    connection.commit()
    connection.close()
    with Store(path) as store:
        [old] = store.trials(key)
        assert old.time_s == 1e-3 and old.figures is None
        figures = {"target": "h100", "kernels": [{"role": "forward", "name": "fwd", "memory_bytes": 1}]}
        store.add_trial(key, config={"block_q": 32}, status="compiled", figures=figures)
        assert store.trials(key)[-1].figures["kernels"][0]["memory_bytes"] == 1
        assert store.integrity_check() == []
    check = sqlite3.connect(path)
    assert check.execute("SELECT value FROM autotune_meta").fetchall() == [(str(SCHEMA_VERSION),)]
    check.close()


@pytest.mark.slow
def test_concurrent_target_searches_share_the_budget_and_compile_each_config_once(tmp_path):
    """Issue 24 item 7: three `search --target` processes started together on one database, `--trials 3` each,
    compile three distinct configs between them (the old code compiled and stored 3 per process: 9)."""
    from tests.worker_procs import REPO, worker_env

    name, args = next(((n, a) for n, a in (("v5e", TINY_TPU), ("h100", TINY))
                       if not compilers_missing(get_target(n).platform)), (None, None))
    if name is None:
        pytest.skip(f"no compiler here (install: {INSTALL_HINT})")
    db = tmp_path / "shared.db"
    Store(db).close()  # the schema exists before they race
    command = [sys.executable, "-m", "autotune", "search", "--target", name, *args, "--trials", "3", "--seed", "1",
               "--quiet", "--db", str(db)]
    logs = [tmp_path / f"p{i}.log" for i in range(3)]
    processes = [subprocess.Popen(command, cwd=REPO, env=worker_env(**PATIENT), stdout=log.open("w"),
                                  stderr=subprocess.STDOUT) for log in logs]
    try:
        codes = [p.wait(timeout=240) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert codes == [0, 0, 0], [log.read_text() for log in logs]
    with Store(db) as store:
        [key] = [k for k in store.keys() if k.kernel != XLA_KERNEL]  # the kernel's one compile-only key
        rows = store.trials(key)
        configs = [json.dumps(r.config, sort_keys=True) for r in rows]
        assert len(rows) == 3 and len(set(configs)) == 3, configs
        assert [r.status for r in store.runs()] == ["ok"] * 3
    study = optuna.load_study(study_name=key.digest(), storage=f"sqlite:///{db}")
    assert len(study.trials) == 3


PATIENT = {"AUTOTUNE_CLAIM_TTL": "300"}  # no process dies here: a slow one's claims must not look stale

