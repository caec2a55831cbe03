"""Deviceless compiles by the real compilers (XLA:GPU + Triton + ptxas, XLA:TPU + Mosaic) for every named target.

Interpret mode accepts far more than the compilers do, so this is where the validity checks meet the truth: for
each target the default config and a sample of accepted configs compile (forward and gradients; ragged lengths,
GQA, segment ids, head_dim 72, float32 and bfloat16), a config the compiler rejects is one the checks reject too,
and compile failures come back classified, never raised. All compiles share the session's one run of parallel compile
processes (tests/compile/conftest.py). Skipped, naming the install, where the compilers are absent.
"""
from __future__ import annotations

import functools
import json
import os
import random
import subprocess
import sys

import pytest
from click.testing import CliRunner

from autotune.cli.targets import targets_command
from autotune.compile.figures import SPILLS_NOT_PREDICTED
from autotune.compile.pool import INSTALL_HINT, CompileJob, compilers_missing, estimated_bytes
from autotune.compile.targets import TARGETS, get_target
from db.records import RESOURCE_EXHAUSTED
from tests.compile import test_memory_compiles as memory_tests
from tests.compile.conftest import ci_space, results_by_case
from kernels import Problem
from kernels import gpu as gpu_kernel
from kernels import tpu as tpu_kernel
from kernels.environment import has_accelerator

MISSING = {platform: compilers_missing(platform) for platform in ("gpu", "tpu")}
# Ragged lengths, GQA, segment ids, head_dim 72, float32; and a plain bfloat16 causal case with head_dim 128.
RAGGED = Problem(batch=2, q_len=200, kv_len=328, heads=4, kv_heads=2, head_dim=72, dtype="float32", causal=True,
                 segments=True, backward=True)
BF16 = Problem(batch=1, q_len=512, kv_len=512, heads=4, kv_heads=4, head_dim=128, dtype="bfloat16", causal=True,
               backward=True)
SAMPLES = 1
# One target per compiler (sm_90a, sm_80, v4's and v5e's Mosaic) compiles RAGGED's default; the others compile the
# memory tests' grid of defaults, which has the features but not the ragged lengths.
RAGGED_TARGETS = ("h100", "a100", "v4", "v5e")
# TPUs whose compiler reports the VMEM a kernel needs (v5p and TPU7x report in proportion to the limit it sets).
TPU_VMEM_REPORTS_NEED = ("v4", "v5e", "v6e")
# Configs the compilers reject (more shared memory / VMEM than the chip has), with the problem they run. On TPUs
# with 64-128 MiB of VMEM such a compile takes a minute or more (Mosaic generates the whole kernel before it runs
# out), so CI checks the 16 MiB v4 and leaves the larger chips to AUTOTUNE_SLOW_COMPILES=1 and the sweep.
GPU_TOO_BIG = (Problem(1, 1024, 1024, 2, 2, 256, "float32"),
               dict(block_q=256, block_k=256, num_warps=8, num_stages=4, bwd_block_q=16, bwd_block_k=16,
                    bwd_num_warps=4, bwd_num_stages=1))
TPU_TOO_BIG = (Problem(1, 8, 131072, 1, 1, 128, "float32"),
               dict(block_b=1, block_q=8, block_k_major=131072, block_k=131072, bwd_block_q=128,
                    bwd_block_k_major=128, bwd_block_k=128))
SLOW = os.environ.get("AUTOTUNE_SLOW_COMPILES") == "1"
# Configs the structural rules reject, which the compilers refuse while lowering; and one that spills registers.
MALFORMED = {"gpu": dict(block_q=24), "tpu": dict(block_q=100)}
SPILLS = dict(block_q=256, block_k=128, num_warps=4, num_stages=2)


def same_chip_as_earlier(target) -> bool:
    """A GPU target whose chip an earlier target already compiles for (h200 and h100-pcie: the H100's sm_90a and
    shared memory): CI compiles its default configs only, the rest would repeat the earlier target's compiles."""
    earlier = list(TARGETS.values())[:list(TARGETS).index(target.name)]
    return target.gpu is not None and any(
        t.gpu is not None and (t.gpu.compute_capability, t.memory_limit_bytes) ==
        (target.gpu.compute_capability, target.memory_limit_bytes) for t in earlier)


def too_big_in_ci(target) -> bool:
    return (target.platform == "gpu" and not same_chip_as_earlier(target)) or target.memory_limit_bytes <= 16 << 20 \
        or SLOW


def module_of(target):
    return gpu_kernel if target.platform == "gpu" else tpu_kernel


