"""Fit the TPU VMEM model's temporaries to the compiler's figures: the tightest upper bound of every recorded kernel.

Each TPU kernel's VMEM is its exact blocks and scratch plus temporaries, a sum of coefficients times six sizes
(`kernels.tpu.config.vmem_parts`, `temporary_sizes`). For one generation, kernel and dtype (16-bit or 32-bit in
the kernel: float32 temporaries follow other sizes than bfloat16 ones) this finds the coefficients
(at least FLOOR each, so a size the sweep never saw large keeps an allowance) that keep blocks + temporaries at or
above every figure the compiler reported in benchmarks/results/compile-sweep.jsonl, with the least total
over-estimate relative to each figure (a linear program). The fit's margins (`kernels.tpu.vmem.TemporaryFit`:
`margin`, `wide_f32_margin`) then cover problems the sweep did not see. Only generations whose compiler reports need (v4, v5e, v6e) can be fitted.
`--per-row` fits the sizes of one batch row (the form v4 uses, `kernels.tpu.vmem.temporary_sizes`); by default the
form of the target's current fit. `--validate problem|label` fits again without each group of rows (a problem's
head_dim and features, or a run's label) and reports how far the held-out kernels' figures exceed that fit: the
margin a generation needs for problems it has not seen is about 1 / the worst held-out ratio.

    python benchmarks/fit_tpu_vmem.py --target v4 [--labels resweep,near-limit,sample] [--validate problem]

v4's fit uses the runs in FIT_LABELS (the default for --labels); its `layout-holdout` run (compile_sweep.py
--holdout, problems none of those runs had) stays out of it, to check the fit and its margins on problems it never
saw. Only the current kernels' rows count (`compile_tables.current`: TPU rows since the in-place layouts).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import kernels  # noqa: F401  (environment defaults before jax)
import numpy as np
from scipy.optimize import linprog

from benchmarks.compile_tables import RESULTS, current, load
from kernels import Problem
from kernels.tpu.config import ROLES, Config, kernel_itemsize, vmem_parts
from kernels.tpu.vmem import FITS

FLOOR = 0.05
# On 128 MiB chips XLA's memory-space assignment may prefetch whole operands into free VMEM, and the kernel's scoped
# figure then counts them (v5e float32 d256 backward: q, k, v sliced into VMEM, 77 MB against 5.8 MB of blocks and
# scratch). Compiles record those operands' bytes (`operands_in_vmem`); in rows from before that, a figure over this
# many times the kernel's own blocks and scratch is taken for such a prefetch. Either is out of the fit.
PREFETCHED = 4.0
FIT_LABELS = {"v4": ("layout-resweep",), "v5e": ("layout-resweep",)}  # the runs each deployed fit was made from


def points(target: str, role: str, itemsize: int, labels: set[str] | None, per_row: bool = False,
           group=None) -> list[tuple[int, tuple[int, ...], int]]:
    """(fixed bytes, temporary sizes, compiler's figure) of every compile of `target` whose kernels see `itemsize`
    bytes per element and that reports `role` (with `group`, a fourth item: the row's group)."""
    found = []
    for row in load(RESULTS / "compile-sweep.jsonl"):
        if (row["target"] != target or not current(row) or (labels and row["label"] not in labels)
                or role not in row["kernels"]):
            continue
        problem = Problem.from_dict(row["problem"])
        if kernel_itemsize(problem) != itemsize:
            continue
        parts = vmem_parts(role, Config.from_dict(row["config"]), problem)
        figure = row["kernels"][role]["memory_bytes"]
        if row["kernels"][role].get("operands_in_vmem") or figure > PREFETCHED * parts.fixed:
            continue  # XLA's prefetch of whole operands into free VMEM, not the kernel's need
        point = (parts.fixed, parts.sizes_for(per_row), figure)
        found.append(point + (group(row),) if group else point)
    return found


GROUPS = {"problem": lambda row: (row["problem"]["head_dim"], row["problem"]["segments"], row["problem"]["softcap"]),
          "label": lambda row: row["label"]}


def validate(data: list[tuple[int, tuple[int, ...], int, object]]) -> tuple[float, int]:
    """(worst figure-relative estimate of a held-out kernel, groups held out): each group fitted without it."""
    worst, held = float("inf"), 0
    for group in {g for *_, g in data}:
        train = [p[:3] for p in data if p[3] != group]
        if not train:
            continue
        try:
            coefficients = fit(train)
        except RuntimeError:
            continue
        held += 1
        worst = min([worst] + [(f + np.dot(coefficients, s)) / r for f, s, r, g in data if g == group])
    return worst, held


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
    parser.add_argument("--labels", default="", help="only rows with these labels (comma list; default: the "
                                                      "target's FIT_LABELS, else all)")
    parser.add_argument("--per-row", action=argparse.BooleanOptionalAction, default=None,
                        help="fit the sizes of one batch row (default: the form of the target's current fit)")
    parser.add_argument("--validate", choices=sorted(GROUPS), help="also refit leaving each group out")
    args = parser.parse_args()
    labels = {label for label in args.labels.split(",") if label} or set(FIT_LABELS.get(args.target, ())) or None
    per_row = args.per_row if args.per_row is not None else FITS[args.target].per_row
    print(f"{args.target}: {'per-row' if per_row else 'batch-block'} sizes")
    for role in ROLES:
        for itemsize in (2, 4):
            data = points(args.target, role, itemsize, labels, per_row)
            if not data:
                print(f"{role} {8 * itemsize}-bit: no figures")
                continue
            coefficients = fit(data)
            ratios = [(f + np.dot(coefficients, s)) / r for f, s, r in data]
            print(f"{role} {8 * itemsize}-bit: {len(data)} kernels, coefficients {coefficients}, estimate / figure "
                  f"before the margin {min(ratios):.2f}..{max(ratios):.2f} (median {np.median(ratios):.2f})")
            if args.validate:
                worst, held = validate(points(args.target, role, itemsize, labels, per_row, GROUPS[args.validate]))
                print(f"    {held} {args.validate}s held out in turn: worst held-out estimate / figure {worst:.3f}")


if __name__ == "__main__":
    main()
