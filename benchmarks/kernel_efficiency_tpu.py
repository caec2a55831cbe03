"""TPU kernel efficiency from libtpu's final bundles (deviceless), ours beside JAX's `flash_attention`.

Two measurements, each compile in this one process (libtpu reads its dump folder once, at load):

- *steps*: per kernel (forward, dq, dk/dv) the bundles of one grid step (the grid loop's body, nested loops times
  their trips, predicated regions counted whole: the issue-22 metric), the slot use per unit over those bundles
  (`*static-per-bundle-utilization.txt`: used slots / (bundles x the unit's slots)), and the MXU share (bundles
  of the step that issue MXU work / bundles of the step), for batch 32, 8 heads, head_dim 64, bf16, 512x512
  blocks, on v5e and v6e, plain / causal / window / segments / GQA problems; and the model's predicted time of our
  compile (`predict_tpu_compile`, labelled with the model version). JAX's kernel runs the problems it supports.
- *layout*: the XLA programs around our kernels (copies, transposes, reshapes, fusions) in the compiled forward
  and gradient programs at 2k tokens, GQA 8/2, bf16, causal, head_dim 64 / 128 / 256 (v5e): inputs as a
  projection leaves them, as `[b, s, h, d]` entry parameters, and a whole attention layer (`--layout-only`: this
  part alone).

    python benchmarks/kernel_efficiency_tpu.py --out after.json [--kernels-root /tmp/before]   # one target set
    python benchmarks/kernel_efficiency_tpu.py --table before.json after.json                  # markdown

`--kernels-root DIR` imports `kernels` from DIR (the code before a change); JAX's kernel is measured in both runs.
"""
from __future__ import annotations

import os
import sys
import tempfile

_DUMP_ROOT = tempfile.mkdtemp(prefix="tpu-efficiency-dump-")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this tree's packages, not an installed copy's
if __name__ == "__main__":
    os.environ["LIBTPU_INIT_ARGS"] = (os.environ.get("LIBTPU_INIT_ARGS", "") + f" --xla_jf_dump_to={_DUMP_ROOT}"
                                      " --xla_jf_dump_llo_pass_label_regex=final").strip()
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    for i, arg in enumerate(sys.argv):  # before `kernels` is imported anywhere
        if arg == "--kernels-root":
            sys.path.insert(0, os.path.abspath(sys.argv[i + 1]))

import argparse  # noqa: E402
import glob  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
from dataclasses import dataclass  # noqa: E402

from autotune.compile.model.tpu_bundles import Loop, Program, loop_bundles, parse_dump  # noqa: E402

TOPOLOGY = {"v5e": "v5e:1x1", "v6e": "v6e:1x1"}
BLOCK = 512
UNITS = ("VALU", "XLU", "MXU", "EUP", "VLOAD", "VSTORE")


@dataclass(frozen=True)
class StepProblem:
    """One problem of the step table: batch 32, 8 heads, head_dim 64, bf16, 512-blocks, and one feature."""

    name: str
    seq: int
    kv_heads: int = 8
    causal: bool = False
    window: tuple[int, int] | None = None
    segments: bool = False
    jax_supports: bool = True  # JAX's flash_attention has this feature (no GQA, no window)


STEP_PROBLEMS = (
    StepProblem("plain-1k", 1024), StepProblem("plain-4k", 4096), StepProblem("causal-1k", 1024, causal=True),
    StepProblem("window-1k", 1024, causal=True, window=(256, 0), jax_supports=False),
    StepProblem("segments-1k", 1024, segments=True), StepProblem("gqa4-1k", 1024, kv_heads=2, jax_supports=False),
)
STEP_DIMS = (32, 8, 64)  # batch, heads, head_dim of the step problems
LAYOUT_HEAD_DIMS = (64, 128, 256)


