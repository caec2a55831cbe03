"""The compile-only search (`autotune search --target`) on this machine: how fast it vets a shapes file per target,
and what it spares a later device search.

For each target, every problem of the shapes file gets a sample of its valid configs (the default first, then a
seeded random sample, `--trials` per problem), compiled deviceless in parallel processes and recorded, exactly as the
CLI does (autotune.compile.search), into a fresh SQLite file. Reported per target: wall time, configs per minute,
the share of the search space the validity checks alone reject, and of the configs they accept the share the
compiler rejects and the share that spill registers; then the share of device compile time a later device search
saves by skipping those (weighted by each config's own compile seconds, a stand-in for its compile on the device).

    nice python benchmarks/target_search.py                       # h100, a100, v5e, v6e; 10 configs per problem
    python benchmarks/target_search.py --targets h100 --trials 4  # quicker
Writes benchmarks/results/target-search-cpu.json; the table goes to stdout (copied into target-search-cpu.md).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import kernels  # noqa: F401  (environment defaults before jax)
import jax

from autotune.compile.results import REJECTED, SPILLS, trial_verdict
from autotune.shapes import load_shapes
from autotune.compile.search import plan_searches, resolve_targets, run_plans
from db import Store

HERE = Path(__file__).parent
SHAPES = HERE / "target_search_shapes.toml"
RESULTS = HERE / "results" / "target-search-cpu.json"


def sweep(target_name: str, specs, trials: int, seed: int, processes: int, nice: int, folder: str) -> dict:
    """One target's compile-only sweep over the shapes file; its figures as a dict."""
    targets = resolve_targets(target_name, None)
    with Store(os.path.join(folder, f"{target_name}.db")) as store:
        plans = plan_searches(specs, targets, store, trials=trials, grid_all=False, seed=seed,
                              jax_version=jax.__version__)
        start = time.perf_counter()
        run_plans(plans, store, processes=processes, nice=nice)
        wall = time.perf_counter() - start
        trials_ = [t for plan in plans for t in store.trials(plan.key)]
    verdicts = [trial_verdict(t) for t in trials_]
    compile_s = [t.compile_s or 0.0 for t in trials_]
    skipped_s = sum(s for s, v in zip(compile_s, verdicts) if v in (REJECTED, SPILLS))
    failed = {}
    for t in trials_:
        if t.status != "compiled":
            failed[t.error_class] = failed.get(t.error_class, 0) + 1
    compiled = [t for t in trials_ if t.status == "compiled"]
    medians = sorted(compile_s)
    return {
        "target": target_name, "problems": len(plans), "configs": len(trials_), "wall_s": round(wall, 1),
        "configs_per_min": round(len(trials_) / wall * 60, 1) if wall else None,
        "space": sum(p.grid for p in plans), "valid": sum(p.valid for p in plans),
        "checks_reject_share": round(1 - sum(p.valid for p in plans) / sum(p.grid for p in plans), 3),
        "compiled": len(compiled), "failed": failed,
        "rejected": verdicts.count(REJECTED), "spilled": verdicts.count(SPILLS),
        "rejected_share": round(verdicts.count(REJECTED) / len(trials_), 3),
        "spill_share": round(verdicts.count(SPILLS) / len(trials_), 3),
        "median_compile_s": round(medians[len(medians) // 2], 2), "max_compile_s": round(medians[-1], 2),
        "device_compile_saved_share": round(skipped_s / sum(compile_s), 3) if sum(compile_s) else 0.0,
        "max_spill_bytes": max((max((k.get("spill_store_bytes") or 0) for k in (t.figures or {}).get("kernels", []))
                                for t in compiled), default=0),
    }


def table(rows: list[dict]) -> str:
    head = ("| target | problems x configs | wall s | configs/min | checks reject (of space) | compiler rejects "
            "(of accepted) | spill (of accepted) | median / max compile s | device compile time saved |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(
            f"| {r['target']} | {r['problems']} x {r['configs'] // max(1, r['problems'])} = {r['configs']} | "
            f"{r['wall_s']:.0f} | {r['configs_per_min']:.1f} | {r['checks_reject_share']:.0%} "
            f"({r['space'] - r['valid']}/{r['space']}) | {r['rejected_share']:.0%} ({r['rejected']}) | "
            f"{r['spill_share']:.0%} ({r['spilled']}) | {r['median_compile_s']} / {r['max_compile_s']} | "
            f"{r['device_compile_saved_share']:.0%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="h100,a100,v5e,v6e")
    parser.add_argument("--shapes", default=str(SHAPES))
    parser.add_argument("--trials", type=int, default=10, help="configs compiled per problem and target")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--nice", type=int, default=10)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    specs = load_shapes(args.shapes)
    rows = []
    with tempfile.TemporaryDirectory(prefix="target-search-") as folder:
        for name in args.targets.split(","):
            rows.append(sweep(name, specs, args.trials, args.seed, args.processes, args.nice, folder))
            print(json.dumps(rows[-1]), flush=True)
    document = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                "jax": jax.__version__, "shapes": Path(args.shapes).name, "trials_per_problem": args.trials,
                "seed": args.seed, "processes": args.processes, "results": rows}
    Path(args.out).write_text(json.dumps(document, indent=2) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
