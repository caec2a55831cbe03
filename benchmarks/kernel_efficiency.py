"""What the real compilers say of the kernels' efficiency, without the hardware (deviceless compiles).

For each committed problem, each target (h100, a100: XLA:GPU + Triton + ptxas; v5e, v6e: XLA:TPU + Mosaic) and
each pass (forward; forward + gradients) this compiles `flash_attention` with the default config for the target
and records: StableHLO pads/slices in the lowered program, XLA ops around the kernels in the compiled program (and
the HBM bytes they and the kernels touch, counted once per operand), temporary bytes, the flops the compiled
program reports, per-kernel shared memory (GPU) or scoped VMEM (TPU), registers, spills and ptxas C7515 warnings
(GPU), compile seconds, and the problem's static roofline time on the target.

    python benchmarks/kernel_efficiency.py --all --label after --out /tmp/after.json
    python benchmarks/kernel_efficiency.py --table /tmp/before.json /tmp/after.json   # markdown tables

`--kernels-root DIR` imports the `kernels` package from DIR (a copy of the code before a change). `--configs-from`
takes the configs of an earlier run, so before and after compile the very same configs. Each target runs in its
own process (one compiler backend loaded, ptxas log captured per compile); keep it `nice`d on a shared machine.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_FILES = ROOT.parent / "shared" / "targets"


@dataclass(frozen=True)
class Target:
    """A compile target and the peaks its roofline uses (dense bf16/f16 matmul, HBM bandwidth)."""

    name: str
    platform: str  # "cuda" or "tpu"
    topology: str  # TPU topology name, or the GPU target file's stem
    peak_flops: float
    peak_bytes: float
    peak_source: str


TARGETS = {
    "h100": Target("h100", "cuda", "h100", 989e12, 3.35e12, "H100 SXM: 989 TFLOP/s dense bf16, 3.35 TB/s HBM3"),
    "a100": Target("a100", "cuda", "a100", 312e12, 2.039e12, "A100 SXM 80GB: 312 TFLOP/s dense bf16, 2.04 TB/s"),
    "v5e": Target("v5e", "tpu", "v5e:1x1", 197e12, 0.819e12, "TPU v5e: 197 TFLOP/s bf16, 819 GB/s HBM2"),
    "v6e": Target("v6e", "tpu", "v6e:1x1", 918e12, 1.64e12, "TPU v6e: 918 TFLOP/s bf16, 1640 GB/s HBM"),
}

# (name, batch, q_len, kv_len, heads, kv_heads, head_dim, dtype, causal)
PROBLEMS = [
    ("ragged-d72-gqa4", 1, 300, 300, 8, 2, 72, "bfloat16", True),
    ("1k-d64-mha", 1, 1024, 1024, 8, 8, 64, "bfloat16", True),
    ("2k-d128-gqa4", 1, 2048, 2048, 8, 2, 128, "bfloat16", True),
    ("2k-d64-gqa4-32h", 1, 2048, 2048, 32, 8, 64, "bfloat16", False),
    ("4k-d128-gqa4-32h", 1, 4096, 4096, 32, 8, 128, "bfloat16", True),
    ("8k-d64-gqa4", 1, 8192, 8192, 8, 2, 64, "bfloat16", True),
    ("1000-d72-gqa4", 1, 1000, 1000, 8, 2, 72, "bfloat16", False),
    ("3000-d72-f16", 1, 3000, 3000, 16, 16, 72, "float16", True),
    ("b2-1k-4k-d128-gqa4", 2, 1024, 4096, 8, 2, 128, "bfloat16", False),
]
PASSES = ("fwd", "bwd")
KERNEL_TARGETS = ("__gpu$xla.gpu.triton", "tpu_custom_call")
TRIVIAL_OPS = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "after-all"}
# XLA:TPU's memory-space assignment prefetching operands into VMEM (async, off the critical path): listed apart
ASYNC_OPS = {"copy-start", "copy-done", "slice-start", "slice-done"}
_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
             "s64": 8, "u64": 8, "f64": 8}
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16)\[([\d,]*)\]")
_KERNEL_LABEL = r'op_name="[^"]*?(flash_attention\w*)\)*/pallas_call"'  # also inside jvp(...)/transpose(...)
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([\w\-]+)\((.*?)\)(.*)$")


def _bytes_of(type_text: str) -> int:
    total = 0
    for dtype, dims in _ARRAY.findall(type_text):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _ITEMSIZE.get(dtype, 4)
    return total


def entry_ops(hlo_text: str) -> list[dict]:
    """The ENTRY computation's instructions: name, op, result bytes, operand bytes, kernel flag."""
    lines = hlo_text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("ENTRY"))
    shapes: dict[str, int] = {}
    for m in re.finditer(r"([\w.\-]+):\s*((?:\([^)]*\))|(?:\w+\[[\d,]*\](?:\{[^}]*\})?))", lines[start]):
        shapes[m.group(1)] = _bytes_of(m.group(2))
    ops = []
    for line in lines[start + 1:]:
        if line.startswith("}"):
            break
        m = _INSTR.match(line)
        if not m:
            continue
        name, type_text, op, operands, rest = m.groups()
        shapes[name] = _bytes_of(type_text)
        if op in TRIVIAL_OPS:
            continue
        kernel = op == "custom-call" and any(f'custom_call_target="{t}"' in rest for t in KERNEL_TARGETS)
        prefetch = op in ASYNC_OPS or (op == "custom-call" and 'custom_call_target="ConcatBitcast"' in rest)
        names = re.findall(r"%([\w.\-]+)", operands)
        label = re.search(_KERNEL_LABEL, rest)
        ops.append(dict(name=label.group(1) if (kernel and label) else name, op=op, kernel=kernel, prefetch=prefetch,
                        bytes=shapes[name] + sum(shapes.get(n, 0) for n in names)))
    return ops