def _executed(program: Program, loop: Loop, rows: list[list[int]], mxu: int = 0) -> tuple[int, list[int], int]:
    """(bundles, summed slot use per unit, bundles with MXU use: column `mxu` of `rows`) of one trip of `loop`,
    nested loops x trips."""
    inner = {i for child in loop.children for i in range(child.start, child.end)}
    column, n, use, mxu = mxu, 0, [0] * len(rows[0]) if rows else [], 0
    for i in range(loop.start, loop.end):
        if i in inner:
            continue
        n += 1
        if i < len(rows):
            use = [a + b for a, b in zip(use, rows[i])]
            mxu += rows[i][column] > 0
    for child in loop.children:
        trips = max(child.trips or 1, 1)
        cn, cu, cm = _executed(program, child, rows, column)
        n, mxu = n + cn * trips, mxu + cm * trips
        use = [a + b * trips for a, b in zip(use, cu)]
    return n, use, mxu


def _utilization_rows(dump: str, name: str) -> tuple[list[str], list[int], list[list[int]]]:
    """Units, capacities and the per-bundle slot use of program `name` (rows in bundle order)."""
    path = glob.glob(os.path.join(dump, f"*-{name}-*static-per-bundle-utilization.txt"))[0]
    lines = open(path, errors="replace").read().splitlines()
    at = next(i for i, line in enumerate(lines) if "CAPAC" in line)
    units = [u.strip() for u in lines[at + 1].split(",")]
    capacity = [int(x) for x in lines[at + 2].split()]
    rows = [[int(x) for x in line.split()] for line in lines[at + 3:]
            if len(line.split()) == len(units) and all(p.isdigit() for p in line.split())]
    return units, capacity, rows


def edge_bundles(program: Program) -> int:
    """Bundles of the grid step's predicated regions without MXU work (the reduction's first-step init and
    last-step finish: each runs once per output block, not every step), outermost such regions only."""
    loop = program.grid_loop
    free = [r for r in program.regions if loop.start <= r.start < loop.end
            and not any(program.bundles[i].matmuls for i in range(r.start, r.end))]
    outer = [r for r in free if not any(o is not r and o.start <= r.start and r.end <= o.end for o in free)]
    return sum(r.end - r.start for r in outer)


def step_figures(dump: str, program: Program) -> dict:
    """Bundles per grid step, slot use per unit (% of the unit's slots over those bundles), MXU share (%)."""
    units, capacity, rows = _utilization_rows(dump, program.name)
    n, use, mxu_bundles = _executed(program, program.grid_loop, rows, units.index("MXU"))
    by_unit = dict(zip(units, use))
    cap = dict(zip(units, capacity))
    return dict(bundles=n, edges=edge_bundles(program), grid_trips=program.grid_loop.trips,
                mxu_share=round(100 * mxu_bundles / n, 1),
                slots={u: round(100 * by_unit[u] / (n * cap[u]), 1) for u in UNITS if u in cap})


def _kernel_role(name: str) -> str:
    """'forward', 'dq' or 'dkv' from a kernel program's name (ours: flash_attention_tpu_{fwd,dq,dkv}; JAX's:
    flash_attention, flash_mha_bwd_{dq,dkv}_...)."""
    base = name.split(".")[0]
    return "dkv" if "dkv" in base else "dq" if "dq" in base else "forward"


class Compiler:
    """Compiles on a target with libtpu's dump on; hands each compile's programs (and its own folder) back."""

    def __init__(self) -> None:
        from autotune.compile.model.tpu_predict import DumpCollector

        self.collector = DumpCollector(_DUMP_ROOT)
        self.devices: dict[str, object] = {}

    def device(self, target: str):
        from jax.experimental import topologies

        if target not in self.devices:
            topo = topologies.get_topology_desc(TOPOLOGY[target], platform="tpu", chips_per_host_bounds=(1, 1, 1))
            self.devices[target] = topo.devices[0]
        return self.devices[target]

    def compile(self, target: str, fn, shapes, job: str):
        """jit(fn) compiled for `target` on ShapeDtypeStructs of `shapes` [(shape, dtype)]; (compiled, dump)."""
        import jax
        from jax.sharding import SingleDeviceSharding

        sharding = SingleDeviceSharding(self.device(target))
        specs = [jax.ShapeDtypeStruct(s, d, sharding=sharding) for s, d in shapes]
        compiled = jax.jit(fn).lower(*specs).compile()
        self.collector.collect(job)
        return compiled, job


