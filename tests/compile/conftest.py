"""One run of compile processes for all the compile tests of a session.

Starting a compile process costs seconds (jax, libtpu and the CUDA plugin load, a compile-only device per target),
and the compile modules check some of the same configs. Each module that compiles offers `plan()`: its jobs by case,
the same on every call. The first module to ask compiles the jobs of every such module the session collected, each
distinct job once, in one parallel run (`compiled_jobs`); each module then reads its own results. Under
pytest-xdist the first worker to ask runs it and leaves the results in the session's shared temporary folder; the
others wait for them (the run keeps both cores busy anyway) instead of compiling the same jobs again.
"""
from __future__ import annotations

import fcntl
import json
import os
import pickle

import pytest

from autotune.compile.pool import CompileJob, CompileResult, compile_many

PROCESSES = 2  # the machines that run the suite have two cores or more
TIMEOUT_S = 400
# Warps sampled in CI: with one or two warps our GPU kernels spill heavily and one compile takes 30-150 s; the
# sweep (benchmarks/compile_sweep.py) and tests/kernels/test_memory_examples.py cover them.
CI_WARPS = (4, 8)


def ci_space(module, problem) -> dict[str, tuple[int, ...]]:
    """The kernel's search space for `problem`, its warps limited to CI_WARPS (the TPU kernel has none)."""
    return {name: (tuple(v for v in values if v in CI_WARPS) if name.endswith("num_warps") else tuple(values))
            for name, values in module.search_space(problem).items()}


def job_key(job: CompileJob) -> str:
    return json.dumps([job.target, job.problem.to_dict(), job.config, job.x64], sort_keys=True)


@pytest.fixture(scope="session")
def compiled_jobs(request, tmp_path_factory) -> dict[str, CompileResult]:
    """{job_key: result} for every job planned by the compile modules of this session."""
    modules = {item.module for item in request.session.items if hasattr(getattr(item, "module", None), "plan")}
    jobs: dict[str, CompileJob] = {}
    for module in sorted(modules, key=lambda m: m.__name__):
        for group in module.plan().values():
            for job in group:
                jobs.setdefault(job_key(job), job)
    if not jobs:
        return {}
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return dict(zip(jobs, compile_many(list(jobs.values()), processes=PROCESSES, timeout_s=TIMEOUT_S)))
    shared = tmp_path_factory.getbasetemp().parent / "compiled_jobs.pickle"  # one folder for all the workers
    with open(shared.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if shared.exists():
            results = pickle.loads(shared.read_bytes())
            if set(results) == set(jobs):
                return results
        results = dict(zip(jobs, compile_many(list(jobs.values()), processes=PROCESSES, timeout_s=TIMEOUT_S)))
        shared.write_bytes(pickle.dumps(results))
        return results


def results_by_case(plan: dict, compiled_jobs: dict[str, CompileResult]) -> dict:
    """A module's plan with each job paired with its result: {case: [(job, result), ...]}."""
    return {case: [(job, compiled_jobs[job_key(job)]) for job in group] for case, group in plan.items()}
