"""No duplicated tensor-core work in the GPU kernels' main loops, read from the SASS of deviceless H100 compiles.

Per iteration, the tensor-core instructions of all warps (HGMMA per warpgroup, HMMA per warp) must do exactly the
kernel's useful matmuls on one tile (forward 2, dq 3, dk/dv 4 of block_q x block_k x head_dim), and the
exponentials one per score (plus the forward's row rescale): with 8 warps on backward tiles of fewer than 128 q
rows both warpgroups computed the same scores (issue 22). Two compiles (an 8-warp backward on wgmma; the default
config of a head_dim-128 problem, whose backward ran 8 warps on 32-row tiles) share one child process. Skipped,
naming the install, where the CUDA plugin or the SASS tools are missing.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest

from autotune.compile.model.gpu_sass import INSTALL_HINT, dump_kernels, tools_missing
from autotune.compile.pool import WORKER_ENV, compilers_missing
from kernels import Problem
from kernels.gpu import Config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
MISSING = compilers_missing("gpu") or tools_missing()
H100 = "NVIDIA H100 80GB HBM3"
MATMULS = {"flash_attention_fwd": 2, "flash_attention_bwd_dq": 3, "flash_attention_bwd_dkv": 4}
_COMPILE = """
import json, sys
from autotune.compile import worker as w
from autotune.compile.targets import get_target
from kernels import Problem
import kernels.gpu as g, jax
for job in json.loads(sys.argv[1]):
    t = get_target("h100")
    p = Problem.from_dict(job["problem"])
    f = w._attention_fn(g, p, g.Config.from_dict(job["config"]), t.device_kind)
    jax.jit(f).lower(*w._specs(p, w.device_for(t))).compile(compiler_options={"xla_dump_to": job["dump"]})
"""


def _problem(head_dim: int) -> Problem:
    return Problem(batch=1, q_len=1024, kv_len=1024, heads=2, kv_heads=2, head_dim=head_dim, dtype="bfloat16",
                   causal=True, backward=True)


@pytest.fixture(scope="module")
def compiled():
    """(problem, config, kernels) of the two compiles."""
    if MISSING:
        pytest.skip(f"no GPU compiler or SASS tools here: {MISSING} (enable with {INSTALL_HINT})")
    wide = Config(block_q=128, block_k=64, num_warps=8, num_stages=2,
                  bwd_block_q=128, bwd_block_k=64, bwd_num_warps=8, bwd_num_stages=2)
    cases = {"wgmma-8-warps": (_problem(64), wide), "default-d128": (_problem(128), None)}
    folder = tempfile.mkdtemp(prefix="gpu-loop-work-")
    env = {**os.environ, **WORKER_ENV, "PYTHONPATH": ROOT, "AUTOTUNE_SASS_CACHE": os.path.join(folder, "sass")}
    os.environ["AUTOTUNE_SASS_CACHE"] = env["AUTOTUNE_SASS_CACHE"]
    jobs = []
    for name, (problem, config) in cases.items():
        config = config or Config.default(problem, device_kind=H100)
        jobs.append({"name": name, "problem": problem.to_dict(), "config": config.to_dict(),
                     "dump": os.path.join(folder, name)})
    subprocess.run([sys.executable, "-c", _COMPILE, json.dumps(jobs)], env=env, check=True, cwd=ROOT,
                   capture_output=True, timeout=300)
    return {job["name"]: (Problem.from_dict(job["problem"]), Config.from_dict(job["config"]),
                          dump_kernels(job["dump"], "sm_90a", keep=MATMULS.__contains__)) for job in jobs}


def _tile(kernel_name: str, config: Config) -> tuple[int, int]:
    if kernel_name == "flash_attention_fwd":
        return config.block_q, config.block_k
    return config.bwd_block_q, config.bwd_block_k


@pytest.mark.parametrize("case", ["wgmma-8-warps", "default-d128"])
def test_tensor_core_work_per_iteration_is_the_useful_work(compiled, case):
    problem, config, kernels = compiled[case]
    assert {k.name for k in kernels} == set(MATMULS)
    for kernel in kernels:
        block_q, block_k = _tile(kernel.name, config)
        useful = 2 * block_q * block_k * problem.head_dim * MATMULS[kernel.name]
        for loop in kernel.loops:
            done = sum(m.flops * (kernel.warps // 4 if m.op == "HGMMA" else kernel.warps) for m in loop.mmas)
            assert done == useful, f"{case} {kernel.name}: {done / useful:.2f}x the useful tensor-core work"
            rescale = 4 * block_q if kernel.name == "flash_attention_fwd" else 0  # alpha in each thread of a row
            assert loop.counts["mufu"] * kernel.threads <= block_q * block_k + rescale, \
                f"{case} {kernel.name}: exponentials computed more than once per score"


def test_eight_warp_backward_runs_on_both_warpgroups(compiled):
    _, config, kernels = compiled["wgmma-8-warps"]
    for kernel in kernels:
        assert kernel.threads == 32 * 8
        assert {m.op for loop in kernel.loops for m in loop.mmas} == {"HGMMA"}
        assert all(m.m == 64 for loop in kernel.loops for m in loop.mmas)  # each warpgroup owns 64 rows
