"""Do the validity checks agree with the real compilers? A sampled sweep of each target's search space.

For every target (autotune.compile.targets), three problems (d64 and d128 bfloat16 causal at 2k; a ragged GQA d72 case
with segment ids), forward and backward: sample configs that pass the structural rules, compile each deviceless
(autotune.compile.pool, parallel processes) and set the estimate beside the real figure. The goal: the checks never
accept a config the compiler rejects, and reject (for memory) at most 10% of the configs that compile.
Writes benchmarks/results/compile-<target>.md and the raw results (compile-sweep.jsonl, for --fit and --render).

    nice python benchmarks/compile_sweep.py                      # all targets, 6 samples per problem and pass
    python benchmarks/compile_sweep.py --targets h100,v5e --samples 10
    python benchmarks/compile_sweep.py --render                  # tables again from the raw results
    python benchmarks/compile_sweep.py --fit                     # TPU temporaries coefficients from the raw results
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import subprocess
import threading
import time
from datetime import date
from pathlib import Path

import kernels  # noqa: F401  (environment defaults before jax)
import jax

from autotune.compile.pool import CompileJob, CompileResult, compile_many, estimated_bytes
from autotune.compile.targets import TARGETS, get_target
from kernels import Problem
from kernels import gpu as gpu_kernel
from kernels import tpu as tpu_kernel

RESULTS = Path(__file__).parent / "results"
PROBLEMS = {
    "d64": Problem(batch=1, q_len=2048, kv_len=2048, heads=8, kv_heads=8, head_dim=64, dtype="bfloat16", causal=True),
    "d128": Problem(batch=1, q_len=2048, kv_len=2048, heads=8, kv_heads=8, head_dim=128, dtype="bfloat16",
                    causal=True),
    "gqa-d72": Problem(batch=2, q_len=1900, kv_len=1900, heads=8, kv_heads=2, head_dim=72, dtype="bfloat16",
                       causal=True, segments=True),
}
MEMORY_WORDS = ("shared memory", "VMEM")
ROLES = {"forward": ("forward",), "backward": ("dq", "dkv")}


def module_of(target):
    return gpu_kernel if target.platform == "gpu" else tpu_kernel


def split_reasons(reasons: list[str]) -> tuple[list[str], list[str]]:
    """(memory reasons, structural reasons)."""
    memory = [r for r in reasons if any(w in r for w in MEMORY_WORDS)]
    return memory, [r for r in reasons if r not in memory]


def sample_jobs(target, name: str, problem: Problem, direction: str, count: int, rng: random.Random):
    """`count` distinct configs of one direction's fields that pass the structural rules; the other direction's
    fields stay at the default (backward compiles include the default forward)."""
    module = module_of(target)
    prob = problem.replace(backward=direction == "backward")
    base = module.Config.default(prob, device_kind=target.device_kind).to_dict()
    space = module.search_space(prob)
    fields = [f for f in space if f.startswith("bwd_") == (direction == "backward")]
    if target.platform == "tpu" and direction == "backward":
        fields.append("block_b")
    found: dict[str, dict] = {}
    for _ in range(5000):
        data = {**base, **{f: rng.choice(space[f]) for f in fields}}
        _, structural = split_reasons(module.invalid_reasons(module.Config.from_dict(data), prob,
                                                             device_kind=target.device_kind))
        if not structural:
            found.setdefault(json.dumps(data, sort_keys=True), data)
        if len(found) >= count:
            break
    return [(name, direction, CompileJob(target.name, prob, data)) for data in found.values()]


def estimates(target, job: CompileJob, direction: str) -> dict[str, int]:
    """The validity model's bytes per kernel role of this pass."""
    found = estimated_bytes(target, job.problem, job.config)
    return {role: found[role] for role in ROLES[direction]}


def record(name: str, direction: str, result: CompileResult) -> dict:
    """What the compiler said about one config (the checks' verdict is added by `judge`, at render time)."""
    job = result.job
    return {
        "target": job.target, "problem": name, "direction": direction, "config": job.config,
        "ok": result.ok, "failure": result.failure_kind, "requested": result.requested_bytes,
        "limit": result.limit_bytes, "message": result.message[:300], "seconds": round(result.seconds, 2),
        "kernels": {k.role: dataclasses.asdict(k) for k in result.kernels if k.role in ROLES[direction]},
    }


def judge(row: dict) -> dict:
    """The row with the current models' estimates and memory verdict (so tables follow model changes)."""
    target = get_target(row["target"])
    module = module_of(target)
    problem = PROBLEMS[row["problem"]].replace(backward=row["direction"] == "backward")
    memory, _ = split_reasons(module.invalid_reasons(module.Config.from_dict(row["config"]), problem,
                                                     device_kind=target.device_kind))
    job = CompileJob(target.name, problem, row["config"])
    return {**row, "estimate": estimates(target, job, row["direction"]), "accepted": not memory}


