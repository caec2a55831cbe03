"""The TPU static time model on real libtpu dumps of our own kernel (compiled once per module, deviceless, in a
subprocess so libtpu loads with the dump flags), and its hook in the compile worker."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from autotune.compile.model.prediction import TPU_MODEL_VERSION, Prediction
from autotune.compile.model.tpu_bundles import parse_dump
from autotune.compile.model.tpu_predict import DumpCollector, predict_tpu_compile, tile_fraction
from autotune.compile.pool import INSTALL_HINT, CompileJob, compile_many, compilers_missing
from kernels import Problem

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
BASE = Problem(batch=1, q_len=1024, kv_len=1024, heads=4, kv_heads=4, head_dim=128, dtype="bfloat16")
CASES = {"full": BASE, "causal": BASE.replace(causal=True), "long": BASE.replace(q_len=2048, kv_len=2048)}
CONFIG = {"block_b": 1, "block_q": 256, "block_k_major": 256, "block_k": 256, "bwd_block_q": 256,
          "bwd_block_k_major": 256, "bwd_block_k": 256}

_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import autotune.compile.worker as w  # sets the libtpu dump flags before jax loads libtpu
    import jax
    from kernels import Problem
    import kernels.tpu as module
    out, cases, config = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    target = w.get_target("v5e")
    device = w.device_for(target)
    for name, data in cases.items():
        problem = Problem.from_dict(data)
        fn = w._attention_fn(module, problem, module.Config.from_dict(config), target.device_kind)
        jax.jit(fn).lower(*w._specs(problem, device)).compile()
        w._COLLECTOR.collect(os.path.join(out, name))
""")


def _skip_without_libtpu() -> None:
    missing = compilers_missing("tpu")
    if missing:
        pytest.skip(f"no TPU compiler here: {missing} (enable with {INSTALL_HINT})")


@pytest.fixture(scope="module")
def dumps(tmp_path_factory):
    _skip_without_libtpu()
    out = tmp_path_factory.mktemp("libtpu-dumps")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)}
    cases = json.dumps({name: p.to_dict() for name, p in CASES.items()})
    run = subprocess.run([sys.executable, "-c", _SCRIPT, str(out), cases, json.dumps(CONFIG)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return {name: str(out / name) for name in CASES}


def _kernel(folder: str):
    kernels = [p for p in parse_dump(folder) if p.kind == "kernel"]
    assert [p.name.split(".")[0] for p in kernels] == ["flash_attention_tpu_fwd"]
    return kernels[0]


def test_grid_loop_runs_prod_grid_plus_two_trips(dumps):
    for name, problem in CASES.items():
        kernel = _kernel(dumps[name])
        n_q, n_kv = problem.q_len // CONFIG["block_q"], problem.kv_len // CONFIG["block_k_major"]
        n_steps = n_kv  # causal too: the last q block sees every kv block, so the band is the whole axis
        assert kernel.grid_loop.trips == problem.batch * problem.heads * n_q * n_steps + 2, name
        body = [b for b in kernel.bundles[kernel.grid_loop.start:kernel.grid_loop.end]]
        assert sum(len(b.matmuls) for b in body) > 0  # the MXU work is inside the grid loop
    assert _kernel(dumps["full"]).capacity["MXU"] == 4  # v5e: 4 MXU slots per bundle


def test_causal_skip_lives_in_a_predicated_region(dumps):
    kernel = _kernel(dumps["causal"])
    with_mxu = [r for r in kernel.regions if any(kernel.bundles[i].matmuls for i in range(r.start, r.end))]
    assert with_mxu, "the causal chunk check should predicate the MXU work"


def test_predictions_respect_roofline_causality_and_length(dumps):
    predicted = {name: predict_tpu_compile(dumps[name], "v5e", p, CONFIG) for name, p in CASES.items()}
    for name, p in predicted.items():
        assert p is not None and p.model_version == TPU_MODEL_VERSION
        assert p.seconds >= p.roofline_seconds > 0, name
        assert 0 < p.roofline_fraction <= 1
        assert Prediction.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    assert predicted["causal"].seconds < predicted["full"].seconds
    assert predicted["long"].seconds > 2 * predicted["full"].seconds  # quadratic in the sequence


def test_no_dump_means_no_prediction(tmp_path):
    assert predict_tpu_compile(str(tmp_path), "v5e", BASE, CONFIG) is None


def test_tile_fraction_counts_the_causal_band():
    assert tile_fraction(1024, 1024, 256, 256, causal=False) == 1.0
    assert tile_fraction(1024, 1024, 256, 256, causal=True) == pytest.approx(10 / 16)
    assert tile_fraction(1024, 1024, 256, 256, causal=True, window=(256, 0)) == pytest.approx(7 / 16)


def test_collector_hands_each_job_only_its_new_files(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "old.txt").write_text("x")
    collector = DumpCollector(str(root))
    (root / "new.txt").write_text("y")
    assert collector.collect(str(tmp_path / "job1")) == 1
    assert os.listdir(tmp_path / "job1") == ["new.txt"]
    assert collector.collect(str(tmp_path / "job2")) == 0


def test_compile_worker_returns_a_prediction():
    _skip_without_libtpu()
    (result,) = compile_many([CompileJob("v5e", BASE, CONFIG)], processes=1)
    assert result.ok, result.message
    prediction = Prediction.from_dict(result.prediction)
    assert prediction.model_version == TPU_MODEL_VERSION and prediction.seconds >= prediction.roofline_seconds
    assert result.prediction_seconds is not None and 0 < result.prediction_seconds < 60  # what predicting took
