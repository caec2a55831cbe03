"""The TPU VMEM model (kernels/tpu/vmem.py) against the recorded deviceless compiles of the current kernels
(benchmarks/results/compile-sweep.jsonl, TPU rows since the in-place layouts): no recorded refusal accepted on any
target; v4's estimates an upper bound of every figure of its compiles (those its fit saw and held-out problems it
never saw), its coefficients the fit of its runs, its temporaries per batch row, and its margins as wide as the
leave-one-problem-out validation asks. (v5e and v6e figures count operands XLA prefetches into free VMEM, so only
their refusals are checked: kernels/tpu/vmem.py.)"""
from __future__ import annotations

from collections import Counter

import pytest

from benchmarks.compile_tables import RESULTS, current, judge, load, summary
from benchmarks.fit_tpu_vmem import FIT_LABELS, GROUPS, fit, points, validate
from kernels import Problem
from kernels.devices import tpu_generation
from kernels.tpu.config import ROLES, Config, kernel_vmem_bytes, vmem_parts
from kernels.tpu.vmem import FITS

V4 = "TPU v4"
SWEPT = ("h100", "a100", "v4", "v5e", "v5p", "v6e", "tpu7x")  # the targets compile-sweep.jsonl holds
FITTED = {"v4": "TPU v4"}  # the generations fitted to the current kernels' compiles, and their device kinds


@pytest.fixture(scope="module")
def rows():
    return [r for r in load(RESULTS / "compile-sweep.jsonl") if current(r)]


@pytest.mark.parametrize("name", SWEPT)
def test_no_recorded_refusal_is_accepted(rows, name):
    judged = [judge(r) for r in rows if r["target"] == name]
    assert len(judged) >= 40 and summary(judged)["false_accepts"] == 0


@pytest.mark.parametrize("target", sorted(FITTED))
def test_estimates_bound_every_figure(rows, target):
    """Those the fit saw, and a held-out run's problems, which it never saw."""
    kind = FITTED[target]
    assert tpu_generation(kind) == target
    seen = Counter()
    for row in rows:
        if row["target"] != target or not row["ok"]:
            continue
        config, problem = Config.from_dict(row["config"]), Problem.from_dict(row["problem"])
        for role, kernel in row["kernels"].items():
            assert kernel_vmem_bytes(role, config, problem, kind) >= kernel["memory_bytes"], (role, row["config"])
            seen[row["label"] in FIT_LABELS[target]] += 1
    assert seen[True] > 60 and seen[False] >= 20


@pytest.mark.parametrize("target", sorted(FITTED))
def test_coefficients_are_the_fit_of_their_runs(target):
    for kernel, role in enumerate(ROLES):
        for dtype, itemsize in enumerate((2, 4)):
            data = points(target, role, itemsize, set(FIT_LABELS[target]), per_row=FITS[target].per_row)
            assert fit(data) == FITS[target].coefficients[kernel][dtype], (role, itemsize)


def test_v4_temporaries_are_per_batch_row():
    """Doubling block_b doubles the blocks and scratch; the temporaries stay those of one row."""
    problem = Problem(batch=4, q_len=2048, kv_len=2048, heads=4, kv_heads=4, head_dim=128, dtype="bfloat16",
                      causal=True, backward=True)
    one, two = Config(1, 512, 512, 512, 256, 1024, 256), Config(2, 512, 512, 512, 256, 1024, 256)
    fit_ = FITS["v4"]
    assert fit_.per_row
    for role in ROLES:
        p1, p2 = vmem_parts(role, one, problem), vmem_parts(role, two, problem)
        assert p1.row_sizes == p2.row_sizes and p1.sizes != p2.sizes
        grown = kernel_vmem_bytes(role, two, problem, V4) - kernel_vmem_bytes(role, one, problem, V4)
        assert grown == pytest.approx(fit_.margin_of(ROLES.index(role), 2) * (p2.fixed - p1.fixed), abs=2)


@pytest.mark.parametrize("itemsize", [2, 4])
@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("target", sorted(FITTED))
def test_margins_cover_the_problems_a_fit_did_not_see(target, role, itemsize):
    data = points(target, role, itemsize, set(FIT_LABELS[target]), FITS[target].per_row, GROUPS["problem"])
    worst, held = validate(data)
    assert held >= 3
    margin = FITS[target].margin_of(ROLES.index(role), itemsize)
    assert worst * margin >= 1.0, f"a held-out {role} kernel needs {1 / worst:.3f}x its fit, the margin is {margin}"
