"""The GPU static time model on real compiler output: our forward kernel compiled deviceless for H100 and A100.

Each compile (a few seconds) runs once per module in a child process with the compile worker's environment; the
tests then read the SASS and predict. They skip, naming the install, where the CUDA plugin or the SASS tools are
missing.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest

from autotune.compile.model.gpu_blocks import Work, ours
from autotune.compile.model.gpu_hardware import A100, H100, get_hardware
from autotune.compile.model.gpu_model import occupancy, predict_kernel
from autotune.compile.model.gpu_predict import predict_gpu_compile
from autotune.compile.model.gpu_sass import INSTALL_HINT, dump_kernels, parse_sass, tools_missing
from autotune.compile.pool import WORKER_ENV, compilers_missing
from kernels import Problem

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
MISSING = compilers_missing("gpu") or tools_missing()
CONFIG = {"block_q": 128, "block_k": 64, "num_warps": 8, "num_stages": 2, "bwd_block_q": 64, "bwd_block_k": 64,
          "bwd_num_warps": 4, "bwd_num_stages": 2}
A100_CONFIG = {**CONFIG, "block_q": 64, "num_warps": 4}
_COMPILE = """
import json, sys
from autotune.compile import worker as w
from autotune.compile.targets import get_target
from kernels import Problem
import kernels.gpu as g, jax
for job in json.loads(sys.argv[1]):
    t = get_target(job["target"])
    p = Problem.from_dict(job["problem"])
    f = w._attention_fn(g, p, g.Config.from_dict(job["config"]), t.device_kind)
    jax.jit(f).lower(*w._specs(p, w.device_for(t))).compile(compiler_options={"xla_dump_to": job["dump"]})
