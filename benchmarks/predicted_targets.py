"""Predicted best vs the heuristic default of our own kernels on every compile target (issue 21, item 6).

For each target (autotune.compile.targets: v4, v5e, v5p, v6e, tpu7x, h100, a100) and each problem of a fixed set
(head_dim 64 multi-head and head_dim 128 GQA 4:1; 1k / 4k / 16k / 32k tokens; causal and not; forward and
backward), compile the target's default config (`Config.default(problem, device_kind=...)`) and a few configs drawn
uniformly from the kernel's search space among those its validity checks accept for that device, through the same
compile path `autotune search --target` uses (`autotune.compile.pool.compile_many`, whose results carry the static
model's prediction). Every time here is predicted (the model version is stored with each point); none is measured.

Resumable: every compile appends one JSON line to `benchmarks/results/predicted-targets.jsonl` as it finishes, and a
rerun skips the (target, problem, config) points already there. `--render` writes `predicted-<target>.md`.

    nice -n 10 python benchmarks/predicted_targets.py --samples 3     # compile what is missing, then render
    python benchmarks/predicted_targets.py --render                   # tables from the stored points only
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import kernels  # noqa: F401,E402  (environment defaults before jax)

from autotune.compile.pool import CompileJob, CompileResult, compile_many  # noqa: E402
from autotune.compile.targets import TARGETS, get_target  # noqa: E402
from kernels import Problem  # noqa: E402
from kernels import gpu as gpu_kernel  # noqa: E402
from kernels import tpu as tpu_kernel  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
POINTS = RESULTS / "predicted-targets.jsonl"
LENGTHS = (1024, 4096, 16384, 32768)
TOKENS = 32768  # batch * sequence length of every problem, so lengths compare at equal work per token


def problems() -> list[Problem]:
    """The committed problem set: d64 multi-head (16 heads) and d128 GQA (32 query heads, 8 kv heads), causal and
    not, forward and backward, at each length (batch = 32k tokens / length)."""
    found = []
    for backward in (False, True):
        for length in LENGTHS:
            for head_dim, heads, kv_heads in ((64, 16, 16), (128, 32, 8)):
                for causal in (True, False):
                    found.append(Problem(batch=TOKENS // length, q_len=length, kv_len=length, heads=heads,
                                         kv_heads=kv_heads, head_dim=head_dim, dtype="bfloat16", causal=causal,
                                         backward=backward))
    return found


def module_of(target):
    return gpu_kernel if target.platform == "gpu" else tpu_kernel


def sample_configs(target, problem: Problem, count: int, seed: int) -> list[dict]:
    """`count` distinct configs drawn uniformly from the search space among those the checks accept for the
    target's device kind (the default excluded); for a forward problem the backward fields stay at the default."""
    module = module_of(target)
    default = module.Config.default(problem, device_kind=target.device_kind).to_dict()
    space = module.search_space(problem)
    rng = random.Random(f"{seed}:{target.name}:{json.dumps(problem.to_dict(), sort_keys=True)}")
    found: dict[str, dict] = {}
    for _ in range(2000):
        if len(found) >= count:
            break
        data = {**default, **{name: rng.choice(values) for name, values in space.items()}}
        text = json.dumps(data, sort_keys=True)
        if data == default or text in found:
            continue
        if module.invalid_reasons(module.Config.from_dict(data), problem, device_kind=target.device_kind):
            continue
        found[text] = data
    return list(found.values())


def point_key(target: str, problem: dict, config: dict) -> str:
    return json.dumps([target, problem, config], sort_keys=True)


def load_points() -> list[dict]:
    if not POINTS.exists():
        return []
    with POINTS.open() as handle:
        return [json.loads(line) for line in handle if line.strip()]


def record(result: CompileResult, role: str) -> dict:
    job = result.job
    return {"target": job.target, "problem": job.problem.to_dict(), "config": job.config, "role": role,
            "ok": result.ok, "failure": result.failure_kind, "message": result.message[:200],
            "compile_seconds": round(result.seconds, 3), "prediction": result.prediction,
            "prediction_seconds": result.prediction_seconds}


