"""Recompile recorded sweep rows with the current kernels: after a kernel change moves VMEM needs (e.g. the
in-place layouts of kernels/tpu/layout.py), the models must be checked against what the compiler now says.

    python benchmarks/compile_resweep.py --targets v5e,v6e --modes pairs --label layout-resweep [--limit N]

Rows are picked from benchmarks/results/compile-sweep.jsonl (TPU targets; `--modes` filters by the layout the
current kernels give the problem), deduplicated, less the configs the current kernels already compiled
(`compile_tables.current`), and appended to it with the new label.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import kernels  # noqa: F401  (environment defaults before jax)

from autotune.compile.pool import CompileJob
from benchmarks.compile_sweep import run
from benchmarks.compile_tables import RESULTS, current, load
from kernels import Problem
from kernels.tpu.layout import layout_mode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default="v4,v5e,v6e,v5p,tpu7x")
    parser.add_argument("--modes", default="pairs,heads,transposed")
    parser.add_argument("--label", default="layout-resweep")
    parser.add_argument("--limit", type=int, default=0, help="at most this many rows per target (a sample)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS / "compile-sweep.jsonl"))
    args = parser.parse_args()
    targets, modes = args.targets.split(","), args.modes.split(",")
    picked: dict[str, list[CompileJob]] = {t: [] for t in targets}
    rows = load(RESULTS / "compile-sweep.jsonl")
    key = lambda row: json.dumps([row["target"], row["problem"], row["config"]], sort_keys=True)  # noqa: E731
    seen = {key(row) for row in rows if current(row)}  # configs the current kernels already compiled
    for row in rows:
        p = row["problem"]
        if row["target"] not in picked or layout_mode(p["heads"], p["kv_heads"], p["head_dim"]) not in modes:
            continue
        if key(row) not in seen:
            seen.add(key(row))
            picked[row["target"]].append(CompileJob(row["target"], Problem.from_dict(p), row["config"]))
    rng = random.Random(args.seed)
    jobs = []
    for target_jobs in picked.values():
        if args.limit and len(target_jobs) > args.limit:
            target_jobs = rng.sample(target_jobs, args.limit)
        jobs += target_jobs
    print(f"{len(jobs)} compiles", flush=True)
    run(jobs, Path(args.out), processes=args.processes, nice=10, timeout=150.0, label=args.label)


if __name__ == "__main__":
    main()
