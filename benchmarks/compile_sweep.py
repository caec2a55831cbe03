"""Do the memory checks agree with the real compilers near each target's limits? A sweep that records what they say.

For every target (autotune.compile.targets), float32 and bfloat16, forward and backward: problems with head_dim 64, 128
and 256, plain or with every feature (sliding window, soft cap, padding lengths, segment ids, GQA); configs sampled
from the search space whose estimate lies near a limit the compiler enforces (GPU: shared memory per block; TPU:
the default scoped VMEM and the chip's capacity). Each compiles deviceless (autotune.compile.pool, one process by
default: the machine is shared) and the raw result goes to compile-sweep.jsonl; `--defaults` compiles the default
config of a grid of problems on every target instead (compile-defaults.jsonl). The tables
(benchmarks/compile_tables.py) set estimates beside the compiler's figures and count false accepts and rejects.

    nice python benchmarks/compile_sweep.py --targets h100,a100 --samples 14   # near-limit configs, append
    python benchmarks/compile_sweep.py --targets v4 --holdout --label holdout    # problems no fit has seen
    python benchmarks/compile_sweep.py --defaults                              # the default-config grid
    python benchmarks/compile_sweep.py --render                                # tables from the raw results
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import kernels  # noqa: F401  (environment defaults before jax)

from autotune.compile.pool import CompileJob, CompileResult, compile_many
from autotune.compile.targets import TARGETS, get_target
from benchmarks.compile_tables import (RESULTS, default_grid, estimate_ratio, module_of, record, render_all,
                                       split_reasons, verdict, judge)
from kernels import Problem

DTYPES = ("bfloat16", "float32")
HEAD_DIMS = (64, 128, 256)


def problem_for(target, dtype: str, head_dim: int, variant: str, direction: str) -> Problem:
    """A problem long enough for the largest blocks: plain causal, or every feature at once."""
    seq = 2048 if target.platform == "tpu" else 1024
    base = Problem(batch=4, q_len=seq, kv_len=seq, heads=4, kv_heads=4, head_dim=head_dim, dtype=dtype,
                   causal=True, backward=direction == "backward")
    if variant == "plain":
        return base
    return base.replace(kv_heads=2, segments=True, lengths=True, softcap=30.0, window_left=seq - 200,
                        window_right=None)


HOLDOUT_HEAD_DIMS = (80, 96, 192)
HOLDOUT_VARIANTS = ("window", "segments", "softcap+lengths", "gqa")


def holdout_problem(target, dtype: str, head_dim: int, variant: str, direction: str, seq: int) -> Problem:
    """A problem the fits never saw, to validate them out of sample: other head dims and lengths, one feature
    at a time (the sweep's problems are plain, or every feature at once)."""
    base = Problem(batch=4, q_len=seq, kv_len=seq, heads=4, kv_heads=4, head_dim=head_dim, dtype=dtype,
                   causal=variant != "window", backward=direction == "backward")
    return {"window": base.replace(window_left=seq // 3, window_right=64), "segments": base.replace(segments=True),
            "softcap+lengths": base.replace(softcap=20.0, lengths=True), "gqa": base.replace(kv_heads=1)}[variant]


def bands(target, reach: float = 1.0) -> list[tuple[int, float, float]]:
    """(limit, low, high): estimate / limit ratios worth compiling. GPUs: their one limit. TPUs: the default
    scoped limit (a config estimated under it compiles with the compiler's default) and the capacity. `reach`
    stretches the upper bounds, to find configs a model over-estimates (what a refit needs)."""
    if target.platform == "gpu":
        return [(target.memory_limit_bytes, 0.8, 1.3 * reach)]
    from kernels.tpu.config import default_scoped_vmem

    default = default_scoped_vmem(target.device_kind)
    found = [(default, 0.6, 1.2 * reach)]
    if target.memory_limit_bytes > default:
        found.append((target.memory_limit_bytes, 0.6, 1.6 * reach))
    return found


def sample_jobs(target, dtype: str, direction: str, count: int, rng: random.Random,
                reach: float = 1.0, holdout: bool = False) -> list[CompileJob]:
    """`count` distinct configs of one direction's fields that pass the structural rules and whose estimate lies
    in one of the target's bands (cycling through them); the other direction's fields stay at the default.
    `holdout`: problems from `holdout_problem` instead of `problem_for`."""
    module = module_of(target)
    wanted = bands(target, reach)
    found: dict[str, CompileJob] = {}
    for attempt in range(40000):
        if len(found) >= count:
            break
        limit, low, high = wanted[attempt % len(wanted)]
        if holdout:
            prob = holdout_problem(target, dtype, rng.choice(HOLDOUT_HEAD_DIMS), rng.choice(HOLDOUT_VARIANTS),
                                   direction, rng.choice((1536, 3072)))
        else:
            prob = problem_for(target, dtype, rng.choice(HEAD_DIMS), rng.choice(("plain", "features")), direction)
        base = module.Config.default(prob, device_kind=target.device_kind).to_dict()
        space = module.search_space(prob)
        fields = [f for f in space if f.startswith("bwd_") == (direction == "backward")]
        if target.platform == "tpu" and direction == "backward":
            fields.append("block_b")
        data = {**base, **{f: rng.choice(space[f]) for f in fields}}
        _, structural = split_reasons(module.invalid_reasons(module.Config.from_dict(data), prob,
                                                             device_kind=target.device_kind))
        if structural or not low <= estimate_ratio(target, prob, data, limit) <= high:
            continue
        job = CompileJob(target.name, prob, data)
        found.setdefault(json.dumps([prob.to_dict(), data], sort_keys=True), job)
    return list(found.values())


def run(jobs: list[CompileJob], raw: Path, processes: int, nice: int, timeout: float, label: str) -> None:
    """Compile `jobs`, appending one JSON line per result to `raw` as it comes."""
    lock, done, start = threading.Lock(), [0], time.time()
    raw.parent.mkdir(parents=True, exist_ok=True)
    with raw.open("a") as out:
        def on_result(result: CompileResult) -> None:
            row = record(result, label)
            with lock:
                out.write(json.dumps(row) + "\n")
                out.flush()
                done[0] += 1
                print(f"[{done[0]}/{len(jobs)} {time.time() - start:.0f}s] {row['target']} "
                      f"{row['problem']['dtype']} d{row['problem']['head_dim']} {row['direction']} "
                      f"{verdict(judge(row))} {row['seconds']:.1f}s", flush=True)

        compile_many(jobs, processes=processes, timeout_s=timeout, nice=nice, on_result=on_result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--samples", type=int, default=12, help="configs per target, dtype and pass")
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--nice", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=150.0, help="seconds per compile")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reach", type=float, default=1.0, help="stretch the bands' upper bounds (refits)")
    parser.add_argument("--label", default="near-limit", help="label of the rows appended")
    parser.add_argument("--holdout", action="store_true", help="problems the fits never saw (holdout_problem)")
    parser.add_argument("--defaults", action="store_true", help="compile the default-config grid instead")
    parser.add_argument("--render", action="store_true", help="only re-render the tables from the raw results")
    args = parser.parse_args()
    names = [n.strip() for n in args.targets.split(",") if n.strip()]
    targets = [get_target(name) for name in names]
    if not args.render:
        if args.defaults:
            jobs = [CompileJob(t.name, p, module_of(t).Config.default(p, device_kind=t.device_kind).to_dict())
                    for t in targets for p in default_grid()]
            print(f"{len(jobs)} default-config compiles for {names}", flush=True)
            run(jobs, RESULTS / "compile-defaults.jsonl", args.processes, args.nice, args.timeout, "default")
        else:
            rng = random.Random(args.seed)
            jobs = [job for t in targets for dtype in DTYPES for direction in ("forward", "backward")
                    for job in sample_jobs(t, dtype, direction, args.samples, rng, args.reach, args.holdout)]
            print(f"{len(jobs)} near-limit compiles for {names}", flush=True)
            run(jobs, RESULTS / "compile-sweep.jsonl", args.processes, args.nice, args.timeout, args.label)
    for line in render_all(names):
        print(line)


if __name__ == "__main__":
    main()
