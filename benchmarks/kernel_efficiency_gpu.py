"""The GPU kernels' main loops as the compilers build them (deviceless H100 / A100 compiles, no hardware).

For each problem of `PROBLEMS` (plain, causal, sliding window; head_dim 64 and 128; forward + gradients, so one
compile holds the forward, dq and dk/dv kernels) and each target this compiles `flash_attention` with one config,
runs ptxas on each of our kernels' PTX and disassembles it, and records per loop (the backward branches: split
loops show as several) the instruction counts by opcode class, the tensor-core instructions with their shapes,
registers, spills, ptxas's C7515 warnings, and the GPU model's predicted time of the whole call
(`predict_gpu_compile`, labelled with its model version: a prediction, not a timing).

    python benchmarks/kernel_efficiency_gpu.py --root /tmp/before-tree --out before.json   # the code before
    python benchmarks/kernel_efficiency_gpu.py --configs-from before.json --out after.json
    python benchmarks/kernel_efficiency_gpu.py --table before.json after.json               # markdown
    python benchmarks/kernel_efficiency_gpu.py --root /tmp/before-tree --sweep --out sweep.json  # tiles x warps

`--root` imports `kernels` and `autotune` (the model as of that tree) from another checkout; the SASS is always
read with this tree's parser. Compiles run one at a time in this process (keep it `nice`d on a shared machine).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {"JAX_PLATFORMS": "cpu", "JAX_SKIP_CUDA_CONSTRAINTS_CHECK": "1"}
BASE = dict(batch=4, q_len=2048, kv_len=2048, heads=16, kv_heads=16, dtype="bfloat16", backward=True)
# (name, head_dim, extra Problem fields)
SHAPES = [
    (f"{kind}-d{d}", d, fields)
    for d in (64, 128)
    for kind, fields in (("plain", {}), ("causal", {"causal": True}),
                         ("window", {"causal": True, "window_left": 511}))
]
ARCH = {"h100": "sm_90a", "a100": "sm_80"}
# A backward with 8 warps (two warpgroups) at 64-row tiles: the duplicated work of issue 22 part 3 (before), and
# what the space offers instead (after: 128-row tiles, each warpgroup owns 64 rows)
EIGHT_WARPS = {"bwd_block_q": 64, "bwd_block_k": 64, "bwd_num_warps": 8, "bwd_num_stages": 2}
EIGHT_WARPS_128 = {"bwd_block_q": 128, "bwd_block_k": 128, "bwd_num_warps": 8, "bwd_num_stages": 2}
# Tiles and warps against duplicated work (`--sweep`, plain-d64 on both targets): (name, config changes)
SWEEP = [
    ("fwd 64x64 w8", {"block_q": 64, "block_k": 64, "num_warps": 8}),
    ("fwd 32x64 w8", {"block_q": 32, "block_k": 64, "num_warps": 8}),
    ("fwd 128x64 w8", {"block_q": 128, "block_k": 64, "num_warps": 8}),
    ("bwd 32x32 w8", {"bwd_block_q": 32, "bwd_block_k": 32, "bwd_num_warps": 8}),
    ("bwd 64x64 w8", {"bwd_block_q": 64, "bwd_block_k": 64, "bwd_num_warps": 8}),
    ("bwd 64x128 w8", {"bwd_block_q": 64, "bwd_block_k": 128, "bwd_num_warps": 8}),
    ("bwd 128x64 w8", {"bwd_block_q": 128, "bwd_block_k": 64, "bwd_num_warps": 8}),
    ("bwd 128x128 w8", {"bwd_block_q": 128, "bwd_block_k": 128, "bwd_num_warps": 8}),
    ("bwd 16x16 w4", {"bwd_block_q": 16, "bwd_block_k": 16, "bwd_num_warps": 4}),
    ("bwd 16x64 w4", {"bwd_block_q": 16, "bwd_block_k": 64, "bwd_num_warps": 4}),
    ("bwd 64x16 w4", {"bwd_block_q": 64, "bwd_block_k": 16, "bwd_num_warps": 4}),
    ("bwd 32x32 w4", {"bwd_block_q": 32, "bwd_block_k": 32, "bwd_num_warps": 4}),
]
# the opcodes reported apart (the rest by class)
OPCODES = ("FFMA", "FMUL", "FADD", "FMNMX", "MUFU", "FSEL", "ISETP", "FSETP")


def _sass_module():
    """This tree's SASS parser, whatever tree `kernels` and `autotune` are imported from."""
    spec = importlib.util.spec_from_file_location("_gpu_sass_here", ROOT / "autotune/compile/model/gpu_sass.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _opcode_counts(sass_text: str, function: str, start: int, end: int) -> dict[str, int]:
    """Instructions per opcode (without modifiers) between two addresses of one function's listing."""
    head = re.search(rf"Function : {re.escape(function)}\b", sass_text)
    body = sass_text[head.end():]
    following = re.search(r"Function : ", body)
    body = body[: following.start()] if following else body
    counts: dict[str, int] = {}
    for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)", body):
        if start <= int(m[1], 16) <= end:
            counts[m[2]] = counts.get(m[2], 0) + 1
    return counts