def compiler_versions() -> str:
    parts = [f"jax {jax.__version__}"]
    try:
        from importlib.metadata import version
        parts.append(f"libtpu {version('libtpu')}")
    except Exception:  # noqa: BLE001 - absent: say nothing
        pass
    try:
        from jax._src.lib import cuda_path
        ptxas = Path(cuda_path or "") / "bin" / "ptxas"
        out = subprocess.run([str(ptxas) if ptxas.exists() else "ptxas", "--version"], capture_output=True,
                             text=True, timeout=30).stdout
        parts.append("ptxas " + out.strip().splitlines()[-1].split()[-1])
    except Exception:  # noqa: BLE001
        pass
    return ", ".join(parts)


def _kib(n) -> str:
    return "" if n is None else f"{n / 1024:.0f}K" if n < 10 << 20 else f"{n / (1 << 20):.1f}M"


def verdict(row: dict) -> str:
    compiled = row["ok"]
    resources = row["failure"] == "resources_exhausted"
    if row["accepted"] and resources:
        return "**ACCEPTED, COMPILER REJECTS**"
    if not row["accepted"] and compiled:
        return "rejected, compiles"
    if row["accepted"] and compiled:
        return "ok"
    if not row["accepted"] and resources:
        return "rejected (agrees)"
    return f"compile {row['failure']}"


