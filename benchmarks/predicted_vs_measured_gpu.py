"""The GPU static time model against measurements nobody here made: tokamax 0.0.17's measured winners and a matmul.

    python benchmarks/predicted_vs_measured_gpu.py collect calib h100 [--sample N]   # compile points (slow)
    python benchmarks/predicted_vs_measured_gpu.py collect calib a100 [--sample N]
    python benchmarks/predicted_vs_measured_gpu.py collect rank [--keys 20 --configs 12]
    python benchmarks/predicted_vs_measured_gpu.py collect matmul
    python benchmarks/predicted_vs_measured_gpu.py collect cost   # what predicting adds inside the compile worker
    python benchmarks/predicted_vs_measured_gpu.py fit        # grid search of the FITTED_ constants on H100 only
    python benchmarks/predicted_vs_measured_gpu.py report     # writes benchmarks/results/predicted-vs-measured-gpu.md

Collecting compiles JAX 0.10.2's `mha` deviceless with each key's winner blocks, warps and stages and stores the
parsed SASS (`POINTS`); fitting and reporting only re-run the model on those, so they take seconds.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import gpu_model_points as pts  # noqa: E402
from autotune.compile.model.gpu_blocks import Work, mha_forward  # noqa: E402
from autotune.compile.model.gpu_hardware import FITTED, Fitted, get_hardware  # noqa: E402
from autotune.compile.model.gpu_model import combine, predict_kernel  # noqa: E402
from autotune.compile.model.gpu_sass import kernel_from_dict  # noqa: E402
from autotune.compile.model.prediction import GPU_MODEL_VERSION  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
POINTS = os.path.join(RESULTS, "predicted-vs-measured-gpu-points.jsonl")
COST = os.path.join(RESULTS, "predicted-vs-measured-gpu-cost.json")
REPORT = os.path.join(RESULTS, "predicted-vs-measured-gpu.md")
HARDWARE = {"h100": "h100", "a100": "a100_40gb"}  # the tables' devices: H100 SXM 80 GB, A100 SXM4 40 GB
MATMUL_N, MATMUL_TILES = 8192, "block_m: 128 block_n: 256 block_k: 64 num_stages: 3 num_warps: 8 num_ctas: 1"
ITEMSIZE = {"bf16": 2, "f16": 2, "f32": 4}


def _evenly(rows: list, n: int | None) -> list:
    if not n or n >= len(rows):
        return rows
    return [rows[round(i * (len(rows) - 1) / (n - 1))] for i in range(n)]


def _compile_row(device: str, row: dict, config: dict) -> dict:
    b, t, h, d = row["shape"]
    return pts.compile_mha(device, row["shape"], row["dtype"], row["causal"], row["residuals"], row["scale"],
                           config["block_q"], config["block_k"], config["num_warps"], config["num_stages"])


def collect_calib(device: str, sample: int | None) -> None:
    rows = [r for r in pts.table(device) if not r["mha_cannot"]]
    done = pts.done_ids(POINTS)
    for row in _evenly(rows, sample):
        ident = f"calib:{device}:{row['index']}"
        if ident in done:
            continue
        result = _compile_row(device, row, row["config"])
        pts.append(POINTS, {"id": ident, "kind": "calib", "device": device, "row": row, "config": row["config"],
                            **result})
        print(ident, row["shape"], row["causal"], result["ok"], f"{result['compile_s']:.1f}s", flush=True)


def space(row: dict) -> list[dict]:
    """tokamax 0.0.17's search space for the Pallas-Triton forward (`_get_autotuning_configs`), clamped to the
    sequence as it does; mha needs blocks that divide the sequence."""
    t = row["shape"][1]
    cap = 1 << (t - 1).bit_length()
    found = {}
    for bq, bk, w, s in itertools.product((16, 32, 64, 128), (16, 32, 64, 128), (1, 2, 4, 8), (1, 2, 3, 4)):
        bq, bk = max(16, min(bq, cap)), max(16, min(bk, cap))
        if t % bq == 0 and t % bk == 0:
            found[(bq, bk, w, s)] = {"block_q": bq, "block_k": bk, "num_warps": w, "num_stages": s}
    return list(found.values())


def collect_rank(keys: int, configs: int, seed: int) -> None:
    rows = [r for r in pts.table("h100") if not r["mha_cannot"] and not r["residuals"]]
    done = pts.done_ids(POINTS)
    rng = random.Random(seed)
    for row in _evenly(rows, keys):
        winner = {k: row["config"][k] for k in ("block_q", "block_k", "num_warps", "num_stages")}
        others = [c for c in space(row) if c != winner]
        for config in [winner] + rng.sample(others, min(configs, len(others))):
            ident = f"rank:h100:{row['index']}:{config['block_q']}-{config['block_k']}-{config['num_warps']}-" \
                    f"{config['num_stages']}"
            if ident in done:
                continue
            result = _compile_row("h100", row, config)
            pts.append(POINTS, {"id": ident, "kind": "rank", "device": "h100", "row": row, "config": config,
                                "winner": config == winner, **result})
            print(ident, result["ok"], f"{result['compile_s']:.1f}s", flush=True)


def collect_matmul() -> None:
    if "matmul:h100" in pts.done_ids(POINTS):
        return
    result = pts.compile_matmul("h100", MATMUL_N, MATMUL_TILES)
    pts.append(POINTS, {"id": "matmul:h100", "kind": "matmul", "device": "h100", **result})


def collect_cost() -> None:
    """Our kernel through the compile worker's own job function, with an empty SASS cache and then a warm one."""
    import tempfile

    os.environ["AUTOTUNE_SASS_CACHE"] = tempfile.mkdtemp(prefix="gpu-model-cost-")
    from autotune.compile.worker import run_job
    from kernels import Problem

    config = {"block_q": 128, "block_k": 64, "num_warps": 8, "num_stages": 2, "bwd_block_q": 64, "bwd_block_k": 64,
              "bwd_num_warps": 4, "bwd_num_stages": 2}
    rows = []
    for backward in (False, True):
        problem = Problem(batch=4, q_len=4096, kv_len=4096, heads=16, kv_heads=16, head_dim=128, dtype="bfloat16",
                          causal=True, backward=backward)
        for target in ("h100", "a100"):
            for cache in ("cold", "warm"):
                r = run_job({"target": target, "problem": problem.to_dict(), "config": config})
                rows.append({"target": target, "backward": backward, "sass_cache": cache,
                             "compile_s": r["seconds"], "predict_s": r.get("prediction_seconds")})
                print(rows[-1], flush=True)
    with open(COST, "w") as f:
        json.dump(rows, f, indent=1)


