"""Device check of the GPU static time model: time our forward kernel at the configs predicted here, winners and
losers alike, and report predicted vs measured with the Spearman rank correlation.

    python benchmarks/gpu/predicted_vs_measured.py --precompute   # CPU machine (jax 0.10.2): compile + predict
    python benchmarks/gpu/predicted_vs_measured.py                # on an H100/H200: time each config (< 8 min)

The predictions come from deviceless H100 compiles on the CPU machine and are committed
(`benchmarks/gpu/predicted-configs.json`), because the GPU machine has another jax (0.11, Python 3.12) that does not
compile deviceless. Results go to $OUT (or ./gpu-results): predicted-vs-measured.json and .md. Measured times are
this run's own (median of 10 timed calls after 2 warm-up calls), never mixed with the predicted ones.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
PREDICTED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "predicted-configs.json")
PROBLEMS = (
    dict(batch=4, q_len=2048, kv_len=2048, heads=16, kv_heads=16, head_dim=128, dtype="bfloat16", causal=False),
    dict(batch=4, q_len=4096, kv_len=4096, heads=16, kv_heads=16, head_dim=64, dtype="bfloat16", causal=True),
)
BLOCKS, WARPS, STAGES = (32, 64, 128), (4, 8), (1, 2, 3)


def precompute(per_problem: int, seed: int) -> None:
    """Compile each sampled config deviceless for H100 and store the model's prediction."""
    from autotune.compile.pool import CompileJob, compile_many
    from kernels import Problem

    rng = random.Random(seed)
    jobs = []
    for spec in PROBLEMS:
        problem = Problem(**spec)
        space = [(bq, bk, w, s) for bq in BLOCKS for bk in BLOCKS for w in WARPS for s in STAGES]
        for bq, bk, w, s in rng.sample(space, per_problem):
            config = {"block_q": bq, "block_k": bk, "num_warps": w, "num_stages": s, "bwd_block_q": 64,
                      "bwd_block_k": 64, "bwd_num_warps": 4, "bwd_num_stages": 2}
            jobs.append(CompileJob("h100", problem, config))
    rows = []
    for result in compile_many(jobs, processes=1):
        if result.ok and result.prediction:
            rows.append({"problem": result.job.problem.to_dict(), "config": result.job.config,
                         "predicted": result.prediction, "spills": result.spills})
    with open(PREDICTED, "w") as f:
        json.dump({"target": "h100", "note": "predicted, not measured", "configs": rows}, f, indent=1)
    print(f"{len(rows)} predicted configs of {len(jobs)} -> {PREDICTED}")


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    def ranks(x):
        order = sorted(range(len(x)), key=x.__getitem__)
        r = [0.0] * len(x)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r
    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.mean(ra), statistics.mean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    return cov / (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5


def measure(budget_s: float) -> None:
    import jax
    import jax.numpy as jnp

    import kernels.gpu as gpu

    with open(PREDICTED) as f:
        rows = json.load(f)["configs"]
    kind = jax.devices()[0].device_kind
    out = os.environ.get("OUT", "gpu-results")
    os.makedirs(out, exist_ok=True)
    start, done = time.time(), []
    for row in rows:
        if time.time() - start > budget_s:
            print("time budget reached; stopping")
            break
        p, c = row["problem"], row["config"]
        key = jax.random.PRNGKey(0)
        q = jax.random.normal(key, (p["batch"], p["q_len"], p["heads"], p["head_dim"]), jnp.bfloat16)
        k = jax.random.normal(key, (p["batch"], p["kv_len"], p["kv_heads"], p["head_dim"]), jnp.bfloat16)
        config = gpu.Config.from_dict(c)
        fn = jax.jit(lambda q, k, v: gpu.flash_attention(q, k, v, causal=p["causal"], config=config,
                                                         device_kind=kind))
        try:
            for _ in range(2):
                fn(q, k, k).block_until_ready()
            times = []
            for _ in range(10):
                t = time.perf_counter()
                fn(q, k, k).block_until_ready()
                times.append(time.perf_counter() - t)
        except Exception as exc:  # noqa: BLE001 - a config the device refuses is reported, not fatal
            print("failed", c, type(exc).__name__, str(exc)[:200])
            continue
        measured = statistics.median(times)
        done.append({**row, "measured_s": measured, "device": kind})
        print(f"{p['head_dim']} causal={p['causal']} {c['block_q']}x{c['block_k']} w{c['num_warps']} "
              f"s{c['num_stages']}: measured {measured * 1e3:.3f} ms, predicted {row['predicted']['seconds'] * 1e3:.3f}"
              f" ms ({row['predicted']['model_version']})", flush=True)
    _report(done, out)


def _report(done: list[dict], out: str) -> None:
    lines = ["# Predicted (model) vs measured (this device), our forward kernel", ""]
    groups: dict[str, list[dict]] = {}
    for r in done:
        groups.setdefault(json.dumps(r["problem"], sort_keys=True), []).append(r)
    for key, rows in groups.items():
        pred = [r["predicted"]["seconds"] for r in rows]
        meas = [r["measured_s"] for r in rows]
        ratio = [a / b for a, b in zip(pred, meas)]
        best = min(rows, key=lambda r: r["measured_s"])
        rank = 1 + sum(r["predicted"]["seconds"] < best["predicted"]["seconds"] for r in rows)
        lines += [f"## {key}", "", f"- configs timed: {len(rows)}; Spearman(predicted, measured) = "
                  f"{spearman(pred, meas):.2f}; median predicted/measured {statistics.median(ratio):.2f}; "
                  f"measured best ranks {rank} in the prediction", ""]
        lines += ["| config | measured ms | predicted ms | ratio |", "|---|---|---|---|"]
        for r, x in sorted(zip(rows, ratio), key=lambda t: t[0]["measured_s"]):
            c = r["config"]
            lines.append(f"| {c['block_q']}x{c['block_k']} w{c['num_warps']} s{c['num_stages']} | "
                         f"{r['measured_s'] * 1e3:.3f} | {r['predicted']['seconds'] * 1e3:.3f} | {x:.2f} |")
        lines.append("")
    if done:
        pred = [r["predicted"]["seconds"] for r in done]
        meas = [r["measured_s"] for r in done]
        lines.insert(2, f"All {len(done)} configs on {done[0]['device']}: Spearman {spearman(pred, meas):.2f}\n")
    with open(os.path.join(out, "predicted-vs-measured.json"), "w") as f:
        json.dump(done, f, indent=1)
    with open(os.path.join(out, "predicted-vs-measured.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precompute", action="store_true")
    parser.add_argument("--per-problem", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop timing new configs after this long")
    args = parser.parse_args()
    if args.precompute:
        precompute(args.per_problem, args.seed)
    else:
        measure(args.budget_s)


if __name__ == "__main__":
    main()
