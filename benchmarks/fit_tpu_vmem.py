"""Fit the TPU VMEM model's temporaries to the compiler's figures: the tightest upper bound of every recorded kernel.

Each TPU kernel's VMEM is its exact blocks and scratch plus temporaries, a sum of coefficients times six sizes
(`kernels.tpu.config.vmem_parts`, `temporary_sizes`). For one generation, kernel and dtype (16-bit or 32-bit in
the kernel: float32 temporaries follow other sizes than bfloat16 ones) this finds the coefficients
(at least FLOOR each, so a size the sweep never saw large keeps an allowance) that keep blocks + temporaries at or
above every figure the compiler reported in benchmarks/results/compile-sweep.jsonl, with the least total
over-estimate relative to each figure (a linear program). The model's margin (`MARGIN`, `WIDE_F32_MARGIN`) then
covers problems the sweep did not see. Only generations whose compiler reports need (v4, v5e, v6e) can be fitted.

    python benchmarks/fit_tpu_vmem.py --target v4 [--labels resweep,near-limit,sample]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import kernels  # noqa: F401  (environment defaults before jax)
import numpy as np
from scipy.optimize import linprog

from benchmarks.compile_tables import RESULTS, load
from kernels import Problem
from kernels.tpu.config import ROLES, Config, kernel_itemsize, vmem_parts

FLOOR = 0.05


def points(target: str, role: str, itemsize: int, labels: set[str] | None) -> list[tuple[int, tuple[int, ...], int]]:
    """(fixed bytes, temporary sizes, compiler's figure) of every compile of `target` whose kernels see `itemsize`
    bytes per element and that reports `role`."""
    found = []
    for row in load(RESULTS / "compile-sweep.jsonl"):
        if row["target"] != target or (labels and row["label"] not in labels) or role not in row["kernels"]:
            continue
        problem = Problem.from_dict(row["problem"])
        if kernel_itemsize(problem) != itemsize:
            continue
        parts = vmem_parts(role, Config.from_dict(row["config"]), problem)
        found.append((parts.fixed, parts.sizes, row["kernels"][role]["memory_bytes"]))
    return found


def fit(data: list[tuple[int, tuple[int, ...], int]]) -> tuple[float, ...]:
    """Coefficients c >= FLOOR minimising sum((fixed + c.sizes) / real) subject to fixed + c.sizes >= real."""
    sizes = np.array([s for _, s, _ in data], dtype=float)
    fixed = np.array([f for f, _, _ in data], dtype=float)
    real = np.array([r for _, _, r in data], dtype=float)
    objective = (sizes / real[:, None]).sum(axis=0)
    result = linprog(objective, A_ub=-sizes, b_ub=fixed - real, bounds=[(FLOOR, None)] * sizes.shape[1],
                     method="highs")
    if not result.success:
        raise RuntimeError(f"no upper bound fits: {result.message}")
    return tuple(float(np.ceil(c * 100) / 100) for c in result.x)  # rounded up: still an upper bound


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True, help="v4, v5e or v6e")
    parser.add_argument("--labels", default="", help="only rows with these labels (comma list; default all)")
    args = parser.parse_args()
    labels = {label for label in args.labels.split(",") if label} or None
    for role in ROLES:
        for itemsize in (2, 4):
            data = points(args.target, role, itemsize, labels)
            if not data:
                print(f"{role} {8 * itemsize}-bit: no figures")
                continue
            coefficients = fit(data)
            ratios = [(f + np.dot(coefficients, s)) / r for f, s, r in data]
            print(f"{role} {8 * itemsize}-bit: {len(data)} kernels, coefficients {coefficients}, estimate / figure "
                  f"before the margin {min(ratios):.2f}..{max(ratios):.2f} (median {np.median(ratios):.2f})")


if __name__ == "__main__":
    main()
