"""Raw compile results against the memory checks: verdicts, the near-limit false-reject rate, per-target tables.

A row is one deviceless compile (benchmarks/compile_sweep.py). Its verdict is judged at render time by the current
models, so the tables follow model changes without compiling again. "Near the limit": the estimate or the
compiler's own figure within 15% of a limit the compiler enforces (GPU shared memory per block; TPU capacity, and
the default scoped VMEM under which a config compiles with the compiler's default limit).
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
from collections import Counter
from datetime import date
from pathlib import Path

import jax

from autotune.compile.pool import CompileJob, CompileResult, estimated_bytes
from autotune.compile.targets import get_target
from db.figures import RESOURCE_EXHAUSTED, canonical_failure_kind
from kernels import Problem
from kernels import gpu as gpu_kernel
from kernels import tpu as tpu_kernel

RESULTS = Path(__file__).parent / "results"
MEMORY_WORDS = ("shared memory", "VMEM")
ROLES = {"forward": ("forward",), "backward": ("dq", "dkv")}
NEAR = 0.15


def module_of(target):
    return gpu_kernel if target.platform == "gpu" else tpu_kernel


def default_grid() -> list[Problem]:
    """Problems whose default config must compile on every target: head_dim 64/128/256, bfloat16 and float32,
    plain or with every feature; backward (a gradient compile has the forward kernel, with its lse, too)."""
    found = []
    for dtype in ("bfloat16", "float32"):
        for head_dim in (64, 128, 256):
            plain = Problem(batch=2, q_len=1024, kv_len=1024, heads=4, kv_heads=4, head_dim=head_dim, dtype=dtype,
                            causal=True, backward=True)
            found += [plain, plain.replace(kv_heads=2, segments=True, lengths=True, softcap=30.0, window_left=700)]
    return found


def split_reasons(reasons: list[str]) -> tuple[list[str], list[str]]:
    """(memory reasons, structural reasons)."""
    memory = [r for r in reasons if any(w in r for w in MEMORY_WORDS)]
    return memory, [r for r in reasons if r not in memory]


def limits(target) -> tuple[int, ...]:
    """The limits the compiler enforces on a target's kernels."""
    if target.platform == "gpu":
        return (target.memory_limit_bytes,)
    from kernels.tpu.config import default_scoped_vmem

    return tuple(sorted({default_scoped_vmem(target.device_kind), target.memory_limit_bytes}))


def estimate_ratio(target, problem: Problem, config: dict, limit: int) -> float:
    """The largest estimate of the problem's pass, over `limit`."""
    found = estimated_bytes(target, problem, config)
    roles = ROLES["backward" if problem.backward else "forward"]
    return max(found[r] for r in roles) / limit


# TPU rows recorded before this date are of kernels that read a [b, h, s, d] copy of q, k, v (kernels.tpu.layout
# came then): their VMEM figures are not the current kernels', so they stay in the raw file but out of the TPU
# tables and the models' fits.
TPU_CURRENT_SINCE = "2026-12-06"


def current(row: dict) -> bool:
    """Whether a recorded row is of the current kernels (every GPU row; TPU rows dated since the layout change)."""
    return get_target(row["target"]).platform != "tpu" or row.get("date", "") >= TPU_CURRENT_SINCE


def record(result: CompileResult, label: str) -> dict:
    """What the compiler said about one config (the checks' verdict is added by `judge`, at render time)."""
    job = result.job
    return {
        "target": job.target, "label": label, "problem": job.problem.to_dict(),
        "direction": "backward" if job.problem.backward else "forward", "config": job.config,
        "ok": result.ok, "failure": result.failure_kind, "requested": result.requested_bytes,
        "limit": result.limit_bytes, "message": result.message[:300], "seconds": round(result.seconds, 2),
        "kernels": {k.role: dataclasses.asdict(k) for k in result.kernels}, "date": date.today().isoformat(),
    }


