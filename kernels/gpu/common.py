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

from kernels.masking import EMPTY_ROW_LSE, Band, ceildiv, floordiv, is_static, maximum, minimum, select
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


def kv_ranges(i, *, block_q: int, block_k: int, kv_len: int, masking: Masking, q_len_b=None,
              kv_len_b=None) -> Ranges:
    """For q block `i`: the key-block loops (start, stop, masked) its program runs. Blocks outside them are wholly
    out of the window, past the causal diagonal or past the row's run-time length `kv_len_b`, and are never
    visited; a q block wholly past the row's run-time `q_len_b` visits nothing.

    Three ranges: masked blocks at the window's left edge, plain blocks (every key visible to every row: no mask
    is built), masked blocks at the right edge / causal diagonal / ragged or run-time tail. How they are run (as
    three loops, or as one with the mask behind a branch) is `run_ranges`'s business.
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


def edge_block(j, ranges: Ranges):
    """Whether block `j` of the ranges' span is a masked (edge) one: False when no range is masked (statically),
    else a traced bool (`j` outside the plain range)."""
    (start, plain_start, _), (_, plain_stop, _), (_, stop, _) = ranges
    edges = []
    if not (is_static(start, plain_start) and start == plain_start):
        edges.append(j < plain_start)
    if not (is_static(plain_stop, stop) and plain_stop == stop):
        edges.append(j >= plain_stop)
    if not edges:
        return False
    return edges[0] if len(edges) == 1 else edges[0] | edges[1]


def loop_spans(ranges: Ranges, one_loop: bool) -> list[tuple]:
    """(start, stop) of each loop the ranges run as: the three in order, or (`one_loop`) one over their span."""
    return [(ranges[0][0], ranges[-1][1])] if one_loop else [(a, b) for a, b, _ in ranges]


def statically_empty(lower, upper) -> bool:
    """Whether a loop's bounds are Python ints with nothing between them (no loop is lowered for it)."""
    return isinstance(lower, int) and isinstance(upper, int) and lower >= upper


def run_ranges(ranges: Ranges, step, carry, *, one_loop: bool = False):
    """Run `step(j, carry, masked=...)` over the block ranges in order (statically empty ones are left out).

    With `one_loop` (Hopper) they run as one loop and `masked` is `edge_block(j)`: a traced bool, so the step puts
    the mask behind a branch (`masked_where`) that plain blocks jump over. Two loops in a row make ptxas serialize
    the wgmma pipeline of the forward and dq kernels (warning C7515, "non wgmma instructions defining accumulator
    registers of a wgmma between start and end of the pipeline stage": the accumulator crosses from one loop into
    the next), which costs more than the mask. Elsewhere split loops are better: a mask live through the whole loop
    costs registers (forward 128x64, 8 warps, head_dim 72 on A100: 255 registers and spills vs 207).
    """
    if one_loop:
        ((start, stop),) = loop_spans(ranges, True)
        return block_loop(start, stop, lambda j, c: step(j, c, masked=edge_block(j, ranges)), carry)
    for start, stop, masked in ranges:
        carry = block_loop(start, stop, functools.partial(step, masked=masked), carry)
    return carry


def masked_where(masked, edge_mask, plain_mask, x):
    """x with the entries outside the visible mask set to -inf: `edge_mask()` on a masked block, `plain_mask()`
    (segment ids, or None) on a plain one; `masked` is a Python bool, or a traced one (`edge_block`): then the edge
    mask is built only on the branch that masked blocks take."""
    def apply(make):
        mask = make()
        return x if mask is None else jnp.where(mask, x, -jnp.inf)

    if isinstance(masked, bool):
        return apply(edge_mask if masked else plain_mask)
    return lax.cond(masked, lambda: apply(edge_mask), lambda: apply(plain_mask))


def fma(x, y, z, *, native: bool):
    """x * y + z in one rounding, broadcast to x's shape. XLA's Triton emits its float multiplies and adds with
    explicit rounding (`mul.rn`, `add.rn`), which ptxas never fuses, so the native kernel asks for `fma.rn.f32`
    (one FFMA instead of an FMUL and an FADD); interpret mode computes the same in two roundings."""
    if not native:
        return x * y + z
    args = [jnp.broadcast_to(jnp.asarray(a, jnp.float32), x.shape) for a in (x, y, z)]
    return pltriton.elementwise_inline_asm("fma.rn.f32 $0, $1, $2, $3;", args=args, constraints="=f,f,f,f", pack=1,
                                           result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)])[0]


def exp2(x, *, native: bool):
    """2**x; natively `ex2.approx.ftz.f32`: results below 2**-126 (probabilities of a score 126 below its row's
    max) flush to zero, which drops the range fix-up (an FSETP and two FMULs per element) that jnp.exp2's
    non-flushing instruction gets from ptxas. Such a probability is below float32's resolution of the row sum."""
    if not native:
        return jnp.exp2(x)
    return pltriton.elementwise_inline_asm("ex2.approx.ftz.f32 $0, $1;", args=[x], constraints="=f,f", pack=1,
                                           result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)])[0]


def scores(q, k, scale: float, softcap: float | None):
    """(x, factor, t) of a tile: its base-2 scores are x * factor, soft-capped (cap * tanh(s / cap) of the natural
    scores s) when `softcap` is set; t is tanh's value for the backward's (1 - t^2), else None.

    The factor is left to the caller so that it folds into the subtraction that follows (x * factor - m: one FFMA
    per score instead of an FMUL and an FADD) and into the row max (max(x) * factor, exact since rounding is
    monotone). That needs factor > 0; for a scale <= 0, x comes scaled and the factor is 1.
    """
    s = dot_nt(q, k)
    if softcap is None:
        factor = scale * LOG2E
        return (s, factor, None) if factor > 0 else (s * factor, 1.0, None)
    ratio = scale / softcap
    if 0.0 < abs(ratio) < FLOAT32_TINY:  # one factor would be subnormal (flushed to zero): two normal ones
        t = jnp.tanh((s * scale) * (1.0 / softcap))
    else:
        t = jnp.tanh(s * ratio)
    return t, softcap * LOG2E, t  # softcap > 0


def row_length(ref):
    """This program's run-time length from a [batch] int32 ref (batch is grid axis 1), or None without one."""
    return None if ref is None else ref[pl.program_id(1)]


def block_loop(lower, upper, body, carry):
    """lax.fori_loop, left out when its bounds are static and empty (nothing to lower for Triton)."""
    if statically_empty(lower, upper):
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
