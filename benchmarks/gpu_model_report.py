"""Writes benchmarks/results/predicted-vs-measured-gpu.md from the stored points (see predicted_vs_measured_gpu.py).

Every predicted figure is labelled predicted with the model version; measured figures are tokamax's own samples
(median of 5) or, for the matmul, the figure named with its source. Nothing measured is made up here.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from collections import defaultdict

from benchmarks.predicted_vs_measured_gpu import (
    COST, MATMUL_N, MATMUL_TILES, predict_point, quantile, space, spread,
)
from autotune.compile.model.gpu_hardware import FITTED, get_hardware
from autotune.compile.model.prediction import GPU_MODEL_VERSION

MATMUL_EXPECTED_TFLOPS = 800.0  # ../shared/KERNEL-NOTES.md: "a large matmul measured about 800 on our H100 and H200"


def _rows(points: list[dict], kind: str, device: str) -> list[tuple[dict, object]]:
    found = [p for p in points if p["kind"] == kind and p["device"] == device]
    return [(p, predict_point(p)) for p in sorted(found, key=lambda p: p["row"]["index"])]


def _table_section(title: str, pairs: list[tuple[dict, object]], note: str) -> list[str]:
    ok = [(p, pred) for p, pred in pairs if pred is not None]
    lines = [f"## {title}", "", note, ""]
    if not ok:
        return lines + ["No point compiled.", ""]
    ratio = [pred.seconds * 1e3 / p["row"]["measured_ms"] for p, pred in ok]
    median, p90_fold, within2 = spread(ratio)
    lines += [
        f"- points: {len(ok)} compiled of {len(pairs)} tried; ratio = predicted ({GPU_MODEL_VERSION}) / measured",
        f"- **median ratio {median:.2f}**, 10th-90th percentile of the ratio {quantile(ratio, 0.1):.2f}-"
        f"{quantile(ratio, 0.9):.2f}; 90th percentile of max(r, 1/r) **{p90_fold:.2f}x**; within 2x: "
        f"**{100 * within2:.0f}%** (targets: median within 1.5x, 90% within 2x)",
    ]
    by = defaultdict(list)
    for (p, pred), r in zip(ok, ratio):
        by[("causal" if p["row"]["causal"] else "full", p["row"]["shape"][3])].append(r)
    lines.append("- median ratio by mask and head_dim: " + ", ".join(
        f"{mask} d{d}: {statistics.median(v):.2f} ({len(v)})" for (mask, d), v in sorted(by.items())))
    failed = [p for p, pred in pairs if pred is None]
    if failed:
        lines.append(f"- refused by the compiler (mha at the winner's blocks): {len(failed)}: " + "; ".join(
            f"{p['id']} {p.get('error', '')[:90]}" for p in failed[:5]))
    lines += ["", "| key | q shape [B,T,N,H] | dtype | mask | residuals | winner (bq, bk, warps, stages) | "
                  "measured ms | predicted ms | ratio | predicted bound |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (p, pred), r in zip(ok, ratio):
        row, c = p["row"], p["config"]
        lines.append(f"| {row['index']} | {row['shape']} | {row['dtype']} | {'causal' if row['causal'] else 'none'} "
                     f"| {row['residuals']} | {c['block_q']}, {c['block_k']}, {c['num_warps']}, {c['num_stages']} "
                     f"| {row['measured_ms']:.4f} | {pred.seconds * 1e3:.4f} | {r:.2f} | {pred.bound} |")
    return lines + [""]


def _rank_section(points: list[dict]) -> list[str]:
    keys = defaultdict(list)
    for p in points:
        if p["kind"] == "rank":
            keys[p["row"]["index"]].append(p)
    lines = ["## (d) Where the measured winner ranks among the model's predictions (H100)", ""]
    hits, baseline, rows, firsts, first_base, whole, whole_base = 0, [], [], 0, [], [], []
    for index, group in sorted(keys.items()):
        scored = [(predict_point(p).seconds, p) for p in group if p.get("ok")]
        winner = [s for s, p in scored if p["winner"]]
        if not winner or len(scored) < 2:
            continue
        rank = 1 + sum(s < winner[0] for s, _ in scored)
        hits += rank <= 5
        firsts += rank == 1
        baseline.append(min(5, len(scored)) / len(scored))
        first_base.append(1 / len(scored))
        row = group[0]["row"]
        size = len(space(row))  # the whole space: the rank among the sample scaled to it (an estimate)
        guess = 1 + (rank - 1) * (size - 1) / (len(scored) - 1)
        whole.append(guess)
        whole_base.append(min(5, size) / size)
        rows.append(f"| {index} | {row['shape']} | {row['dtype']} | {'causal' if row['causal'] else 'none'} | "
                    f"{len(group)} | {len(scored)} | {rank} | {size} | {guess:.0f} |")
    if not rows:
        return lines + ["No ranked key.", ""]
    lines += [
        f"- keys: {len(rows)}; per key the winner plus configs drawn uniformly (seed 0) from tokamax 0.0.17's own "
        f"Pallas-Triton forward space (block_q, block_k in 16..128, warps 1..8, stages 1..4, clamped to the "
        f"sequence; mha needs blocks dividing it), each compiled deviceless for H100 with JAX's mha",
        f"- **top-5 rate {hits}/{len(rows)} = {100 * hits / len(rows):.0f}%**; uniform-random baseline "
        f"{100 * statistics.mean(baseline):.0f}% (mean over keys of 5 / configs compiled)",
        f"- top-1 (the model's pick is the measured winner): {firsts}/{len(rows)} = {100 * firsts / len(rows):.0f}%; "
        f"uniform-random baseline {100 * statistics.mean(first_base):.0f}%",
        "- caveat: with about 9 configs per key (CPU time: one compile at a time) top-5 is a weak test (random gets "
        "over half); the drawn configs include many poor ones (1-2 warps, 16-row blocks) that are easy to rank low",
        f"- over the whole space (median {statistics.median(len(space(g[0]['row'])) for g in keys.values()):.0f} "
        f"configs per key), estimated by scaling the rank among the sample: 1 + (rank - 1) x (space - 1) / "
        f"(compiled - 1): winner in the top 5 for {sum(g <= 5 for g in whole)}/{len(rows)} = "
        f"{100 * sum(g <= 5 for g in whole) / len(rows):.0f}% of keys (uniform random: "
        f"{100 * statistics.mean(whole_base):.0f}%); median estimated rank {statistics.median(whole):.0f}",
        "- caveat: the winner was measured for tokamax's kernel, the ranking predicts JAX's mha at the same configs",
        "", "| key | q shape | dtype | mask | configs tried | compiled | winner's predicted rank | space | "
        "rank in space (estimated) |", "|---|---|---|---|---|---|---|---|---|"] + rows
    return lines + [""]


def _matmul_section(points: list[dict]) -> list[str]:
    found = [p for p in points if p["kind"] == "matmul" and p.get("ok")]
    lines = ["## (a) A large XLA matmul on H100", ""]
    if not found:
        return lines + ["Not compiled.", ""]
    pred = predict_point(found[0])
    tflops = 2.0 * MATMUL_N ** 3 / pred.seconds / 1e12
    hw = get_hardware("h100")
    off = tflops / MATMUL_EXPECTED_TFLOPS - 1
    lines += [
        f"- bf16 {MATMUL_N}^3 `x @ y`, compiled deviceless for H100 with XLA's Triton GEMM at one fixed tiling "
        f"(`{MATMUL_TILES}`; deviceless XLA cannot autotune, and cuBLAS leaves no PTX to read)",
        f"- **predicted ({GPU_MODEL_VERSION}) {pred.seconds * 1e3:.3f} ms = {tflops:.0f} TFLOP/s**, bound "
        f"{pred.bound}; occupancy {pred.parts.get('occupancy', 1):.0f} CTA/SM",
        f"- expected about {MATMUL_EXPECTED_TFLOPS:.0f} TFLOP/s (../shared/KERNEL-NOTES.md: a large matmul measured "
        f"about 800 on our H100 and H200); spec {hw.peak_bf16_tflops} dense ({hw.source('peak_bf16_tflops')})",
        f"- predicted / expected: {1 + off:.2f} ({'within' if abs(off) <= 0.15 else 'outside'} the 15% target)",
    ]
    return lines + [""]


def _cost_section(points: list[dict]) -> list[str]:
    ok = [p for p in points if p.get("ok") and p["kind"] != "matmul"]
    if not ok:
        return []
    worker = []
    if os.path.exists(COST):
        with open(COST) as f:
            for r in json.load(f):
                worker.append(f"{r['target']} {'fwd+bwd' if r['backward'] else 'fwd'} ({r['sass_cache']} SASS cache): "
                              f"compile {r['compile_s']:.2f} s + predict {r['predict_s']:.2f} s")
    start = time.perf_counter()
    for p in ok[:50]:
        predict_point(p)
    model_s = (time.perf_counter() - start) / min(50, len(ok))
    return ["## What predicting adds to a compile", "",
            f"- median deviceless compile of mha (this machine, cached Triton lowering warm): "
            f"{statistics.median(p['compile_s'] for p in ok):.2f} s; ptxas + cuobjdump + parsing of its SASS: "
            f"{statistics.median(p['sass_s'] for p in ok):.2f} s median (0 when the PTX hash is cached); "
            f"the model itself: {1e3 * model_s:.1f} ms per point"] + (
        ["- inside the compile worker, our kernel at batch 4, 4096 tokens, 16 heads, d128, causal (`... collect "
         "cost`): " + "; ".join(worker)] if worker else []) + [""]


def write_report(points: list[dict], path: str) -> None:
    f = FITTED
    lines = [
        "# Predicted vs measured: GPU (H100, A100)", "",
        f"Model `{GPU_MODEL_VERSION}` (`autotune/compile/model/gpu_*.py`): every time below marked predicted comes "
        "from it, from deviceless compiles on a CPU machine (jax 0.10.2, jax-cuda12 plugin, ptxas 13.0, cuobjdump "
        "13.5); every measured time is tokamax 0.0.17's (`tokamax/data/autotuning/<device>/<op>.json`, median of its "
        "5 samples). Regenerate with `python benchmarks/predicted_vs_measured_gpu.py report` (stored points: "
        "`predicted-vs-measured-gpu-points.jsonl`).", "",
        "Fitted constants (grid search on the H100 calibration table only, `... fit`): clock under load "
        f"{dict(f.clock_under_load)['h100']} GHz, wgmma full-wait {f.wait_cycles} cycles, barrier "
        f"{f.barrier_cycles} cycles, a lone warp's issue interval {f.warp_issue_cycles} cycles, per program "
        f"{f.program_cycles} cycles, launch {f.launch_seconds * 1e6:.1f} us (barrier and launch set, not fitted). "
        "A100 runs at its 1.41 GHz boost clock (nothing fitted on A100).", "",
    ]
    lines += _matmul_section(points)
    lines += _table_section(
        "(b) Calibration: H100, tokamax `pallas_triton_flash_attention` (the fitted table)",
        _rows(points, "calib", "h100"),
        "Every key JAX 0.10.2's `mha` can express (no bias, no boolean mask, q and k alike: 144 of 204), compiled "
        "with the winner's block_q, block_k, num_warps, num_stages (tokamax's kernel is not mha: same algorithm, "
        "own code). Hardware: H100 SXM 80 GB.")
    lines += _table_section(
        "(c) Held out: A100-SXM4-40GB, tokamax `pallas_triton_flash_attention`",
        _rows(points, "calib", "a100"),
        "No constant was fitted on A100. One structural rule was changed after seeing this table's residuals: an "
        "HMMA loop's tensor time and the rest of its iteration are serial in one CTA (the S product is in registers "
        "and the softmax needs it), as on Hopper where the wgmma is waited on at once; before that rule, A100 came "
        "out at median 0.62, 90th percentile 2.40x, 85% within 2x (H100 unchanged). So this table is held out for "
        "the constants, not wholly for the model's form. block_d (tokamax splits the head dimension at d256 on A100) "
        "cannot be expressed in mha and is ignored. Hardware: A100 SXM4 40 GB (1555 GB/s).")
    lines += _rank_section(points)
    lines += _cost_section(points)
    lines += [
        "## What could not be done, and why", "",
        "- Keys with a bias or a boolean mask (60 of 204 on H100, 46 of 190 on A100): JAX's `mha` has neither, and "
        "our kernel's run-time lengths are not the same work; they are left out rather than predicted for another "
        "kernel.",
        "- The H100 Mosaic GPU table (`pallas_mosaic_gpu_flash_attention.json`): not predicted. That kernel is "
        "tokamax's warp-specialized TMA kernel lowered by Mosaic GPU, not Triton: its configs (e.g. "
        "`num_compute_wgs`, TMA pipelining) have no counterpart in JAX 0.10.2's `mha`, and this model's loop "
        "analysis (one loop, cp.async, the S product waited on at once) does not describe a warp-specialized "
        "producer/consumer schedule; predicting it with mha's SASS would be predicting a different kernel.",
        "- No vjp tables: the issue keeps them held out and this model version has no backward calibration.",
        "- The matmul cannot use cuBLAS's kernel (no PTX in a deviceless compile); it is XLA's Triton GEMM at one "
        "fixed, typical Hopper tiling.",
        "",
    ]
    with open(path, "w") as out:
        out.write("\n".join(lines))