def ptxas_figures(log: str) -> dict[str, dict]:
    """Per entry function of the ptxas log: registers, spill bytes, stack and C7515 warnings (with its reason)."""
    out: dict[str, dict] = {}
    current = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            current = out.setdefault(m.group(1), dict(registers=None, spill_stores=0, spill_loads=0, stack=0,
                                                      c7515=[]))
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and current is not None:
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m and current is not None:
            current["registers"] = int(m.group(1))
        if "C7515" in line:
            fn = re.search(r"function '([^']+)'", line)
            reason = re.search(r"serialized (.*?)(?: in the function|$)", line)
            entry = out.setdefault(fn.group(1) if fn else "?", dict(registers=None, spill_stores=0, spill_loads=0,
                                                                     stack=0, c7515=[]))
            text = reason.group(1).strip() if reason else line.strip()
            if text not in entry["c7515"]:
                entry["c7515"].append(text)
    return out


def gpu_kernel_smem(dump: Path) -> dict[str, dict]:
    """Per Triton kernel of the thunk sequence: grid, threads and shared memory."""
    out = {}
    for f in dump.glob("*thunk_sequence.txt"):
        for line in f.read_text().splitlines():
            m = re.search(r"\]\s+(flash_attention\w*) grid: \[([\d, ]+)\] threads: \[([\d, ]+)\]\s+shared_memory: "
                          r"(\d+) bytes", line)
            if m:
                out[m.group(1)] = dict(grid=m.group(2), threads=m.group(3), smem=int(m.group(4)))
    return out


def tpu_kernel_vmem(dump: Path) -> dict[str, int]:
    """Per Mosaic kernel: the scoped VMEM the compiler allocated (used_scoped_memory_configs)."""
    out: dict[str, int] = {}
    files = sorted(dump.rglob("*after_codegen.txt")) or sorted(dump.rglob("*after_optimizations.txt"))
    for f in files[:1]:
        for line in f.read_text().splitlines():
            if 'custom_call_target="tpu_custom_call"' not in line:
                continue
            name = re.search(_KERNEL_LABEL, line)
            used = re.search(r'"used_scoped_memory_configs":\[(.*?)\]', line)
            sizes = [int(s) for s in re.findall(r'"size":"(\d+)"', used.group(1))] if used else []
            if name:
                out[name.group(1)] = max(out.get(name.group(1), 0), sum(sizes))
    return out