def _ours(problem: StepProblem, dims, backward: bool, device_kind: str):
    """(fn, shapes, Problem, config dict) of our kernel for a step problem (dims: batch, heads, head_dim)."""
    import jax
    import jax.numpy as jnp

    from kernels import Problem, tpu

    batch, heads, d = dims
    config = tpu.Config(1, BLOCK, BLOCK, BLOCK, BLOCK, BLOCK, BLOCK)
    kw = dict(causal=problem.causal, window=problem.window, config=config, device_kind=device_kind)

    def attend(q, k, v, ids):
        return tpu.flash_attention(q, k, v, segment_ids=ids, **kw)

    q = ((batch, problem.seq, heads, d), jnp.bfloat16)
    kv = ((batch, problem.seq, problem.kv_heads, d), jnp.bfloat16)
    ids = [((batch, problem.seq), jnp.int32)] if problem.segments else []
    fn = _pass(attend, backward, problem.segments, jax)
    shapes = [q, kv, kv, *ids] + ([q] if backward else [])
    spec = Problem(batch=batch, q_len=problem.seq, kv_len=problem.seq, heads=heads, kv_heads=problem.kv_heads,
                   head_dim=d, dtype="bfloat16", causal=problem.causal, segments=problem.segments,
                   window_left=problem.window[0] if problem.window else None,
                   window_right=problem.window[1] if problem.window else None, backward=backward)
    return fn, shapes, spec, config.to_dict()


def _jax(problem: StepProblem, dims, backward: bool):
    """(fn, shapes) of JAX's flash_attention ([b, h, t, d] layout) with every block 512."""
    import jax
    import jax.numpy as jnp
    from jax.experimental.pallas.ops.tpu import flash_attention as fa

    batch, heads, d = dims
    names = ("block_q", "block_k_major", "block_k", "block_q_major_dkv", "block_k_major_dkv", "block_k_dkv",
             "block_q_dkv", "block_k_major_dq", "block_k_dq", "block_q_dq")
    sizes = fa.BlockSizes(block_b=1, **{n: BLOCK for n in names})

    def attend(q, k, v, ids):
        segment_ids = None if ids is None else fa.SegmentIds(ids, ids)
        return fa.flash_attention(q, k, v, segment_ids=segment_ids, causal=problem.causal, block_sizes=sizes,
                                  sm_scale=d ** -0.5)

    q = ((batch, heads, problem.seq, d), jnp.bfloat16)
    ids = [((batch, problem.seq), jnp.int32)] if problem.segments else []
    return _pass(attend, backward, problem.segments, jax), [q, q, q, *ids] + ([q] if backward else [])


def _pass(attend, backward: bool, segments: bool, jax):
    """The function to compile: the forward, or forward + vjp (out and the three gradients)."""
    def forward(q, k, v, *rest):
        return attend(q, k, v, rest[0] if segments else None)

    if not backward:
        return forward

    def both(q, k, v, *rest):
        *ids, do = rest
        out, pull = jax.vjp(lambda q, k, v: forward(q, k, v, *ids), q, k, v)
        return (out, *pull(do))

    return both


def _heads_per_step(problem: StepProblem) -> int:
    """Query heads one grid step of our kernels works on (two per 128-lane tile at head_dim 64 since the kernels
    read the caller's layout; one in code from before kernels.tpu.layout)."""
    try:
        from kernels.tpu.layout import Layout
    except ImportError:
        return 1
    _, heads, head_dim = STEP_DIMS
    return Layout.of(heads, problem.kv_heads, head_dim).per_tile