def skip_unless_compilers(target) -> None:
    if MISSING[target.platform]:
        pytest.skip(f"no {target.platform.upper()} compiler here: {MISSING[target.platform]} "
                    f"(enable with {INSTALL_HINT})")


def accepted_sample(target, problem: Problem, rng: random.Random, count: int) -> list[dict]:
    """`count` distinct random configs of the search space that the checks accept for the target."""
    module = module_of(target)
    space = ci_space(module, problem)
    base = module.Config.default(problem, device_kind=target.device_kind).to_dict()
    found: dict[str, dict] = {}
    for _ in range(2000):
        data = {**base, **{name: rng.choice(values) for name, values in space.items()}}
        config = module.Config.from_dict(data)
        if not module.invalid_reasons(config, problem, device_kind=target.device_kind):
            found.setdefault(json.dumps(data, sort_keys=True), data)
        if len(found) == count:
            break
    return list(found.values())


SEED = random.randrange(1 << 30)  # a new sample of accepted configs each session, named by any failure


@functools.cache
def plan() -> dict[tuple[str, str], list[CompileJob]]:
    """Every compile of this module: {(target, case): [job, ...]}."""
    rng = random.Random(SEED)
    cases: dict[tuple[str, str], list[CompileJob]] = {}
    for target in TARGETS.values():
        if MISSING[target.platform]:
            continue
        module = module_of(target)
        kind = target.device_kind
        add = lambda case, problem, data, x64=False: cases.setdefault((target.name, case), []).append(  # noqa: E731
            CompileJob(target.name, problem, data, x64))
        if target.name in RAGGED_TARGETS:
            add("default", RAGGED, module.Config.default(RAGGED, device_kind=kind).to_dict())
        # and the default-grid problems the memory tests compile for this target (compiled once for both)
        cases.setdefault((target.name, "default"), []).extend(memory_tests.plan().get((target.name, "default"), []))
        for data in [] if same_chip_as_earlier(target) else accepted_sample(target, BF16, rng, SAMPLES):
            add("sample", BF16, data)
        if too_big_in_ci(target):
            add("too_big", *(GPU_TOO_BIG if target.platform == "gpu" else TPU_TOO_BIG))
        if target.name in ("h100", "v5e"):
            add("x64", RAGGED, module.Config.default(RAGGED, device_kind=kind).to_dict(), True)
            base = module.Config.default(BF16, device_kind=kind).to_dict()
            add("malformed", BF16.replace(backward=False), {**base, **MALFORMED[target.platform]})
        if target.name == "h100":
            add("spills", BF16.replace(backward=False), {**module.Config.default(BF16, device_kind=kind).to_dict(),
                                                         **SPILLS})
    return cases


@pytest.fixture(scope="module")
def compiled(compiled_jobs):
    """(seed, {(target, case): [(job, result), ...]})."""
    return SEED, results_by_case(plan(), compiled_jobs)


def results_of(compiled, target, case):
    seed, groups = compiled
    return seed, groups[(target.name, case)]


def describe(job, result) -> str:
    return (f"{job.target} {job.problem} config {job.config}: {result.failure_kind} {result.message[:600]}"
            f"{result.trace[-600:]}")


@pytest.mark.parametrize("name", list(TARGETS))
@pytest.mark.parametrize("case", ["default", "sample"])
def test_accepted_configs_compile_forward_and_gradients(compiled, name, case):
    target = get_target(name)
    skip_unless_compilers(target)
    if case == "sample" and same_chip_as_earlier(target):
        pytest.skip(f"{name} has the chip of an earlier target, whose samples cover it")
    seed, pairs = results_of(compiled, target, case)
    assert pairs, f"no accepted config found in the search space of {BF16} for {name} (seed {seed})"
    for job, result in pairs:
        assert result.ok, f"seed {seed}: " + describe(job, result)
        roles = {k.role for k in result.kernels}
        assert roles == {"forward", "dq", "dkv"}, f"{name}: kernels found {result.kernels}"
        limit = target.memory_limit_bytes
        expected = estimated_bytes(target, job.problem, job.config)
        for k in result.kernels:
            assert 0 < k.memory_bytes <= limit, f"{name} {k}"
            # a TPU figure that counts operands XLA prefetched whole into spare VMEM is not the kernel's need
            if target.platform == "gpu" or (target.name in TPU_VMEM_REPORTS_NEED and not k.operands_in_vmem):
                # the models are upper bounds of the real figure, and not far above it (v5e/v6e report a dq of
                # 0.07-0.9 MB, below its own double-buffered blocks: the bound has room for that)
                assert k.memory_bytes <= expected[k.role], f"{name} {job.config}: {k} estimated {expected}"
                assert expected[k.role] <= 4 * k.memory_bytes + (3 << 20), f"{name} {k} estimated {expected}"
            if target.platform == "gpu":
                assert k.registers is not None and 0 < k.registers <= 255, k
                assert k.spill_store_bytes is not None and k.spill_store_bytes >= 0, k


