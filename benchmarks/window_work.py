"""How the kernels' work falls with a sliding window: blocks visited per kernel, counted exactly from the block ranges.

A causal problem of SEQ tokens with windows from none down to 128 tokens, one fixed config (64 x 64 blocks in every
kernel) so that only the window changes. For the GPU kernel the key (or query) blocks each program's loops visit
come from the kernels' own block ranges (`kv_ranges`, `q_ranges`: pure functions of the band, the ones the kernels
run); the sum over programs is the work. The least any blocked kernel must visit is
the number of 64 x 64 tiles of the mask that hold a visible pair (from the reference mask); the table shows both and
the share of the full causal work. For the TPU kernel the figure is the size of each kernel's grid (its steps; a
window bounded on both sides shrinks the reduction axis to the blocks it reaches), read from the traced program.

    python benchmarks/window_work.py            # SEQ 4096; a few minutes on 2 cores
Writes benchmarks/results/window-work-cpu.json and prints the table (copied into window-work-cpu.md).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import kernels  # noqa: F401  (environment defaults before jax)
import jax
import jax.numpy as jnp
import numpy as np

from kernels.gpu.common import Masking, kv_ranges, q_ranges
from kernels.masking import Band
from kernels.reference import attention_mask
from kernels.tpu import Config as TpuConfig
from kernels.tpu import flash_attention as tpu_attention

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "window-work-cpu.json"
BLOCK = 64


def needed_tiles(n: int, window: int | None) -> int:
    """BLOCK x BLOCK tiles of the causal (windowed) mask holding at least one visible pair."""
    mask = np.asarray(attention_mask(n, n, causal=True, window=None if window is None else (window, 0)))[0, 0]
    return int(mask.reshape(n // BLOCK, BLOCK, n // BLOCK, BLOCK).any(axis=(1, 3)).sum())


def gpu_blocks(n: int, window: int | None) -> dict[str, int]:
    """Blocks the GPU kernels visit (summed over programs) for one causal problem, batch 1, one head."""
    masking = Masking(band=Band.of(causal=True, window=None if window is None else (window, 0)))

    def visited(ranges) -> int:
        return sum(max(int(stop) - int(start), 0) for start, stop, _masked in ranges)

    blocks = n // BLOCK
    forward = sum(visited(kv_ranges(i, block_q=BLOCK, block_k=BLOCK, kv_len=n, masking=masking))
                  for i in range(blocks))
    dkv = sum(visited(q_ranges(j, block_q=BLOCK, block_k=BLOCK, q_len=n, masking=masking)) for j in range(blocks))
    return {"forward": forward, "dq": forward, "dkv": dkv}  # dq walks the forward's ranges


def tpu_grid_steps(n: int, window: int | None) -> dict[str, int]:
    """Grid steps (the product of each pallas_call's grid) of the TPU forward, dq and dk/dv kernels, traced only."""
    config = TpuConfig(1, BLOCK * 2, BLOCK * 2, BLOCK * 2, BLOCK * 2, BLOCK * 2, BLOCK * 2)  # 128: Mosaic's lanes
    q = jax.ShapeDtypeStruct((1, n, 1, 128), jnp.bfloat16)
    steps: dict[str, int] = {}

    def run(q, k, v):
        out, pull = jax.vjp(lambda *a: tpu_attention(*a, causal=True, window=None if window is None else (window, 0),
                                                     config=config, interpret=True), q, k, v)
        return pull(out)

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                name = str(eqn.params["name"]).split("_tpu_")[-1]
                steps[{"fwd": "forward"}.get(name, name)] = int(np.prod(eqn.params["grid_mapping"].grid))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(run)(q, q, q).jaxpr)
    return steps


def table(rows: list[dict], n: int) -> str:
    full = rows[0]
    lines = [f"| window (causal, {n} tokens) | tiles needed ({BLOCK}x{BLOCK}) | GPU forward / dq / dk,dv blocks | "
             f"GPU share of full causal | TPU grid steps fwd / dq / dk,dv ({2 * BLOCK}-blocks) | TPU share |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        g, t = r["gpu"], r["tpu"]
        lines.append(f"| {r['window'] or 'none'} | {r['needed']} | {g['forward']} / {g['dq']} / {g['dkv']} | "
                     f"{g['forward'] / full['gpu']['forward']:.1%} | {t['forward']} / {t['dq']} / {t['dkv']} | "
                     f"{t['forward'] / full['tpu']['forward']:.1%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--windows", default="none,2048,1024,512,256,128")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    rows = []
    for text in args.windows.split(","):
        window = None if text == "none" else int(text)
        row = {"window": window, "needed": needed_tiles(args.seq, window), "gpu": gpu_blocks(args.seq, window),
               "tpu": tpu_grid_steps(args.seq, window)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    document = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                "jax": jax.__version__, "seq": args.seq, "block": BLOCK, "mode": "Pallas interpret mode on a CPU",
                "results": rows}
    Path(args.out).write_text(json.dumps(document, indent=2) + "\n")
    print(table(rows, args.seq))


if __name__ == "__main__":
    main()
