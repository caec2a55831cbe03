"""Pieces shared by the forward and backward kernels: masked tile loads and stores, masks and causal block ranges.

Nothing is padded in HBM: each kernel sees whole unpadded sequences and reads or writes power-of-two tiles
(Triton's rule) with a mask over the rows past the sequence end and the columns past head_dim, so an overhanging
tile neither reads nor writes outside its array (masked reads give `other`, never memory).

Scores are kept in base 2 (scale folded with log2(e)) so the kernels use exp2, which is what the GPU computes
natively. A masked score is -inf and the running max starts at a finite very negative value, so masked entries
give exactly 0 (exp2(-inf - finite)) and a row that sees no key never forms inf - inf.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

LOG2E = math.log2(math.e)
# Start of the running max: finite, so `m_prev - m_new` is never inf - inf.
M_INIT = -0.5 * float(jnp.finfo(jnp.float32).max)
# logsumexp stored for rows that see no key (and for padded rows): exp2(s - BIG) == 0 for every score.
LSE_EMPTY = 1e30


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


def cdiv(a, b: int):
    """Ceil division of a non-negative traced int32 by a static int (`//` on program ids trips Triton)."""
    return lax.div(a + (b - 1), np.int32(b))


def visible(
    q_start, k_start, block_q: int, block_k: int, *,
    causal: bool, kv_len: int | None = None, q_ids=None, kv_ids=None,
):
    """Boolean [block_q, block_k] tile of which key each query sees, or None when every key is visible.

    `kv_len` masks padded keys; `q_ids` [block_q] and `kv_ids` [block_k] are segment ids of the tile.
    """
    mask = None

    def both(a, b):
        return b if a is None else a & b

    cols = k_start + jnp.arange(block_k, dtype=jnp.int32)[None, :]
    if causal:
        rows = q_start + jnp.arange(block_q, dtype=jnp.int32)[:, None]
        mask = both(mask, cols <= rows)
    if kv_len is not None:
        mask = both(mask, cols < kv_len)
    if q_ids is not None:
        mask = both(mask, q_ids[:, None] == kv_ids[None, :])
    return mask


def kv_blocks(i, *, block_q: int, block_k: int, kv_len: int, causal: bool, one_loop: bool):
    """For q block `i`: (n_plain, n_all): key blocks [0, n_plain) need no mask, [n_plain, n_all) need the causal
    or ragged-tail mask, blocks >= n_all are fully masked (skipped).

    With `one_loop` every visited block is plain or every one is masked, so the kernel runs one loop: on Hopper,
    two loops in a row make ptxas serialize the wgmma pipeline (warning C7515, "non wgmma instructions defining
    accumulator registers of a wgmma between start and end of the pipeline stage"), at the price of the mask's
    compare and select on every score tile. Elsewhere two loops are better: a mask live through the whole loop
    costs registers (forward 128x64, 8 warps, head_dim 72 on A100: 255 registers and spills vs 207).
    """
    n_all = -(-kv_len // block_k)
    if one_loop:
        if causal:
            return 0, jnp.minimum(n_all, cdiv((i + 1) * block_q, block_k))
        return (0 if kv_len % block_k else n_all), n_all
    n_plain = kv_len // block_k
    if causal:
        # Every key of block j is <= the first row i*block_q  iff  (j+1)*block_k - 1 <= i*block_q.
        n_plain = jnp.minimum(n_plain, lax.div(i * block_q + 1, np.int32(block_k)))
        n_all = jnp.minimum(n_all, cdiv((i + 1) * block_q, block_k))
    return n_plain, n_all


def wgmma_device(device_kind: str | None) -> bool:
    """Whether the GPU is a Hopper (wgmma) one; None (interpret mode) counts as Hopper, as in the config checks."""
    kind = (device_kind or "h100").lower()
    return any(tag in kind for tag in ("h100", "h200", "h800", "gh200", "h20"))


def q_blocks(j, *, block_q: int, block_k: int, q_blocks_total: int, causal: bool):
    """For key block `j`: (first, unmasked): q blocks before `first` see none of its keys (skipped), blocks in
    [first, unmasked) need the causal mask, blocks from `unmasked` on see all of them."""
    if not causal:
        return 0, 0
    first = jnp.minimum(lax.div(j * block_k, np.int32(block_q)), q_blocks_total)
    unmasked = jnp.minimum(cdiv((j + 1) * block_k - 1, block_q), q_blocks_total)
    return first, jnp.maximum(first, unmasked)


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