def _skippable(sass_text: str, function: str, start: int, end: int) -> int:
    """Instructions of a loop body that a predicated forward branch inside it can jump over (the edge mask that
    plain blocks skip when one loop runs them all): the loop's count less this is what a plain block runs."""
    head = re.search(rf"Function : {re.escape(function)}\b", sass_text)
    body = sass_text[head.end():]
    following = re.search(r"Function : ", body)
    body = body[: following.start()] if following else body
    lines = [(int(m[1], 16), bool(m[2]), m[3], m[4]) for m in
             re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)[.\w]*\s*([^;]*);", body)]
    skipped: set[int] = set()
    for addr, predicated, op, args in lines:
        target = re.search(r"0x([0-9a-f]+)", args) if op == "BRA" and predicated else None  # BRA [P1,] 0x..
        if target and start <= addr < int(target[1], 16) <= end:
            skipped.update(a for a, *_ in lines if addr < a < int(target[1], 16))
    return len(skipped)


def read_kernels(dump: str, arch: str, sass) -> list[dict]:
    """Our kernels in an XLA dump: launch figures, ptxas report and warnings, and per loop the SASS counts."""
    entries: dict[str, str] = {}
    for path in sorted(Path(dump).glob("*.ptx")):
        text = path.read_text()
        for name in re.findall(r"\.entry\s+([\w.$]+)\s*\(", text):
            entries.setdefault(name, text)
    found = []
    for name, grid, threads, smem in sass.launches(dump):
        if not name.startswith("flash_attention") or name not in entries:
            continue
        with tempfile.TemporaryDirectory() as folder:
            source, cubin = os.path.join(folder, "k.ptx"), os.path.join(folder, "k.cubin")
            Path(source).write_text(entries[name])
            report = subprocess.run([sass.tool_path("ptxas"), f"-arch={arch}", "-O3", "-v", source, "-o", cubin],
                                    capture_output=True, text=True, check=True)
            env = {**os.environ, "PATH": os.path.dirname(sass.tool_path("nvdisasm")) + os.pathsep + os.environ["PATH"]}
            text = subprocess.run([sass.tool_path("cuobjdump"), "-sass", cubin], capture_output=True, text=True,
                                  check=True, env=env).stdout
        log = report.stdout + report.stderr
        regs = re.search(r"Used (\d+) registers", log)
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
        loops, _ = sass.parse_sass(text)[name]
        found.append(dict(
            name=name, grid=list(grid), threads=threads, shared_memory=smem,
            registers=int(regs[1]) if regs else None,
            spill_bytes=int(spills[1]) + int(spills[2]) if spills else None,
            c7515=sorted(set(re.findall(r"C7515.*?serialized (.*?)(?: in the function|$)", log, re.M))),
            loops=[dict(instructions=b.instructions, classes=b.counts,
                        mmas=[f"{m.op}.{m.m}x{m.n}x{m.k} x{m.count}" for m in b.mmas],
                        mma_flops=sum(m.flops for m in b.mmas),
                        branch_skipped=_skippable(text, name, b.start, b.end),
                        opcodes={op: n for op, n in _opcode_counts(text, name, b.start, b.end).items()
                                 if op in OPCODES})
                   for b in loops],
        ))
    return found