@contextlib.contextmanager
def captured_stderr():
    """Redirect fd 2 (where XLA's C++ logging goes) into a file; yields a list that receives the text."""
    sys.stderr.flush()
    saved = os.dup(2)
    box: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield box
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            box.append(tmp.read().decode(errors="replace"))


def device_for(target: Target):
    from jax.experimental import topologies

    if target.platform == "tpu":
        topo = topologies.get_topology_desc(target.topology, platform="tpu", chips_per_host_bounds=(1, 1, 1))
    else:
        text = (TARGET_FILES / f"{target.topology}.txtpb").read_text()
        topo = topologies.get_topology_desc(platform="cuda", topology_name="", target_config=text, topology="1x1x1")
    return topo.devices[0]


def roofline(problem, target: Target, pass_: str) -> dict:
    """Static lower bound: max(FLOPs / peak, compulsory HBM bytes / bandwidth); FLOPs by the usual count."""
    import jax.numpy as jnp

    flops = problem.flops() * (3.5 if pass_ == "bwd" else 1.0)
    it = jnp.dtype(problem.dtype).itemsize
    q = problem.batch * problem.q_len * problem.heads * problem.head_dim * it
    kv = problem.batch * problem.kv_len * problem.kv_heads * problem.head_dim * it
    nbytes = 2 * q + 2 * kv if pass_ == "fwd" else 4 * q + 4 * kv + 2 * q  # fwd: q,k,v,o; bwd adds do,dq,dk,dv,o
    return dict(flops=flops, min_bytes=nbytes, t_flops_us=flops / target.peak_flops * 1e6,
                t_bytes_us=nbytes / target.peak_bytes * 1e6,
                t_roof_us=max(flops / target.peak_flops, nbytes / target.peak_bytes) * 1e6)


def measure(target: Target, spec: tuple, pass_: str, device, config_dict: dict | None) -> dict:
    import jax
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding

    from kernels import Problem

    module = __import__("kernels.gpu" if target.platform == "cuda" else "kernels.tpu", fromlist=["x"])
    name, b, lq, lk, h, hk, d, dtype, causal = spec
    problem = Problem(batch=b, q_len=lq, kv_len=lk, heads=h, kv_heads=hk, head_dim=d, dtype=dtype, causal=causal,
                      backward=pass_ == "bwd")
    kind = device.device_kind
    if config_dict is not None:
        config = module.Config.from_dict(config_dict)
    elif "device_kind" in inspect.signature(module.Config.default).parameters:
        config = module.Config.default(problem, device_kind=kind)
    else:
        config = module.Config.default(problem)
    extra = {"device_kind": kind} if "device_kind" in inspect.signature(module.flash_attention).parameters else {}
    sh = SingleDeviceSharding(device)
    q = jax.ShapeDtypeStruct((b, lq, h, d), jnp.dtype(dtype), sharding=sh)
    k = jax.ShapeDtypeStruct((b, lk, hk, d), jnp.dtype(dtype), sharding=sh)

    def attend(q, k, v):
        return module.flash_attention(q, k, v, causal=causal, config=config, **extra)

    if pass_ == "fwd":
        fn, args = attend, (q, k, k)
    else:
        def fn(q, k, v, do):
            out, pull = jax.vjp(attend, q, k, v)
            return (out, *pull(do))
        args = (q, k, k, q)
    row = dict(target=target.name, problem=name, pass_=pass_, config=config.to_dict(),
               roofline=roofline(problem, target, pass_))
    try:
        lowered = jax.jit(fn).lower(*args)
        text = lowered.as_text()
        row["stablehlo"] = {op: text.count(f"stablehlo.{op}") for op in ("pad", "slice", "reduce", "convert",
                                                                          "transpose")}
        with tempfile.TemporaryDirectory() as dump:
            t0 = time.perf_counter()
            with captured_stderr() as log:
                compiled = lowered.compile(compiler_options={"xla_dump_to": dump})
            row["compile_s"] = round(time.perf_counter() - t0, 2)
            row["temp_bytes"] = int(compiled.memory_analysis().temp_size_in_bytes)
            cost = compiled.cost_analysis() or {}
            if isinstance(cost, list):
                cost = cost[0] if cost else {}
            row["xla_flops"] = float(cost.get("flops", 0.0))
            row["xla_bytes"] = float(cost.get("bytes accessed", 0.0))
            ops = entry_ops(compiled.as_text())
            row["kernels"] = [o["name"] for o in ops if o["kernel"]]
            other = [o for o in ops if not o["kernel"] and not o["prefetch"]]
            row["other_ops"] = [o["name"] for o in other]
            row["prefetch_ops"] = sum(o["prefetch"] for o in ops)
            row["kernel_bytes"] = sum(o["bytes"] for o in ops if o["kernel"])
            row["other_bytes"] = sum(o["bytes"] for o in other)
            if target.platform == "cuda":
                row["per_kernel"] = gpu_kernel_smem(Path(dump))
                ptx = ptxas_figures(log[0])
                for kname, figures in row["per_kernel"].items():
                    figures.update(ptx.get(kname, {}))
            else:
                row["per_kernel"] = {k: dict(vmem=v) for k, v in tpu_kernel_vmem(Path(dump)).items()}
    except Exception as exc:  # a compile failure is a result too
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    return row


