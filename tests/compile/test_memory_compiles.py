"""The memory checks against live deviceless compiles on all 7 targets: near-limit configs the checks accept must
compile (the rate of near-limit configs they reject yet compile is recorded), and the default config of a grid of
problems compiles everywhere. Sampled to fit the suite's time, compiled in the session's one run of compile processes
(tests/compile/conftest.py); benchmarks/compile_sweep.py runs the full sweep and grid. Skipped where the compilers
are absent."""
from __future__ import annotations

import functools
import random

import pytest

from autotune.compile.pool import CompileJob, compilers_missing, estimated_bytes
from autotune.compile.targets import TARGETS, get_target
from db.records import RESOURCE_EXHAUSTED
from tests.compile.conftest import ci_space, results_by_case
from kernels import Problem
from kernels import gpu as gpu_kernel
from kernels import tpu as tpu_kernel

MISSING = {platform: compilers_missing(platform) for platform in ("gpu", "tpu")}
MEMORY_WORDS = ("shared memory", "VMEM")


def grid() -> list[Problem]:
    """d64/d128/d256 x bf16/f32 x plain/every feature, backward (the gradient compile holds the forward too)."""
    found = []
    for dtype in ("bfloat16", "float32"):
        for head_dim in (64, 128, 256):
            plain = Problem(batch=2, q_len=512, kv_len=512, heads=2, kv_heads=2, head_dim=head_dim, dtype=dtype,
                            causal=True, backward=True)
            found += [plain, plain.replace(kv_heads=1, segments=True, lengths=True, softcap=30.0, window_left=400)]
    return found


def module_of(target):
    return gpu_kernel if target.platform == "gpu" else tpu_kernel


def near_limit(target, rng: random.Random, accepted: bool) -> CompileJob | None:
    """A forward config estimated within 15% of the target's limit, accepted by the checks or rejected for memory
    only (on TPUs: its default scoped limit, where a refusal takes seconds, not minutes)."""
    from kernels.tpu.config import default_scoped_vmem

    module = module_of(target)
    limit = target.memory_limit_bytes if target.platform == "gpu" else default_scoped_vmem(target.device_kind)
    # float32 near a TPU's limit compiles for 25-35 s; its defaults are in the grid, its near-limit configs in the sweep
    dtypes = ("bfloat16", "float32") if target.platform == "gpu" else ("bfloat16",)
    problems = [Problem(batch=4, q_len=1024, kv_len=1024, heads=2, kv_heads=2, head_dim=head_dim, dtype=dtype,
                        causal=True) for head_dim in (64, 128, 256) for dtype in dtypes]
    spaces = {p: ci_space(module, p) for p in problems}
    defaults = {p: module.Config.default(p, device_kind=target.device_kind).to_dict() for p in problems}
    for _ in range(3000):
        problem = rng.choice(problems)
        data = {**defaults[problem], **{f: rng.choice(v) for f, v in spaces[problem].items()
                                         if not f.startswith("bwd_")}}
        reasons = module.invalid_reasons(module.Config.from_dict(data), problem, device_kind=target.device_kind)
        memory_only = all(any(w in r for w in MEMORY_WORDS) for r in reasons)
        ratio = estimated_bytes(target, problem, data)["forward"] / limit
        if memory_only and (not reasons) == accepted and abs(ratio - 1) <= 0.15:
            return CompileJob(target.name, problem, data)
    return None


@functools.cache
def plan() -> dict[tuple[str, str], list[CompileJob]]:
    """{(target, case): [job]}: a near-limit config the checks accept (and on every other target one they reject)
    and two default-grid problems per target, rotating so that the targets together cover the whole grid."""
    rng = random.Random(23)
    problems = grid()
    cases: dict[tuple[str, str], list[CompileJob]] = {}
    for i, target in enumerate(TARGETS.values()):
        if MISSING[target.platform]:
            continue
        for accepted in (True, False) if i % 2 == 0 else (True,):  # rejected ones: every other target (time)
            job = near_limit(target, rng, accepted)
            if job is not None:
                cases.setdefault((target.name, "accepted" if accepted else "rejected"), []).append(job)
        for problem in (problems[(2 * i) % len(problems)], problems[(2 * i + 7) % len(problems)]):
            config = module_of(target).Config.default(problem, device_kind=target.device_kind).to_dict()
            cases.setdefault((target.name, "default"), []).append(CompileJob(target.name, problem, config))
    return cases


@pytest.fixture(scope="module")
def compiled(compiled_jobs):
    """{(target, case): [(job, result)]}."""
    return results_by_case(plan(), compiled_jobs)


def skip_unless_compilers(target) -> None:
    if MISSING[target.platform]:
        pytest.skip(f"no {target.platform.upper()} compiler here: {MISSING[target.platform]}")


@pytest.mark.parametrize("name", list(TARGETS))
def test_near_limit_configs_the_checks_accept_compile(compiled, name, record_property):
    """No accepted config refused; how many rejected ones compile is recorded (the sweep measures the rate)."""
    target = get_target(name)
    skip_unless_compilers(target)
    for job, result in compiled.get((name, "accepted"), []):
        assert result.ok, f"{name} accepted {job.problem} {job.config}: {result.failure_kind} {result.message[:400]}"
    rejected = compiled.get((name, "rejected"), [])
    compiles = [job for job, result in rejected if result.ok]
    for job, result in rejected:
        assert result.ok or result.failure_kind == RESOURCE_EXHAUSTED, result.message[:400]
    record_property("near_limit_rejected_but_compiles", f"{len(compiles)} of {len(rejected)}")


def test_default_grid_covers_every_problem(compiled):
    seen = {job.problem for (name, case), pairs in compiled.items() if case == "default" for job, _ in pairs}
    if not seen:
        pytest.skip("no compilers here")
    assert len(TARGETS) * 2 < len(grid()) or seen == set(grid())


@pytest.mark.parametrize("name", list(TARGETS))
def test_default_configs_compile(compiled, name):
    target = get_target(name)
    skip_unless_compilers(target)
    for job, result in compiled[(name, "default")]:
        assert result.ok, f"{name} default for {job.problem}: {result.failure_kind} {result.message[:400]}"