def measure_steps(compiler: Compiler, targets, names=None, with_jax: bool = True) -> list[dict]:
    from autotune.compile.model.prediction import TPU_MODEL_VERSION
    from autotune.compile.model.tpu_predict import predict_tpu_compile

    rows = []
    for target in targets:
        kind = compiler.device(target).device_kind
        for problem in STEP_PROBLEMS:
            if names and problem.name not in names:
                continue
            for backward in (False, True):
                for impl in ("ours", "jax") if problem.jax_supports and with_jax else ("ours",):
                    job = tempfile.mkdtemp(prefix="job-", dir=os.path.dirname(_DUMP_ROOT))
                    row = dict(target=target, problem=problem.name, pass_="bwd" if backward else "fwd", impl=impl,
                               heads_per_step=_heads_per_step(problem) if impl == "ours" else 1)
                    try:
                        if impl == "ours":
                            fn, shapes, spec, config = _ours(problem, STEP_DIMS, backward, kind)
                        else:
                            (fn, shapes), spec = _jax(problem, STEP_DIMS, backward), None
                        compiler.compile(target, fn, shapes, job)
                        for program in parse_dump(job):
                            if program.kind == "kernel":
                                role = _kernel_role(program.name)
                                if backward or role == "forward":
                                    row[role] = dict(step_figures(job, program), name=program.name)
                        if spec is not None:
                            prediction = predict_tpu_compile(job, target, spec, config)
                            row["predicted_us"] = round(prediction.seconds * 1e6, 1)
                            row["model_version"] = TPU_MODEL_VERSION
                    except Exception as exc:  # noqa: BLE001 - a compile failure is a result too
                        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                    finally:
                        shutil.rmtree(job, ignore_errors=True)
                    print(json.dumps(row), file=sys.stderr, flush=True)
                    rows.append(row)
    return rows


_ENTRY_OP = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\S+?)(?:\{[^}]*\})?\s+([\w\-]+)\(")
_QUIET = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "copy-start", "copy-done",
          "slice-start", "slice-done"}


def ops_around_kernels(hlo_text: str) -> list[str]:
    """`name:opcode` of the compiled ENTRY computation's instructions other than the Pallas kernels, bitcasts,
    tuples and XLA's asynchronous VMEM prefetches (copy-start/done, slice-start/done)."""
    entry = hlo_text[hlo_text.index("\nENTRY"):]
    entry = entry[:entry.index("\n}")]
    found = []
    for line in entry.splitlines()[1:]:
        m = _ENTRY_OP.match(line)
        if not m or m.group(3) in _QUIET or 'custom_call_target="tpu_custom_call"' in line:
            continue
        if 'custom_call_target="ConcatBitcast"' in line:
            continue
        found.append(f"{m.group(1)}:{m.group(3)}")
    return found


def param_layout(hlo_text: str, index: int = 0) -> str:
    """The layout XLA:TPU gave ENTRY parameter `index` (minor-to-major and tiling)."""
    entry = hlo_text[hlo_text.index("\nENTRY"):]
    m = re.search(r"\{([^}\n]*)\} parameter\(" + str(index) + r"\)", entry)
    return m.group(1) if m else "?"