def jobs_to_run(targets: list[str], samples: int, seed: int) -> list[tuple[CompileJob, str]]:
    """(job, role) for every point not stored yet: first every (problem, target)'s default, then the first sampled
    config of each, then the second...: a run cut short leaves every problem covered with fewer samples."""
    done = {point_key(p["target"], p["problem"], p["config"]) for p in load_points()}
    rounds: list[list[tuple[CompileJob, str]]] = [[] for _ in range(samples + 1)]
    for problem in problems():
        for name in targets:
            target = get_target(name)
            default = module_of(target).Config.default(problem, device_kind=target.device_kind).to_dict()
            configs = [("default", default)] + [("sample", c) for c in sample_configs(target, problem, samples, seed)]
            for i, (role, config) in enumerate(configs):
                if point_key(name, problem.to_dict(), config) not in done:
                    rounds[i].append((CompileJob(name, problem, config), role))
    return [job for one in rounds for job in one]


def run(jobs: list[tuple[CompileJob, str]], nice: int, timeout: float) -> None:
    roles = {id(job): role for job, role in jobs}
    lock, count, start = threading.Lock(), [0], time.time()
    RESULTS.mkdir(parents=True, exist_ok=True)
    with POINTS.open("a") as out:
        def on_result(result: CompileResult) -> None:
            row = record(result, roles[id(result.job)])
            with lock:
                out.write(json.dumps(row) + "\n")
                out.flush()
                count[0] += 1
                seconds = (result.prediction or {}).get("seconds")
                shown = f"predicted {seconds * 1e3:.3f} ms" if seconds else (result.failure_kind or "no prediction")
                print(f"[{count[0]}/{len(jobs)} {time.time() - start:.0f}s] {row['target']} {_label(row['problem'])} "
                      f"{row['role']} {shown} (compile {result.seconds:.1f}s)", flush=True)

        compile_many([job for job, _ in jobs], processes=1, timeout_s=timeout, nice=nice, on_result=on_result)


def _label(problem: dict) -> str:
    heads = f"h{problem['heads']}" + (f"/{problem['kv_heads']}" if problem["kv_heads"] != problem["heads"] else "")
    return (f"b{problem['batch']} t{problem['q_len']} {heads} d{problem['head_dim']} "
            f"{'causal' if problem['causal'] else 'full'} {'bwd' if problem['backward'] else 'fwd'}")


def _blocks(config: dict, backward: bool) -> str:
    if "num_warps" in config:
        fwd = f"{config['block_q']}x{config['block_k']} w{config['num_warps']} s{config['num_stages']}"
        bwd = f"{config['bwd_block_q']}x{config['bwd_block_k']} w{config['bwd_num_warps']} s{config['bwd_num_stages']}"
    else:
        fwd = f"b{config['block_b']} {config['block_q']}x{config['block_k_major']}/{config['block_k']}"
        bwd = f"{config['bwd_block_q']}x{config['bwd_block_k_major']}/{config['bwd_block_k']}"
    return f"{fwd}; bwd {bwd}" if backward else fwd