def judge(row: dict) -> dict:
    """The row with the current models' estimates, memory verdict and nearness to a limit."""
    target = get_target(row["target"])
    module = module_of(target)
    problem = Problem.from_dict(row["problem"])
    memory, _ = split_reasons(module.invalid_reasons(module.Config.from_dict(row["config"]), problem,
                                                     device_kind=target.device_kind))
    estimate = {r: v for r, v in estimated_bytes(target, problem, row["config"]).items()
                if r in ROLES[row["direction"]]}
    real = [row["kernels"][r]["memory_bytes"] for r in ROLES[row["direction"]] if r in row["kernels"]]
    figures = list(estimate.values()) + real + ([row["requested"]] if row["requested"] else [])
    near = any(abs(f / lim - 1) <= NEAR for f in figures for lim in limits(target))
    return {**row, "estimate": estimate, "accepted": not memory, "near": near, "reasons": memory}


def verdict(row: dict) -> str:
    compiled, resources = row["ok"], row["failure"] == RESOURCE_EXHAUSTED
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
    """Counts of a target's judged rows: false accepts anywhere; false rejects among compiled near-limit rows."""
    compiled = [r for r in rows if r["ok"]]
    near = [r for r in compiled if r["near"]]
    false_accepts = [r for r in rows if r["accepted"] and r["failure"] == RESOURCE_EXHAUSTED]
    near_rejects = [r for r in near if not r["accepted"]]
    rate = len(near_rejects) / len(near) if near else 0.0
    return {"configs": len(rows), "compiled": len(compiled), "near_compiled": len(near),
            "false_accepts": len(false_accepts), "near_false_rejects": len(near_rejects),
            "near_false_reject_rate": rate, "false_rejects": sum(not r["accepted"] for r in compiled),
            "refused": sum(r["failure"] == RESOURCE_EXHAUSTED for r in rows),
            "other_failures": sum(not r["ok"] and r["failure"] != RESOURCE_EXHAUSTED for r in rows),
            "met": not false_accepts and rate <= 0.10,
            "median_seconds": sorted(r["seconds"] for r in rows)[len(rows) // 2] if rows else 0.0}


def compiler_versions() -> str:
    from importlib.metadata import version

    parts = [f"jax {jax.__version__}", f"libtpu {version('libtpu')}"]
    try:
        out = subprocess.run(["ptxas", "--version"], capture_output=True, text=True, timeout=30).stdout
        parts.append("ptxas " + out.strip().splitlines()[-1].split()[-1])
    except (OSError, IndexError, subprocess.SubprocessError):
        pass
    return ", ".join(parts)


def _size(n) -> str:
    return "-" if n is None else f"{n / 1024:.0f}K" if n < 10 << 20 else f"{n / (1 << 20):.1f}M"


def _problem_label(p: dict) -> str:
    features = [name for name, on in (("gqa", p["kv_heads"] != p["heads"]), ("seg", p["segments"]),
                                      ("len", p["lengths"]), ("cap", p["softcap"]), ("win", p["window_left"]))
                if on]
    dtype = {"bfloat16": "bf16", "float32": "f32", "float16": "f16"}[p["dtype"]]
    return f"{dtype} d{p['head_dim']} {p['q_len']}" + (f" {'+'.join(features)}" if features else "")


def _row(r: dict, target) -> str:
    fields = [f for f in r["config"] if f.startswith("bwd_") == (r["direction"] == "backward")]
    if target.platform == "tpu" and r["direction"] == "backward":
        fields = ["block_b"] + fields
    config = " ".join(str(r["config"][f]) for f in fields)
    parts, regs = [], []
    for role, est in r["estimate"].items():
        k = r["kernels"].get(role)
        parts.append(f"{role} {_size(est)}/{_size(k['memory_bytes'] if k else None)}")
        if k and k.get("registers") is not None:
            regs.append(f"{k['registers']}, {k['spill_store_bytes']}")
    if not r["ok"] and r["requested"]:
        parts.append(f"refused {_size(r['requested'])} of {_size(r['limit'])}")
    return (f"| {_problem_label(r['problem'])} | {r['direction'][:3]} | {config} | {'; '.join(parts)} | "
            f"{'; '.join(regs)} | {r['seconds']:.1f} | {'near' if r['near'] else ''} | {verdict(r)} |")


def render(target_name: str, rows: list[dict], defaults: list[dict], versions: str) -> str:
    target = get_target(target_name)
    s = summary(rows)
    bad_defaults = [d for d in defaults if not d["ok"]]
    lines = [
        f"# Compile sweep: {target.name} ({target.description})", "",
        f"Device kind `{target.device_kind}`; limits {', '.join(_size(x) for x in limits(target))} "
        f"({'shared memory per block' if target.platform == 'gpu' else 'default scoped VMEM, capacity'}). "
        f"Deviceless compiles on a CPU machine, {date.today().isoformat()}; {versions}. Made by "
        "`benchmarks/compile_sweep.py` (near-limit configs of problems with head_dim 64/128/256, float32 and "
        "bfloat16, plain or with window, soft cap, lengths, segments and GQA; verdicts by the current models).", "",
        f"**Goal {'met' if s['met'] else 'NOT met'}**: {s['configs']} configs, {s['compiled']} compiled, "
        f"{s['refused']} refused for memory. Accepted by the checks but refused by the compiler: "
        f"**{s['false_accepts']}**. Near the limit (estimate or compiler figure within {NEAR:.0%}): "
        f"{s['near_compiled']} compiled, of which the checks reject {s['near_false_rejects']} "
        f"(**{100 * s['near_false_reject_rate']:.1f}%** false rejects; goal <= 10%); rejected but compiled "
        f"anywhere: {s['false_rejects']}. Other compile failures: {s['other_failures']}. Median compile "
        f"{s['median_seconds']:.1f} s.", "",
        "Rows per run: " + ", ".join(f"{label} {count}" for label, count in sorted(Counter(r["label"] for r in rows)
                                                                                   .items()))
        + (f" (recorded since {TPU_CURRENT_SINCE}, when the kernels came to read the caller's layout in place; "
           "the earlier TPU rows stay in compile-sweep.jsonl, out of this table and the fits: their VMEM figures "
           "are of kernels that read a transposed copy; `compile other`: a config the kernel itself refuses)."
           if target.platform == "tpu" else " (`resweep`: the current kernels, 2026-12-05; the others: earlier "
           "kernels)."), "",
        f"Default config of {len(defaults)} problems (head_dim 64/128/256, bf16/f32, plain or every feature; "
        f"gradient compiles, forward kernel included): {len(defaults) - len(bad_defaults)} compile"
        + (": " + "; ".join(f"{_problem_label(d['problem'])} {d['failure']}" for d in bad_defaults)
           if bad_defaults else "") + ".", "",
        "Bytes: estimate / compiler's figure per kernel (or the request it refused).",
        "GPU kernels also show registers per thread and spill stores in bytes.", "",
    ]
    if target.platform == "tpu":
        lines += ["TPU figures: `used_scoped_memory_configs` of each kernel in the XLA dump, the use within its "
                  "scoped region (not the region's offset). On v5p and TPU7x the figure follows the limit a "
                  "kernel sets, so there only a refusal measures need.", ""]
    lines += ["| problem | pass | config | estimate / real | regs, spills | s | near | verdict |",
              "|---|---|---|---|---|---|---|---|"]
    ordered = sorted(rows, key=lambda r: (r["direction"], r["problem"]["dtype"], r["problem"]["head_dim"],
                                          json.dumps(r["config"], sort_keys=True)))
    lines += [_row(r, target) for r in ordered]
    lines += ["", "Config columns: forward `block_q block_k num_warps num_stages` (GPU) or `block_b block_q "
              "block_k_major block_k` (TPU); backward the `bwd_` fields (TPU: `block_b` first)."]
    return "\n".join(lines) + "\n"


def load(path: Path) -> list[dict]:
    """The raw rows of a results file, failure kinds in today's spelling."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return [{**row, "failure": canonical_failure_kind(row["failure"])} for row in rows]


def render_all(names: list[str]) -> list[str]:
    """Write compile-<target>.md for each named target from the raw results; one summary line per target."""
    raw = [r for r in load(RESULTS / "compile-sweep.jsonl") if r["target"] in names]
    rows = [judge(r) for r in raw if current(r)]
    defaults = [r for r in load(RESULTS / "compile-defaults.jsonl") if r["target"] in names and current(r)]
    versions = compiler_versions()
    out = []
    for name in names:
        mine = [r for r in rows if r["target"] == name]
        if mine:
            (RESULTS / f"compile-{name}.md").write_text(
                render(name, mine, [d for d in defaults if d["target"] == name], versions))
            out.append(f"{name}: {summary(mine)}")
    return out