def summary(rows: list[dict]) -> dict:
    compiled = [r for r in rows if r["ok"]]
    false_accepts = [r for r in rows if r["accepted"] and r["failure"] == "resources_exhausted"]
    false_rejects = [r for r in compiled if not r["accepted"]]
    other = [r for r in rows if not r["ok"] and r["failure"] != "resources_exhausted"]
    spilling = [r for r in compiled if any((k.get("spill_store_bytes") or 0) > 0 for k in r["kernels"].values())]
    rate = len(false_rejects) / len(compiled) if compiled else 0.0
    return {"configs": len(rows), "compiled": len(compiled), "false_accepts": len(false_accepts),
            "false_rejects": len(false_rejects), "false_reject_rate": rate, "other_failures": len(other),
            "spilling": len(spilling), "met": not false_accepts and rate <= 0.10,
            "median_seconds": sorted(r["seconds"] for r in rows)[len(rows) // 2] if rows else 0.0}


def render(target_name: str, rows: list[dict], versions: str) -> str:
    target = get_target(target_name)
    s = summary(rows)
    lines = [
        f"# Compile sweep: {target.name} ({target.description})", "",
        f"Device kind `{target.device_kind}`; limit {_kib(target.memory_limit_bytes)} "
        f"({'shared memory per block' if target.platform == 'gpu' else 'VMEM a kernel may use'}). "
        f"Deviceless compiles on a CPU machine, {date.today().isoformat()}; {versions}.",
        "Made by `benchmarks/compile_sweep.py` (configs sampled from the search space after the structural rules).",
        "",
        f"**Goal {'met' if s['met'] else 'NOT met'}**: {s['configs']} configs, {s['compiled']} compiled; "
        f"accepted but rejected by the compiler: {s['false_accepts']}; rejected by the checks but compiled: "
        f"{s['false_rejects']} ({100 * s['false_reject_rate']:.1f}% of those that compiled; goal <= 10%); "
        f"other compile failures: {s['other_failures']}; compiled configs that spill registers: {s['spilling']}; "
        f"median compile {s['median_seconds']:.1f} s.", "",
        "Bytes: estimate / real per kernel (real from the compiler's dump, or the request it refused). "
        "GPU kernels also show registers per thread and spill stores in bytes.", "",
    ]
    if target.platform == "tpu":
        lines += [
            "TPU 'real' is the kernel's `used_scoped_memory_configs` in the XLA dump. It measures need on v4 (always "
            "at least the double-buffered blocks and scratch); on v5e and v6e it is often below the blocks alone, "
            "and on v5p and TPU7x it grows with the scoped limit the kernel sets, so there only a refusal measures "
            "need. The estimate is meant as an upper bound of the need.", "",
        ]
    lines += [
        "| problem | pass | config | estimate / real | regs, spills | s | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["problem"], r["direction"], json.dumps(r["config"], sort_keys=True))):
        fields = [f for f in r["config"] if f.startswith("bwd_") == (r["direction"] == "backward")]
        if target.platform == "tpu" and r["direction"] == "backward":
            fields = ["block_b"] + fields
        config = " ".join(f"{r['config'][f]}" for f in fields)
        parts, regs = [], []
        for role, est in r["estimate"].items():
            k = r["kernels"].get(role)
            real = k["memory_bytes"] if k else None
            parts.append(f"{role} {_kib(est)}/{_kib(real) if real is not None else '-'}")
            if k and k.get("registers") is not None:
                regs.append(f"{k['registers']}, {k['spill_store_bytes']}")
        if not r["ok"] and r["requested"]:
            parts.append(f"refused {_kib(r['requested'])} of {_kib(r['limit'])}")
        lines.append(f"| {r['problem']} | {r['direction'][:3]} | {config} | {'; '.join(parts)} | "
                     f"{'; '.join(regs)} | {r['seconds']:.1f} | {verdict(r)} |")
    lines += ["", "Config columns: forward `block_q block_k num_warps num_stages` (GPU) or `block_b block_q "
              "block_k_major block_k` (TPU); backward the `bwd_` fields (TPU: `block_b` first)."]
    return "\n".join(lines) + "\n"


def fit(rows: list[dict]) -> None:
    """Print TPU temporaries coefficients fitted as upper bounds to the raw results (needs scipy)."""
    import numpy as np
    from scipy.optimize import linprog

    import kernels.tpu.config as tpu_config
    saved, margin = tpu_config.TEMPORARIES, tpu_config.MARGIN
    tpu_config.TEMPORARIES = {g: ((0.0,) * 6,) * 3 for g in saved}
    tpu_config.MARGIN = 1.0
    points: dict = {}
    try:
        for r in rows:
            target = get_target(r["target"])
            if target.platform != "tpu" or not r["ok"]:
                continue
            problem = PROBLEMS[r["problem"]].replace(backward=r["direction"] == "backward")
            c = tpu_config.Config.from_dict(r["config"])
            base = estimates(target, CompileJob(target.name, problem, r["config"]), r["direction"])
            gen = tpu_config.tpu_generation(target.device_kind)
            shapes = {"forward": (0, c.block_q, c.block_k, c.block_k_major),
                      "dq": (1, c.bwd_block_q, c.bwd_block_k, c.bwd_block_k_major),
                      "dkv": (2, c.bwd_block_k, c.bwd_block_q, c.bwd_block_k_major)}
            for role, (kernel, rows_, cols, major) in shapes.items():
                if role in r["kernels"]:
                    minor = c.block_k if kernel == 0 else c.bwd_block_k
                    sizes = tpu_config.temporary_sizes(problem, c.block_b, rows_, cols, major, major // minor)
                    points.setdefault((gen, kernel), []).append((r["kernels"][role]["memory_bytes"] - base[role],
                                                                  sizes))
    finally:
        tpu_config.TEMPORARIES, tpu_config.MARGIN = saved, margin
    table: dict = {}
    for (gen, kernel), pts in sorted(points.items()):
        y = np.array([p[0] for p in pts], float)
        x = np.array([p[1] for p in pts], float)
        res = linprog(x.sum(0), A_ub=-x, b_ub=-y, bounds=[(0, None)] * x.shape[1], method="highs")
        table.setdefault(gen, [None, None, None])[kernel] = tuple(round(v + 0.05, 2) for v in res.x)
        print(gen, kernel, len(pts), table[gen][kernel], f"max over {((x @ res.x) - y).max() / 2**20:.2f} MiB")
    print(json.dumps(table))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--samples", type=int, default=6, help="configs per target, problem and pass")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--nice", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per compile")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--raw", type=Path, default=RESULTS / "compile-sweep.jsonl")
    parser.add_argument("--render", action="store_true", help="only re-render the tables from --raw")
    parser.add_argument("--fit", action="store_true", help="only fit the TPU temporaries from --raw")
    args = parser.parse_args()
    names = [n.strip() for n in args.targets.split(",") if n.strip()]
    for name in names:
        get_target(name)
    if args.render or args.fit:
        rows = [json.loads(line) for line in args.raw.read_text().splitlines() if line.strip()]
        if args.fit:
            fit(rows)
            return
    else:
        rng = random.Random(args.seed)
        planned = [item for name in names for pname, problem in PROBLEMS.items()
                   for direction in ("forward", "backward")
                   for item in sample_jobs(get_target(name), pname, problem, direction, args.samples, rng)]
        print(f"{len(planned)} compiles for {names}", flush=True)
        labels = {id(job): (pname, direction) for pname, direction, job in planned}
        lock, done, start = threading.Lock(), [0], time.time()
        previous = [json.loads(line) for line in args.raw.read_text().splitlines()] if args.raw.exists() else []
        rows = [r for r in previous if r["target"] not in names]
        args.raw.parent.mkdir(parents=True, exist_ok=True)
        with args.raw.open("w") as out:
            for r in rows:
                out.write(json.dumps(r) + "\n")

            def on_result(result: CompileResult) -> None:
                row = record(*labels[id(result.job)], result)
                with lock:
                    rows.append(row)
                    out.write(json.dumps(row) + "\n")
                    out.flush()
                    done[0] += 1
                    print(f"[{done[0]}/{len(planned)} {time.time() - start:.0f}s] {row['target']} {row['problem']} "
                          f"{row['direction']} {verdict(judge(row))}", flush=True)

            compile_many([job for _, _, job in planned], processes=args.processes, timeout_s=args.timeout,
                         nice=args.nice, on_result=on_result)
    versions = compiler_versions()
    for name in names:
        mine = [judge(r) for r in rows if r["target"] == name]
        if mine:
            (RESULTS / f"compile-{name}.md").write_text(render(name, mine, versions))
            s = summary(mine)
            print(f"{name}: {s}")


if __name__ == "__main__":
    main()
