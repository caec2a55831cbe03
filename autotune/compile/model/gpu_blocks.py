"""How many loop iterations each program of a flash-attention kernel runs, from the kernel's own block arithmetic.

The SASS shows what one iteration costs; how many a program runs depends on its grid index: causal masks, sliding
windows and sequence ends skip key (or query) blocks. For our GPU kernel the counts come from the very functions its
loops are built from (`kernels.gpu.common.kv_ranges` / `q_ranges`), so they are exact; ranges the kernel leaves out
statically (no loop is lowered for them) are left out here too, so loop i of the SASS is range i. JAX's `mha` gets
its own arithmetic (`jax.experimental.pallas.ops.gpu.attention`). Run-time lengths are taken as full.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kernels import Problem
from kernels.devices import is_hopper
from kernels.gpu.common import Masking, kv_ranges, loop_spans, q_ranges, statically_empty

Trips = tuple[tuple[int, ...], ...]  # per grid x index: iterations of each lowered loop, in program order


@dataclass(frozen=True)
class Work:
    """Per grid x index the loop trips, and the useful FLOPs and the bytes a kernel must move at least."""

    trips: Trips
    flops: float
    min_bytes: float
    kv_tile_bytes: int = 0  # bytes one iteration loads (K and V tiles, or Q/dO tiles for dk/dv)


def _masking(problem: Problem) -> Masking:
    return Masking(band=problem.band, softcap=problem.softcap, lengths=problem.lengths)


def _lowered(ranges_at, count: int, one_loop: bool = False) -> Trips:
    """Trips of the loops the kernel lowers for its ranges (not statically empty; with `one_loop` one loop over
    their span), for each of `count` grid indices."""
    spans = loop_spans(ranges_at(np.int32(0)), one_loop)
    keep = [k for k, (a, b) in enumerate(spans) if not statically_empty(a, b)]
    trips = []
    for index in range(count):
        spans = loop_spans(ranges_at(index), one_loop)
        trips.append(tuple(max(0, int(spans[k][1]) - int(spans[k][0])) for k in keep))
    return tuple(trips)


def _itemsize(problem: Problem) -> int:
    return np.dtype(problem.dtype).itemsize


def ours(problem: Problem, block_q: int, block_k: int, role: str, device_kind: str) -> Work:
    """Our kernel's `role` ('forward', 'dq', 'dkv') at these blocks: trips per program and its minimum work."""
    masking = _masking(problem)
    one_loop = is_hopper(device_kind)
    size = _itemsize(problem)
    d = problem.head_dim
    q_bytes = problem.batch * problem.q_len * problem.heads * d * size
    kv_bytes = problem.batch * problem.kv_len * problem.kv_heads * d * size
    fwd_flops = problem.flops()  # two matmuls per visible pair; dq recomputes S and runs 3, dk/dv 4
    if role == "dkv":
        count = -(-problem.kv_len // block_k)
        trips = _lowered(lambda j: q_ranges(j, block_q=block_q, block_k=block_k, q_len=problem.q_len,
                                            masking=masking), count)
        return Work(trips=trips, flops=fwd_flops * 2.0, min_bytes=3 * q_bytes + 4 * kv_bytes,
                    kv_tile_bytes=2 * block_q * d * size)
    count = -(-problem.q_len // block_q)
    trips = _lowered(lambda i: kv_ranges(i, block_q=block_q, block_k=block_k, kv_len=problem.kv_len,
                                         masking=masking), count, one_loop)
    if role == "dq":
        return Work(trips=trips, flops=fwd_flops * 1.5, min_bytes=3 * q_bytes + 2 * kv_bytes,
                    kv_tile_bytes=2 * block_k * d * size)
    return Work(trips=trips, flops=fwd_flops, min_bytes=2 * q_bytes + 2 * kv_bytes,
                kv_tile_bytes=2 * block_k * d * size)


def mha_forward(batch: int, seq_len: int, heads: int, head_dim: int, itemsize: int, block_q: int, block_k: int,
                causal: bool) -> Work:
    """JAX 0.10.2's `mha` forward: q block i runs ceil((i + 1) * block_q / block_k) key blocks when causal
    (`mha_forward_kernel`'s upper bound), else all of them; one loop, masked on every block when causal."""
    block_q, block_k = min(block_q, seq_len), min(block_k, seq_len)
    count = -(-seq_len // block_q)
    full = -(-seq_len // block_k)
    trips = tuple(((-(-(block_q * (i + 1)) // block_k)) if causal else full,) for i in range(count))
    flops = 4.0 * batch * heads * seq_len * seq_len * head_dim * (0.5 if causal else 1.0)
    nbytes = 4.0 * batch * seq_len * heads * head_dim * itemsize
    return Work(trips=trips, flops=flops, min_bytes=nbytes, kv_tile_bytes=2 * block_k * head_dim * itemsize)


def role_of(kernel_name: str) -> str | None:
    """forward / dq / dkv for our kernels' names, None for anything else."""
    if not kernel_name.startswith("flash_attention"):
        return None
    if kernel_name.endswith("dkv"):
        return "dkv"
    return "dq" if kernel_name.endswith("dq") else "forward"