def run(configs_from: str | None, only: str | None = None, sweep: bool = False) -> list[dict]:
    """Compile every (target, problem, config) and read it; configs default per target unless given."""
    import jax

    from autotune.compile.model.gpu_predict import predict_gpu_compile
    from autotune.compile.model.prediction import GPU_MODEL_VERSION
    from autotune.compile.targets import get_target
    from autotune.compile.worker import _attention_fn, _specs, device_for
    import kernels.gpu as gpu
    from kernels import Problem

    sass = _sass_module()
    earlier = {}
    if configs_from:
        earlier = {(r["target"], r["problem_name"], r["variant"]): r["config"]
                   for r in json.loads(Path(configs_from).read_text())}
    rows = []
    for target_name in ARCH:
        target = get_target(target_name)
        device = device_for(target)
        for shape, d, fields in SHAPES[:1] if sweep else SHAPES:
            problem = Problem(head_dim=d, **BASE, **fields)
            default = gpu.Config.default(problem, device_kind=target.device_kind).to_dict()
            variants = {"default": default}
            if sweep:
                base = {**default, "num_warps": 4, "bwd_num_warps": 4}
                variants = {name: {**base, **changes} for name, changes in SWEEP}
            elif target_name == "h100" and shape.startswith(("plain", "causal")):
                variants["bwd-8warps-64"] = {**default, **EIGHT_WARPS}
                variants["bwd-8warps-128"] = {**default, **EIGHT_WARPS_128}
            for variant, config in variants.items():
                if only and not re.search(only, f"{target_name}/{shape}/{variant}"):
                    continue
                config = earlier.get((target_name, shape, variant), config)
                reasons = gpu.invalid_reasons(gpu.Config.from_dict(config), problem, device_kind=target.device_kind)
                if reasons and variant == "default":  # refused now: the default of this code stands in
                    config, reasons = default, gpu.invalid_reasons(gpu.Config.from_dict(default), problem,
                                                                   device_kind=target.device_kind)
                with tempfile.TemporaryDirectory(prefix="kegpu-") as dump:
                    fn = _attention_fn(gpu, problem, gpu.Config.from_dict(config), target.device_kind)
                    try:
                        jax.jit(fn).lower(*_specs(problem, device)).compile(compiler_options={"xla_dump_to": dump})
                    except Exception as error:  # noqa: BLE001 - recorded, not fatal
                        rows.append(dict(target=target_name, problem_name=shape, variant=variant, config=config,
                                         invalid=reasons, error=str(error).splitlines()[0][:200]))
                        continue
                    kernels = read_kernels(dump, ARCH[target_name], sass)
                    pred = predict_gpu_compile(dump, target_name, problem, config, target.device_kind)
                rows.append(dict(target=target_name, problem_name=shape, variant=variant, config=config,
                                 invalid=reasons, kernels=kernels,
                                 predicted_us=None if pred is None else pred.seconds * 1e6,
                                 model_version=None if pred is None else pred.model_version or GPU_MODEL_VERSION))
                print(target_name, shape, variant, "predicted", rows[-1]["predicted_us"], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", help="import kernels and autotune from this checkout (the code before)")
    parser.add_argument("--configs-from", help="compile the configs of an earlier run")
    parser.add_argument("--sweep", action="store_true", help="tiles x warps against duplicated work (SWEEP)")
    parser.add_argument("--only", help="a regex over target/problem/variant: compile only those")
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.add_argument("--table", nargs=2, metavar=("BEFORE", "AFTER"), help="markdown tables of two runs")
    parser.add_argument("--sweep-table", metavar="RUN", help="markdown table of a --sweep run")
    args = parser.parse_args()
    if args.sweep_table:
        from kernel_efficiency_gpu_table import sweep_table  # beside this script

        print(sweep_table(json.loads(Path(args.sweep_table).read_text())))
        return
    if args.table:
        from kernel_efficiency_gpu_table import tables  # beside this script

        print(tables(json.loads(Path(args.table[0]).read_text()), json.loads(Path(args.table[1]).read_text())))
        return
    if any(os.environ.get(k) != v for k, v in ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **ENV})
    sys.path.insert(0, str(Path(args.root).resolve()) if args.root else str(ROOT))
    rows = run(args.configs_from, args.only, args.sweep)
    text = json.dumps(rows, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