@pytest.mark.parametrize("name", list(TARGETS))
def test_config_over_the_memory_is_rejected_by_compiler_and_checks(compiled, name):
    target = get_target(name)
    skip_unless_compilers(target)
    if same_chip_as_earlier(target):
        pytest.skip(f"{name} has the chip of an earlier target, whose test compiles this")
    if not too_big_in_ci(target):
        pytest.skip(f"a config over {target.memory_limit_bytes >> 20} MiB of VMEM takes minutes to be refused; "
                    "set AUTOTUNE_SLOW_COMPILES=1 to run it")
    _, [(job, result)] = results_of(compiled, target, "too_big")
    assert not result.ok and result.failure_kind == RESOURCE_EXHAUSTED, describe(job, result)
    module = module_of(target)
    reasons = module.invalid_reasons(module.Config.from_dict(job.config), job.problem,
                                     device_kind=target.device_kind)
    assert any("memory" in r or "VMEM" in r for r in reasons), reasons


@pytest.mark.parametrize("name", ["h100", "v5e"])
def test_compiles_under_jax_enable_x64(compiled, name):
    target = get_target(name)
    skip_unless_compilers(target)
    _, [(job, result)] = results_of(compiled, target, "x64")
    assert result.ok, describe(job, result)


def test_targets_catalogue_names_limits_and_device_kinds():
    assert {"h100", "a100", "v4", "v5e", "v5p", "v6e", "tpu7x"} <= set(TARGETS)
    assert get_target("a100").device_kind == "NVIDIA A100-SXM4-80GB"
    assert get_target("tpu7x").device_kind == "TPU7x"
    assert get_target("h100").memory_limit_bytes == 232448
    assert get_target("a100").memory_limit_bytes == 166912
    assert get_target("v5p").memory_limit_bytes == 67045949
    with pytest.raises(ValueError, match="target must be one of"):
        get_target("v3")
    result = CliRunner().invoke(targets_command, ["--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [r["name"] for r in rows] == list(TARGETS)
    assert {r["device_kind"] for r in rows} == {t.device_kind for t in TARGETS.values()}
    table = CliRunner().invoke(targets_command, [])
    assert table.exit_code == 0 and "TPU v5 lite" in table.output and "227.0 KiB" in table.output and "NVIDIA A100-SXM4-40GB" in table.output


@pytest.mark.parametrize("name", [n for n, t in TARGETS.items() if t.platform == "gpu"])
def test_compile_only_gpu_device_reports_the_catalogue_device_kind(name):
    target = get_target(name)
    skip_unless_compilers(target)
    code = ("import kernels, sys; from autotune.compile.worker import device_for; from autotune.compile.targets import "
            f"get_target; print(device_for(get_target({name!r})).device_kind)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "JAX_SKIP_CUDA_CONSTRAINTS_CHECK": "1"})
    assert out.stdout.strip().splitlines()[-1] == target.device_kind, out.stderr[-2000:]


@pytest.mark.skipif(has_accelerator(), reason="checks what a machine without a GPU or TPU sees")
@pytest.mark.parametrize("imports", ["kernels, jax", "jax, autotune"])
def test_importing_the_package_keeps_jax_on_the_cpu_without_noise(imports):
    # With the compilers installed, jax alone would print the CUDA plugin's traceback and libtpu's errors here.
    code = f"import {imports}; print(jax.devices()[0].platform)"
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "TF_CPP_MIN_LOG_LEVEL")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "cpu", out.stderr[-2000:]
    assert out.stderr.strip() == "", out.stderr[-2000:]


@pytest.mark.parametrize("name", ["h100", "v5e"])
def test_a_config_the_compiler_cannot_lower_comes_back_classified(compiled, name):
    target = get_target(name)
    skip_unless_compilers(target)
    _, [(job, result)] = results_of(compiled, target, "malformed")
    assert not result.ok and result.failure_kind in ("lowering_error", "other"), describe(job, result)
    assert result.message, "a failure names its cause"
    module = module_of(target)
    assert module.invalid_reasons(module.Config.from_dict(job.config), job.problem, device_kind=target.device_kind)


def test_spills_are_recorded_not_rejected(compiled):
    # defect 3: spills are no compile failure, so the checks do not reject them: the compile records them per
    # kernel (bytes stored and loaded), for the search to avoid or rank down.
    target = get_target("h100")
    skip_unless_compilers(target)
    _, [(job, result)] = results_of(compiled, target, "spills")
    assert result.ok, describe(job, result)
    forward = result.kernel("forward")
    assert forward.spill_store_bytes > 0 and forward.spill_load_bytes > 0 and result.spills, forward
    assert gpu_kernel.invalid_reasons(gpu_kernel.Config.from_dict(job.config), job.problem,
                                      device_kind=target.device_kind) == []
    # never the predicted best, so the model does not run ptxas over it again: no prediction, and the reason why
    assert result.prediction is None and result.prediction_error == SPILLS_NOT_PREDICTED


def test_gpu_compiles_that_do_not_spill_are_predicted_and_those_that_spill_are_not(compiled):
    _, groups = compiled
    gpu_results = [result for group in groups.values() for _job, result in group
                   if result.ok and get_target(result.job.target).platform == "gpu"]
    if not gpu_results:
        pytest.skip(f"no GPU compiler here ({INSTALL_HINT})")
    spilling = [r for r in gpu_results if r.spills]
    clean = [r for r in gpu_results if not r.spills]
    assert spilling and clean, "the planned GPU compiles cover both kinds"
    assert all(r.prediction is None and r.prediction_error == SPILLS_NOT_PREDICTED for r in spilling)
    assert all(r.prediction is not None and r.prediction["seconds"] > 0 for r in clean), [
        (r.job.target, r.job.config, r.prediction_error) for r in clean if r.prediction is None]


def test_device_kinds_match_one_target_and_its_sweep_applies_on_each(tmp_path):
    """Issue 25, item 4: an a100 sweep applied only on the exact kind 'NVIDIA A100-SXM4-80GB', so a 40 GB A100
    ignored it; H200 and H100 PCIe had no target at all. One function matches kinds to targets."""
    from autotune.compile.results import SPILLS, ahead_of_time, compile_key
    from autotune.compile.targets import target_for_device_kind
    from db import Store
    from kernels import Problem, gpu
    from tests.db.test_compile_figures import compiled_figures

    assert target_for_device_kind("NVIDIA H200").name == "h200"
    assert target_for_device_kind("NVIDIA H100 PCIe").name == "h100-pcie"
    assert target_for_device_kind("nvidia a100-sxm4-40gb ").name == "a100"
    assert target_for_device_kind("TPU v5 lite").name == "v5e"
    assert target_for_device_kind("NVIDIA L4") is None and target_for_device_kind("cpu") is None
    for target in TARGETS.values():  # every kind a target covers leads back to that target, and to no other
        assert all(target_for_device_kind(kind) is target for kind in target.device_kinds)
    assert get_target("h100-pcie").gpu.cores == 114 and get_target("h200").gpu.memory_bandwidth == 4.8e12
    from autotune.compile.model.gpu_hardware import HARDWARE
    from autotune.compile.model.gpu_predict import TARGET_HARDWARE

    for target in (t for t in TARGETS.values() if t.platform == "gpu"):  # each GPU target has the model's figures
        assert TARGET_HARDWARE[target.model_hardware] in HARDWARE, target.name
        assert HARDWARE[TARGET_HARDWARE[target.model_hardware]].sms == target.gpu.cores, target.name

    problem = Problem(batch=1, q_len=32, kv_len=32, heads=1, kv_heads=1, head_dim=16)
    key = compile_key(gpu.NAME, gpu.VERSION, "gpu", get_target("a100").device_kind, "0.10.2", problem)
    config = gpu.Config.default(problem, device_kind=None).to_dict()
    spilling = compiled_figures()
    spilling["kernels"][0]["spill_store_bytes"] = 64
    with Store(tmp_path / "r.db") as store:
        store.add_trial(key, config=config, status="compiled", compile_s=1.0, figures=spilling)
        on_40gb = key.__class__(**{**key.to_dict(), "platform": "gpu", "device_kind": "NVIDIA A100-SXM4-40GB"})
        on_h100 = key.__class__(**{**key.to_dict(), "platform": "gpu", "device_kind": "NVIDIA H100 80GB HBM3"})
        assert ahead_of_time(store, on_40gb).skip_reason(config) == SPILLS
        assert ahead_of_time(store, on_h100) is None