def render(target_name: str, points: list[dict]) -> list[str]:
    target = get_target(target_name)
    mine = [p for p in points if p["target"] == target_name]
    versions = sorted({p["prediction"]["model_version"] for p in mine if p.get("prediction")})
    lines = [f"# Predicted (model {', '.join(versions) or 'none'}) best config vs the default on {target_name} "
             f"({target.device_kind})", "",
             "Written by `benchmarks/predicted_targets.py` from deviceless compiles on a CPU machine (jax 0.10.2, "
             "libtpu 0.0.42 / jax-cuda12 plugin 0.10.2), through `autotune.compile.pool.compile_many` (the compile "
             "path of `autotune search --target`). **Every time on this page is predicted by the static model "
             "(`autotune/compile/model/`), none is measured.** Per problem: the heuristic default "
             "(`Config.default(problem, device_kind=...)`) and configs drawn uniformly from the search space among "
             "those the validity checks accept for this device (seeded); 'predicted best' is the fastest predicted "
             "of all compiled (the default included), so the ratio default / best is >= 1. % roofline = the "
             "roofline time (useful flops over peak, bytes over bandwidth) over the predicted time. Lengths: "
             f"{', '.join(f'{n // 1024}k' for n in LENGTHS)} (a subset of 1k-32k); batch x length = {TOKENS} tokens.",
             "", "| problem | configs compiled | default config | default predicted ms | best config | "
             "best predicted ms | default / best | best % roofline | best bound |",
             "|---|---|---|---|---|---|---|---|---|"]
    ratios = []
    for problem in problems():
        data = problem.to_dict()
        rows = [p for p in mine if p["problem"] == data]
        if not rows:
            continue
        ok = [p for p in rows if p.get("prediction")]
        default = next((p for p in rows if p["role"] == "default"), None)
        label = _label(data)
        if not ok:
            lines.append(f"| {label} | 0 of {len(rows)} | | {', '.join(sorted({str(p['failure']) for p in rows}))} "
                         "| | | | | |")
            continue
        best = min(ok, key=lambda p: p["prediction"]["seconds"])
        pb = best["prediction"]
        if default is None or not default.get("prediction"):
            why = "not compiled yet" if default is None else f"failed: {default['failure']}"
            dcell, dms, ratio = (_blocks(default["config"], problem.backward) if default else ""), why, ""
        else:
            dp = default["prediction"]
            dcell, dms = _blocks(default["config"], problem.backward), f"{dp['seconds'] * 1e3:.3f}"
            if len(ok) > 1:  # a comparison only when a sampled config was predicted beside the default
                ratios.append(dp["seconds"] / pb["seconds"])
            ratio = f"{dp['seconds'] / pb['seconds']:.2f}" if len(ok) > 1 else "default only"
        lines.append(f"| {label} | {len(ok)} of {len(rows)} | {dcell} | {dms} | "
                     f"{_blocks(best['config'], problem.backward)} | {pb['seconds'] * 1e3:.3f} | {ratio} | "
                     f"{100 * pb['roofline_seconds'] / pb['seconds']:.0f}% | {pb['bound']} |")
    cost = [p["prediction_seconds"] for p in mine if p.get("prediction_seconds") is not None]
    compiles = [p["compile_seconds"] for p in mine if p.get("ok")]
    lines += [""]
    if ratios:
        lines.append(f"**{len(ratios)} problems with sampled configs beside the default: predicted default / "
                     f"predicted best median {statistics.median(ratios):.2f}, max {max(ratios):.2f}; the default is "
                     f"the predicted best in {sum(r <= 1.0 for r in ratios)} of them.**")
    pending = sum(1 for problem in problems() if len([p for p in mine if p["problem"] == problem.to_dict()]) < 2)
    if pending:
        lines.append(f"{pending} problems have only the default compiled so far (the sampled configs were cut to fit "
                     "the CPU budget; rerun the script to add them): their rows show its predicted time alone.")
    if cost and compiles:
        lines.append(f"Cost on this machine: compile median {statistics.median(compiles):.1f} s; reading the "
                     f"compiler's output and predicting (the worker's `prediction_seconds`) median "
                     f"{statistics.median(cost):.2f} s, max {max(cost):.2f} s, over {len(cost)} compiles.")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--samples", type=int, default=3, help="sampled configs per target and problem")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nice", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per compile")
    parser.add_argument("--render", action="store_true", help="only write the tables from the stored points")
    args = parser.parse_args()
    names = [n.strip() for n in args.targets.split(",") if n.strip()]
    if not args.render:
        jobs = jobs_to_run(names, args.samples, args.seed)
        print(f"{len(jobs)} compiles to do for {names}", flush=True)
        run(jobs, args.nice, args.timeout)
    points = load_points()
    for name in names:
        lines = render(name, points)
        (RESULTS / f"predicted-{name}.md").write_text("\n".join(lines) + "\n")
        print(f"wrote predicted-{name}.md", flush=True)


if __name__ == "__main__":
    main()