def run_target(args) -> None:
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other processes on the machine may hold libtpu
    if args.kernels_root:
        sys.path.insert(0, str(Path(args.kernels_root).resolve()))
    target = TARGETS[args.target]
    device = device_for(target)
    pinned = {}
    if args.configs_from:
        for row in json.loads(Path(args.configs_from).read_text()):
            pinned[(row["target"], row["problem"], row["pass_"])] = row["config"]
    rows = []
    for spec in PROBLEMS:
        if args.problems and spec[0] not in args.problems:
            continue
        for pass_ in PASSES:
            row = measure(target, spec, pass_, device, pinned.get((target.name, spec[0], pass_)))
            print(json.dumps({k: row.get(k) for k in ("target", "problem", "pass_", "compile_s", "temp_bytes",
                                                       "error")}), file=sys.stderr, flush=True)
            rows.append(row)
    Path(args.out).write_text(json.dumps(rows, indent=1))


def run_all(args) -> None:
    """One process per target, one after another (libtpu and the CUDA plugin in separate processes)."""
    rows = []
    env = dict(os.environ, JAX_SKIP_CUDA_CONSTRAINTS_CHECK="1", TF_CPP_MIN_LOG_LEVEL="0",
               TF_CPP_VMODULE="subprocess_compilation=2")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.targets:
            out = Path(tmp) / f"{name}.json"
            cmd = [sys.executable, __file__, "--target", name, "--out", str(out)]
            if args.kernels_root:
                cmd += ["--kernels-root", args.kernels_root]
            if args.configs_from:
                cmd += ["--configs-from", args.configs_from]
            if args.problems:
                cmd += ["--problems", *args.problems]
            subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL,
                           stderr=None if args.verbose else subprocess.DEVNULL)
            rows += json.loads(out.read_text())
    Path(args.out).write_text(json.dumps(rows, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--all", action="store_true", help="every target in --targets, one process each")
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument("--target", choices=list(TARGETS))
    parser.add_argument("--problems", nargs="+", help="names from PROBLEMS (default: all)")
    parser.add_argument("--kernels-root", help="import `kernels` from this directory (e.g. a copy before a change)")
    parser.add_argument("--configs-from", help="JSON of an earlier run: compile the same configs")
    parser.add_argument("--label", default="")
    parser.add_argument("--out", help="JSON results")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--table", nargs=2, metavar=("BEFORE", "AFTER"), help="print the markdown table")
    args = parser.parse_args()
    if args.table:
        from kernel_efficiency_table import render  # beside this script

        print(render(*args.table, problems=PROBLEMS, targets=TARGETS), end="")
    elif args.all:
        run_all(args)
    elif args.target:
        run_target(args)
    else:
        parser.error("give --all, --target or --table")


if __name__ == "__main__":
    main()