"""


def _problem(**changes) -> Problem:
    # 16 q blocks x 128 (batch, head) programs: many waves over 132 SMs, so causal's shorter programs pay off (with
    # a few waves the last long programs, launched late, can make causal as slow as full: the model shows that too)
    base = Problem(batch=8, q_len=2048, kv_len=2048, heads=16, kv_heads=16, head_dim=64, dtype="bfloat16")
    return base.replace(**changes)


@pytest.fixture(scope="module")
def dumps():
    """XLA dump folders of our forward kernel: H100 full / causal / 4x longer, and A100 full."""
    if MISSING:
        pytest.skip(f"no GPU compiler or SASS tools here: {MISSING} (enable with {INSTALL_HINT})")
    jobs = {
        "full": ("h100", _problem(), CONFIG), "causal": ("h100", _problem(causal=True), CONFIG),
        "long": ("h100", _problem(q_len=4096, kv_len=4096), CONFIG), "a100": ("a100", _problem(), A100_CONFIG),
    }
    folder = tempfile.mkdtemp(prefix="gpu-model-test-")
    env = {**os.environ, **WORKER_ENV, "PYTHONPATH": ROOT, "AUTOTUNE_SASS_CACHE": os.path.join(folder, "sass")}
    os.environ["AUTOTUNE_SASS_CACHE"] = env["AUTOTUNE_SASS_CACHE"]
    found = {name: (os.path.join(folder, name), target, problem, config)
             for name, (target, problem, config) in jobs.items()}
    batch = [{"target": t, "problem": p.to_dict(), "config": c, "dump": d} for d, t, p, c in found.values()]
    subprocess.run([sys.executable, "-c", _COMPILE, json.dumps(batch)], env=env, check=True, cwd=ROOT,
                   capture_output=True, timeout=300)
    return found


def test_h100_main_loop_has_the_wgmmas_the_blocks_imply(dumps):
    dump, _, problem, config = dumps["full"]
    (kernel,) = [k for k in dump_kernels(dump, "sm_90a") if k.name == "flash_attention_fwd"]
    assert kernel.threads == 32 * config["num_warps"] and kernel.registers > 0
    (loop,) = kernel.loops  # Hopper: one loop over the key blocks
    assert {m.op for m in loop.mmas} == {"HGMMA"}
    warpgroups = config["num_warps"] // 4
    flops = sum(m.flops for m in loop.mmas) * warpgroups
    assert flops == 2 * 2 * config["block_q"] * config["block_k"] * problem.head_dim  # S = QK^T and P @ V
    assert all(m.m == 64 for m in loop.mmas)  # each warpgroup owns 64 rows of the q block
    exps_per_thread = config["block_q"] * config["block_k"] // kernel.threads
    assert loop.counts["mufu"] >= exps_per_thread  # one exp2 per score, plus the row rescale
    assert loop.full_waits >= 1 and loop.counts["bar"] >= 1  # S waited on at once; a barrier per iteration
    assert kernel.rest.counts.get("mma", 0) == 0  # no tensor work outside the loop


def test_a100_main_loop_uses_warp_mmas(dumps):
    dump, _, problem, config = dumps["a100"]
    (kernel,) = [k for k in dump_kernels(dump, "sm_80") if k.name == "flash_attention_fwd"]
    main = max(kernel.loops, key=lambda b: sum(m.flops for m in b.mmas))
    assert {m.op for m in main.mmas} == {"HMMA"}
    assert sum(m.flops for m in main.mmas) * config["num_warps"] == 4 * config["block_q"] * config["block_k"] * 64


def test_prediction_is_never_below_the_roofline_and_names_a_bound(dumps):
    for dump, target, problem, config in dumps.values():
        pred = predict_gpu_compile(dump, target, problem, config)
        assert pred is not None and pred.model_version.startswith("gpu-")
        assert pred.seconds >= pred.roofline_seconds > 0
        assert pred.bound in ("compute", "memory", "latency", "overhead")
    # a kernel with no work left to hide: the roofline still holds
    dump, target, problem, config = dumps["full"]
    (kernel,) = [k for k in dump_kernels(dump, "sm_90a") if k.name == "flash_attention_fwd"]
    huge = Work(trips=((1,),) * kernel.grid[0], flops=1e15, min_bytes=1e12)
    pred = predict_kernel(H100, kernel, huge)
    assert pred.seconds >= 1e15 / (H100.peak_bf16_tflops * 1e12) and pred.seconds >= 1e12 / H100.hbm_bytes_per_s


def test_causal_is_faster_and_a_longer_sequence_slower(dumps):
    full, causal, long = (predict_gpu_compile(*dumps[name]) for name in ("full", "causal", "long"))
    assert causal.seconds < 0.8 * full.seconds  # about half the key blocks
    assert long.seconds > 4 * full.seconds * 0.8  # 16x the work, at least several times the time
    assert long.seconds > full.seconds


def test_trips_follow_the_kernels_block_arithmetic():
    problem = _problem(causal=True)
    work = ours(problem, 128, 64, "forward", "NVIDIA H100 80GB HBM3")
    assert [t[0] for t in work.trips] == [2 * (i + 1) for i in range(2048 // 128)]  # diagonal: 2 key blocks per row
    split = ours(problem, 64, 64, "forward", "NVIDIA A100-SXM4-80GB")  # split loops: plain blocks, then diagonal
    assert split.trips[3] == (3, 1)
    assert ours(_problem(), 128, 64, "forward", "h100").trips[0] == (32,)


def test_occupancy_is_limited_by_registers_and_shared_memory(dumps):
    dump, *_ = dumps["full"]
    (kernel,) = [k for k in dump_kernels(dump, "sm_90a") if k.name == "flash_attention_fwd"]
    resident = occupancy(get_hardware("h100"), kernel)
    assert 1 <= resident <= 65536 // (kernel.registers * kernel.threads)
    assert resident * kernel.shared_memory <= H100.shared_memory_per_sm
    assert occupancy(A100, kernel) <= resident  # less shared memory per SM


def test_parse_sass_finds_backward_branches_only():
    sass = """
        Function : k
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0020*/                   MUFU.EX2 R2, R3 ;
        /*0030*/               @P0 BRA 0x10 ;
        /*0040*/                   EXIT ;
        /*0050*/                   BRA 0x50;
    """
    ((loop,), rest) = parse_sass(sass)["k"]
    assert (loop.start, loop.end) == (0x10, 0x30)
    assert loop.counts == {"mma": 1, "mufu": 1, "branch": 1}
    assert loop.mmas[0].flops == 2 * 16 * 8 * 16
    assert rest.instructions == 3  # MOV, EXIT and the self-branch after it: no loop
