"""The TPU VMEM model (kernels/tpu/vmem.py) against the recorded deviceless compiles (benchmarks/results/
compile-sweep.jsonl): no recorded refusal accepted on any target, v4's fit an upper bound of every v4 figure, its
temporaries per batch row, and its margins as wide as the leave-one-problem-out validation of the fit asks."""
from __future__ import annotations

from collections import Counter

import pytest

from benchmarks.compile_tables import RESULTS, judge, load, summary
from benchmarks.fit_tpu_vmem import FIT_LABELS, GROUPS, fit, points, validate
from kernels import Problem
from kernels.tpu.config import ROLES, Config, kernel_vmem_bytes, vmem_parts
from kernels.tpu.vmem import FITS

V4 = "TPU v4"
SWEPT = ("h100", "a100", "v4", "v5e", "v5p", "v6e", "tpu7x")  # the targets compile-sweep.jsonl holds


@pytest.fixture(scope="module")
def rows():
    return load(RESULTS / "compile-sweep.jsonl")


@pytest.mark.parametrize("name", SWEPT)
def test_no_recorded_refusal_is_accepted(rows, name):
    judged = [judge(r) for r in rows if r["target"] == name]
    assert len(judged) >= 40 and summary(judged)["false_accepts"] == 0


def test_v4_estimates_bound_every_v4_figure(rows):
    """Those the fit saw, and the `holdout` run's problems, which it never saw."""
    seen = Counter()
    for row in rows:
        if row["target"] != "v4" or not row["ok"]:
            continue
        config, problem = Config.from_dict(row["config"]), Problem.from_dict(row["problem"])
        for role, kernel in row["kernels"].items():
            assert kernel_vmem_bytes(role, config, problem, V4) >= kernel["memory_bytes"], (role, row["config"])
            seen[row["label"] in FIT_LABELS["v4"]] += 1
    assert seen[True] > 200 and seen[False] >= 20


def test_v4_coefficients_are_the_fit_of_its_runs():
    for kernel, role in enumerate(ROLES):
        for dtype, itemsize in enumerate((2, 4)):
            data = points("v4", role, itemsize, set(FIT_LABELS["v4"]), per_row=True)
            assert fit(data) == FITS["v4"].coefficients[kernel][dtype], (role, itemsize)


def test_v4_temporaries_are_per_batch_row():
    """Doubling block_b doubles the blocks and scratch; the temporaries stay those of one row."""
    problem = Problem(batch=4, q_len=2048, kv_len=2048, heads=4, kv_heads=4, head_dim=128, dtype="bfloat16",
                      causal=True, backward=True)
    one, two = Config(1, 512, 512, 512, 256, 1024, 256), Config(2, 512, 512, 512, 256, 1024, 256)
    fit = FITS["v4"]
    assert fit.per_row
    for role in ROLES:
        p1, p2 = vmem_parts(role, one, problem), vmem_parts(role, two, problem)
        assert p1.row_sizes == p2.row_sizes and p1.sizes != p2.sizes
        grown = kernel_vmem_bytes(role, two, problem, V4) - kernel_vmem_bytes(role, one, problem, V4)
        assert grown == pytest.approx(fit.margin * (p2.fixed - p1.fixed), abs=2)


@pytest.mark.parametrize("itemsize", [2, 4])
@pytest.mark.parametrize("role", ROLES)
def test_v4_margins_cover_the_problems_a_fit_did_not_see(role, itemsize):
    data = points("v4", role, itemsize, set(FIT_LABELS["v4"]), FITS["v4"].per_row, GROUPS["problem"])
    worst, held = validate(data)
    assert held >= 5
    margin = FITS["v4"].wide_f32_margin if itemsize == 4 else FITS["v4"].margin
    assert worst * margin >= 1.0, f"a held-out {role} kernel needs {1 / worst:.3f}x its fit, the margin is {margin}"
