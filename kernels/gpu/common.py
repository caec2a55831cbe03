"""Pieces shared by the forward and backward kernels: masked tile loads and stores, the static mask (`Masking`:
window, causal, soft cap, run-time lengths), tile masks, and the block ranges each program visits.

Nothing is padded in HBM: each kernel sees whole unpadded sequences and reads or writes power-of-two tiles
(Triton's rule) with a mask over the rows past the sequence end and the columns past head_dim, so an overhanging
tile neither reads nor writes outside its array (masked reads give `other`, never memory).

Scores are kept in base 2 (scale folded with log2(e)) so the kernels use exp2, which is what the GPU computes
natively. A masked score is -inf and the running max starts at a finite very negative value, so masked entries
give exactly 0 (exp2(-inf - finite)) and a row that sees no key never forms inf - inf.

Blocks wholly outside the mask (out of the window, past the causal diagonal, past a row's run-time length) are
never visited: `kv_ranges` and `q_ranges` give each program the loop bounds that leave them out, so the work falls
with the window. Run-time lengths are int32 [batch] refs read at program_id(1) and bound the loops dynamically.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels.masking import EMPTY_ROW_LSE, Band, ceildiv, floordiv, maximum, minimum, select
from kernels.masking import visible as visible_pairs

LOG2E = math.log2(math.e)
FLOAT32_TINY = float(np.finfo(np.float32).tiny)  # the smallest normal float32
# Start of the running max: finite, so `m_prev - m_new` is never inf - inf.
M_INIT = -0.5 * float(jnp.finfo(jnp.float32).max)
LSE_EMPTY = EMPTY_ROW_LSE  # stored in base 2 here: exp2(s - LSE_EMPTY) == 0 for every score too


def tile_mask(start, block: int, length: int | None, width: int = 0, head_dim: int = 0):
    """Mask of a [block] or [block, width] tile at row `start`: rows < length (skipped when length is None)
    and columns < head_dim (skipped when width == head_dim). None when nothing needs masking."""
    rows = None if length is None else (start + jnp.arange(block, dtype=jnp.int32)) < length
    if width == 0:
        return rows
    cols = None if width == head_dim else jnp.arange(width, dtype=jnp.int32) < head_dim
    if rows is None:
        return None if cols is None else cols[None, :]
    rows = rows[:, None]
    return rows if cols is None else rows & cols[None, :]


def load(view, mask, other=0):
    """A tile of `view` (a ref.at[...] window); masked entries read as `other` without touching memory."""
    if mask is None:
        return pltriton.load(view)
    return pltriton.load(view, mask=jnp.broadcast_to(mask, view.shape), other=other)


def store(view, value, mask) -> None:
    """Write a tile to `view`; masked entries are not written."""
    if mask is None:
        pltriton.store(view, value)
    else:
        pltriton.store(view, value, mask=jnp.broadcast_to(mask, view.shape))


def rows_at(start, block: int) -> pl.Slice:
    """The `block` rows from `start` (a multiple of `block`, which lets Triton vectorise the addresses)."""
    return pl.ds(pl.multiple_of(start, block), block)


@dataclass(frozen=True)
class Masking:
    """The static mask of one call: the band of visible pairs (window and causal, kernels.masking), the soft cap,
    and whether per-row lengths come at run time. Every kernel derives its loop bounds and its tile masks from
    this one description."""

    band: Band = Band()
    softcap: float | None = None
    lengths: bool = False


def visible(q_start, k_start, block_q: int, block_k: int, band: Band | None, *, kv_len=None, q_ids=None,
            kv_ids=None):
    """Boolean [block_q, block_k] tile of which key each query sees, or None when every key is visible.

    The bounds of `band` apply (None: not in this tile); `kv_len` (static, or a run-time length) masks keys at or
    past it; `q_ids` [block_q] and `kv_ids` [block_k] are segment ids of the tile.
    """
    band = band if band is not None else Band()
    cols = k_start + jnp.arange(block_k, dtype=jnp.int32)[None, :]
    rows = q_start + jnp.arange(block_q, dtype=jnp.int32)[:, None] if band.bounded else None
    mask = visible_pairs(rows, cols, band, kv_len=kv_len)
    if q_ids is not None:
        same = q_ids[:, None] == kv_ids[None, :]
        mask = same if mask is None else mask & same
    return mask


Ranges = list  # [(start, stop, masked)]: block loops run in order; masked ones build the tile mask


def kv_ranges(i, *, block_q: int, block_k: int, kv_len: int, masking: Masking, one_loop: bool,
              q_len_b=None, kv_len_b=None) -> Ranges:
    """For q block `i`: the key-block loops (start, stop, masked) its program runs. Blocks outside them are wholly
    out of the window, past the causal diagonal or past the row's run-time length `kv_len_b`, and are never
    visited; a q block wholly past the row's run-time `q_len_b` visits nothing.

    Split loops: masked blocks at the window's left edge, plain blocks (every key visible to every row: no mask is
    built), masked blocks at the right edge / causal diagonal / ragged or run-time tail. With `one_loop` every
    visited block is plain or every one is masked, so the kernel runs one loop: on Hopper, two loops in a row make
    ptxas serialize the wgmma pipeline (warning C7515, "non wgmma instructions defining accumulator registers of a
    wgmma between start and end of the pipeline stage"), at the price of the mask's compare and select on every
    score tile. Elsewhere split loops are better: a mask live through the whole loop costs registers (forward
    128x64, 8 warps, head_dim 72 on A100: 255 registers and spills vs 207).
    """
    left, right = masking.band.left, masking.band.right
    first_row = i * block_q
    end_row = (i + 1) * block_q  # past the block's last row
    limit = kv_len  # keys at or past it are never seen by this block
    if q_len_b is not None:
        end_row = jnp.minimum(end_row, q_len_b)
        limit = jnp.where(first_row < q_len_b, kv_len if kv_len_b is None else kv_len_b, 0)
    elif kv_len_b is not None:
        limit = kv_len_b
    first, band_stop = masking.band.kv_blocks(first_row, end_row, block_k)
    stop = minimum(ceildiv(kv_len, block_k), ceildiv(limit, block_k))
    if band_stop is not None:
        stop = minimum(stop, band_stop)
    start = 0
    if left is not None:
        start = minimum(first, stop)
        stop = select(maximum(first_row - left, 0) < limit, stop, start)  # the window starts past the last key
    tail = not isinstance(limit, int) or limit % block_k != 0
    if one_loop:
        return [(start, stop, masking.band.bounded or tail)]
    plain_stop = floordiv(limit, block_k)  # <= stop
    if right is not None:
        plain_stop = minimum(plain_stop, floordiv(first_row + (right + 1), block_k))
    plain_start = start
    if left is not None:  # keep start <= plain_start <= plain_stop <= stop
        plain_start = minimum(maximum(start, ceildiv(maximum(end_row - (left + 1), 0), block_k)), stop)
        plain_stop = minimum(maximum(plain_stop, plain_start), stop)
    return [(start, plain_start, True), (plain_start, plain_stop, False), (plain_stop, stop, True)]


def q_ranges(j, *, block_q: int, block_k: int, q_len: int, masking: Masking, q_len_b=None,
             kv_len_b=None) -> Ranges:
    """For key block `j` (the dk/dv kernel): the q-block loops (start, stop, masked). q blocks whose rows see none
    of its keys (out of the window, before the causal diagonal, past the row's run-time `q_len_b`) are never
    visited, and a key block wholly past the run-time `kv_len_b` visits nothing. Masked blocks straddle an edge."""
    left, right = masking.band.left, masking.band.right
    stop = ceildiv(q_len, block_q)
    first_key = j * block_k
    last_key = (j + 1) * block_k - 1
    if q_len_b is not None:
        stop = jnp.minimum(stop, ceildiv(q_len_b, block_q))
    if kv_len_b is not None:
        stop = jnp.where(first_key < kv_len_b, stop, 0)
        last_key = jnp.minimum(last_key, kv_len_b - 1)  # keys past the length need no gradient
    first, band_stop = masking.band.q_blocks(first_key, last_key + 1, block_q)
    if band_stop is not None:
        stop = minimum(stop, band_stop)
    start = plain_start = 0
    if right is not None:  # rows from first_key - right see a key of the block, from last_key - right all of them
        first_row = maximum(first_key - right, 0)
        start = minimum(first, stop)
        if right > 0 or q_len_b is not None:  # that row may be past the last row: nothing to see
            stop = select(first_row < (q_len if q_len_b is None else q_len_b), stop, start)
        plain_start = maximum(start, minimum(ceildiv(last_key - right, block_q), stop))
    plain_stop = stop if left is None else minimum(maximum(floordiv(first_key + left + 1, block_q), plain_start),
                                                   stop)
    return [(start, plain_start, True), (plain_start, plain_stop, False), (plain_stop, stop, True)]


def run_ranges(ranges: Ranges, step, carry):
    """Run `step(j, carry, masked=...)` over the block ranges in order (statically empty ones are left out)."""
    for start, stop, masked in ranges:
        carry = block_loop(start, stop, functools.partial(step, masked=masked), carry)
    return carry


def scores(q, k, scale: float, softcap: float | None):
    """Base-2 scores of a tile, soft-capped (cap * tanh(s / cap) of the natural scores s) when `softcap` is set;
    also tanh's value for the backward's (1 - t^2), else None."""
    s = dot_nt(q, k)
    if softcap is None:
        return s * (scale * LOG2E), None
    factor = scale / softcap
    if 0.0 < abs(factor) < FLOAT32_TINY:  # one factor would be subnormal (flushed to zero): two normal ones
        t = jnp.tanh((s * scale) * (1.0 / softcap))
    else:
        t = jnp.tanh(s * factor)
    return t * (softcap * LOG2E), t


def row_length(ref):
    """This program's run-time length from a [batch] int32 ref (batch is grid axis 1), or None without one."""
    return None if ref is None else ref[pl.program_id(1)]


def block_loop(lower, upper, body, carry):
    """lax.fori_loop, left out when its bounds are static and empty (nothing to lower for Triton)."""
    if isinstance(lower, int) and isinstance(upper, int) and lower >= upper:
        return carry
    return lax.fori_loop(lower, upper, body, carry)


def dot_nt(a: jax.Array, b: jax.Array) -> jax.Array:
    """a @ b.T with float32 accumulation."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def dot_nn(a: jax.Array, b: jax.Array) -> jax.Array:
    """a @ b with float32 accumulation."""
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def dot_tn(a: jax.Array, b: jax.Array) -> jax.Array:
    """a.T @ b with float32 accumulation."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def kv_head(h, groups: int):
    """The kv head that query head `h` reads (GQA/MQA), for BlockSpec index maps; no repeated k/v in memory."""
    return h if groups == 1 else lax.div(h, np.int32(groups))