def measure_layout(compiler: Compiler) -> list[dict]:
    """Per head_dim, pass and input form: the XLA ops around our kernels in the compiled v5e program at 2k tokens,
    batch 2, GQA 8/2, bf16, causal (default config), and the HBM layout XLA gives the operands.

    Two forms of input: `projected`, q, k, v arriving as [b, s, heads * head_dim] (what a projection produces)
    and reshaped to [b, s, h, d] by the caller, the output and gradients reshaped back, as in a model; and
    `params`, [b, s, h, d] entry parameters, whose HBM layout XLA:TPU picks with (8, 128) tiles over (heads,
    head_dim) (or, at head_dim 64, with the sequence minor), which no [b, s, h * d] view can share: there any
    kernel layout costs a relayout of each operand."""
    import jax
    import jax.numpy as jnp

    from kernels import tpu

    rows = []
    kind = compiler.device("v5e").device_kind
    b, s, heads, kv_heads = 2, 2048, 8, 2
    rows += measure_model_layout(compiler, kind, (b, s, heads, kv_heads))
    for d in LAYOUT_HEAD_DIMS:
        for form in ("projected", "params"):
            for backward in (False, True):
                def attend(q, k, v, ids, d=d, form=form):
                    if form == "params":
                        return tpu.flash_attention(q, k, v, causal=True, device_kind=kind)
                    split = lambda x: x.reshape(b, s, x.shape[2] // d, d)  # noqa: E731
                    out = tpu.flash_attention(split(q), split(k), split(v), causal=True, device_kind=kind)
                    return out.reshape(b, s, heads * d)

                if form == "params":
                    q, kv = ((b, s, heads, d), jnp.bfloat16), ((b, s, kv_heads, d), jnp.bfloat16)
                else:
                    q, kv = ((b, s, heads * d), jnp.bfloat16), ((b, s, kv_heads * d), jnp.bfloat16)
                job = tempfile.mkdtemp(prefix="job-", dir=os.path.dirname(_DUMP_ROOT))
                compiled, _ = compiler.compile("v5e", _pass(attend, backward, False, jax),
                                               [q, kv, kv] + ([q] if backward else []), job)
                shutil.rmtree(job, ignore_errors=True)
                text = compiled.as_text()
                rows.append(dict(target="v5e", head_dim=d, form=form, pass_="bwd" if backward else "fwd",
                                 ops=ops_around_kernels(text), q_layout=param_layout(text, 0),
                                 k_layout=param_layout(text, 1)))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def measure_model_layout(compiler: Compiler, kind: str, dims) -> list[dict]:
    """`model` form: an attention layer (q, k, v projections of x [b, s, 1024], the kernel, the output
    projection, a scalar loss) compiled whole, forward and gradient: the copies, transposes and reshapes XLA
    places anywhere in it (layout assignment may move them into neighbours; a fusion named for a copy or a
    transpose counts too)."""
    import jax
    import jax.numpy as jnp

    from kernels import tpu

    b, s, heads, kv_heads = dims
    width, rows = 1024, []
    for d in LAYOUT_HEAD_DIMS:
        def layer(x, wq, wk, wv, wo, d=d):
            q = (x @ wq).reshape(b, s, heads, d)
            k, v = (x @ wk).reshape(b, s, kv_heads, d), (x @ wv).reshape(b, s, kv_heads, d)
            o = tpu.flash_attention(q, k, v, causal=True, device_kind=kind)
            return jnp.sum((o.reshape(b, s, heads * d) @ wo).astype(jnp.float32) ** 2)

        shapes = [((b, s, width), jnp.bfloat16), ((width, heads * d), jnp.bfloat16),
                  ((width, kv_heads * d), jnp.bfloat16), ((width, kv_heads * d), jnp.bfloat16),
                  ((heads * d, width), jnp.bfloat16)]
        for pass_, fn in (("fwd", layer), ("bwd", jax.grad(layer, argnums=(0, 1, 2, 3, 4)))):
            job = tempfile.mkdtemp(prefix="job-", dir=os.path.dirname(_DUMP_ROOT))
            compiled, _ = compiler.compile("v5e", fn, shapes, job)
            shutil.rmtree(job, ignore_errors=True)
            moves = [op for op in ops_around_kernels(compiled.as_text())
                     if op.split(":")[1] in ("copy", "transpose", "reshape")
                     or (op.endswith(":fusion") and ("copy" in op or "transpose" in op))]
            rows.append(dict(target="v5e", head_dim=d, form="model", pass_=pass_, ops=moves, q_layout="-",
                             k_layout="-"))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def measure_head_extraction(compiler: Compiler) -> list[dict]:
    """Why the in-place path takes one head's (or a pair's) lanes of a [b, s, h * d] view rather than a block of
    every head of [b, s, h, d]: bundles per grid step of a probe kernel that forms the
    eight [256, 256] score tiles q_h k_h^T of a 256-row block at head_dim 128, its q and k blocks taken as
    [256, heads, 128] from the caller's layout (a head is a sublane slice of each row's (8, 128) tile) or as
    [heads, 256, 128] from the kernel layout (a head is whole tiles); and the XLA ops each needs around it."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl

    rows = []
    b, s, d, bq = 2, 2048, 128, 256
    for dtype in (jnp.bfloat16, jnp.float32):
        for heads in (8, 2):
            for layout in ("caller", "kernel"):
                def kernel(q_ref, k_ref, o_ref, heads=heads, layout=layout):
                    for h in range(heads):
                        q, k = (q_ref[:, h, :], k_ref[:, h, :]) if layout == "caller" else (q_ref[h], k_ref[h])
                        o_ref[h] = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                                                       preferred_element_type=jnp.float32)

                def probe(q, k, kernel=kernel, heads=heads, layout=layout):
                    if layout == "caller":
                        spec = pl.BlockSpec((None, bq, heads, d), lambda i, j: (i, j, 0, 0))
                    else:
                        q, k = jnp.swapaxes(q, 1, 2), jnp.swapaxes(k, 1, 2)
                        spec = pl.BlockSpec((None, heads, bq, d), lambda i, j: (i, 0, j, 0))
                    out = jax.ShapeDtypeStruct((b, s // bq, heads, bq, bq), jnp.float32)
                    return pl.pallas_call(kernel, out_shape=out, grid=(b, s // bq), in_specs=[spec, spec],
                                          out_specs=pl.BlockSpec((None, None, heads, bq, bq),
                                                                 lambda i, j: (i, j, 0, 0, 0)))(q, k)

                job = tempfile.mkdtemp(prefix="job-", dir=os.path.dirname(_DUMP_ROOT))
                compiled, _ = compiler.compile("v5e", probe, [((b, s, heads, d), dtype)] * 2, job)
                program = next(p for p in parse_dump(job) if p.kind == "kernel")
                shutil.rmtree(job, ignore_errors=True)
                rows.append(dict(dtype=jnp.dtype(dtype).name, heads=heads, layout=layout,
                                 bundles=loop_bundles(program.grid_loop),
                                 ops=ops_around_kernels(compiled.as_text())))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="JSON results")
    parser.add_argument("--targets", nargs="+", default=list(TOPOLOGY), choices=list(TOPOLOGY))
    parser.add_argument("--kernels-root", help="import `kernels` from this directory (the code before a change)")
    parser.add_argument("--problems", nargs="+", help="names from STEP_PROBLEMS (default: all)")
    parser.add_argument("--no-jax", action="store_true", help="leave JAX's kernel out (e.g. in a before run)")
    parser.add_argument("--skip-layout", action="store_true", help="only the step table")
    parser.add_argument("--layout-only", action="store_true", help="only the ops around the kernels")
    parser.add_argument("--table", nargs=2, metavar=("BEFORE", "AFTER"), help="print the markdown tables")
    args = parser.parse_args()
    if args.table:
        from kernel_efficiency_tpu_table import render  # beside this script

        print(render(*args.table, problems=STEP_PROBLEMS), end="")
        return
    compiler = Compiler()
    result = {} if args.layout_only else dict(steps=measure_steps(compiler, args.targets, args.problems,
                                                                  not args.no_jax))
    if args.layout_only:
        result["layout"] = measure_layout(compiler)
    elif not args.skip_layout:
        result["layout"] = measure_layout(compiler)
        result["head_extraction"] = measure_head_extraction(compiler)
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=1)
    shutil.rmtree(_DUMP_ROOT, ignore_errors=True)


if __name__ == "__main__":
    main()