def load_points() -> list[dict]:
    with open(POINTS) as f:
        return [json.loads(line) for line in f if line.strip()]


def predict_point(point: dict, fitted: Fitted = FITTED):
    """The model's prediction for a stored point (None for a config the compiler refused)."""
    if not point.get("ok"):
        return None
    hw = get_hardware(HARDWARE[point["device"]])
    kernels = [kernel_from_dict(k) for k in point["kernels"]]
    if point["kind"] == "matmul":
        n = MATMUL_N
        work = Work(trips=((n // 64,),) * kernels[0].grid[0], flops=2.0 * n ** 3, min_bytes=3.0 * n * n * 2)
        return combine([predict_kernel(hw, k, work, fitted) for k in kernels])
    row, config = point["row"], point["config"]
    b, t, h, d = row["shape"]
    work = mha_forward(b, t, h, d, ITEMSIZE[row["dtype"]], config["block_q"], config["block_k"], row["causal"])
    return combine([predict_kernel(hw, k, work if k.name == "mha_forward" else None, fitted) for k in kernels])


def ratios(points: list[dict], fitted: Fitted = FITTED) -> list[float]:
    found = []
    for p in points:
        pred = predict_point(p, fitted)
        if pred is not None:
            found.append(pred.seconds * 1e3 / p["row"]["measured_ms"])
    return found


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def spread(values: list[float]) -> tuple[float, float, float]:
    """Median ratio, the 90th percentile of max(r, 1/r), and the share within 2x."""
    folded = [max(r, 1 / r) for r in values]
    return statistics.median(values), quantile(folded, 0.9), sum(f <= 2 for f in folded) / len(folded)


def fit(points: list[dict]) -> tuple[Fitted, float]:
    """Grid search on the H100 calibration points only: the median log ratio nearest 0, then the least spread."""
    calib = [p for p in points if p["kind"] == "calib" and p["device"] == "h100" and p.get("ok")]
    best, best_score = FITTED, float("inf")
    for clock, wait, dep, prog in itertools.product((1.7, 1.83), (60, 180, 300), (3, 4),
                                                    (2500, 5000, 8000)):
        fitted = Fitted(clock_under_load=(("h100", clock), ("h200", clock)), wait_cycles=wait,
                        barrier_cycles=FITTED.barrier_cycles, program_cycles=prog, warp_issue_cycles=dep,
                        launch_seconds=FITTED.launch_seconds)
        logs = [math.log(r) for r in ratios(calib, fitted)]
        score = abs(statistics.median(logs)) + quantile([abs(x) for x in logs], 0.9)
        if score < best_score:
            best, best_score = fitted, score
    return best, best_score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=("collect", "fit", "report"))
    parser.add_argument("what", nargs="*")
    parser.add_argument("--sample", type=int, default=None)
    parser.add_argument("--keys", type=int, default=20)
    parser.add_argument("--configs", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.makedirs(RESULTS, exist_ok=True)
    if args.step == "collect":
        start = time.time()
        if args.what[0] == "calib":
            collect_calib(args.what[1], args.sample)
        elif args.what[0] == "cost":
            collect_cost()
        elif args.what[0] == "rank":
            collect_rank(args.keys, args.configs, args.seed)
        else:
            collect_matmul()
        print(f"collected in {time.time() - start:.0f} s")
    elif args.step == "fit":
        fitted, score = fit(load_points())
        print(fitted, f"score {score:.3f}")
    else:
        from benchmarks.gpu_model_report import write_report

        write_report(load_points(), REPORT)


if __name__ == "__main__":
    main()
