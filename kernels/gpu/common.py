"""Pieces shared by the forward and backward kernels: padding, masks and the causal block ranges.

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

LOG2E = math.log2(math.e)
# Start of the running max: finite, so `m_prev - m_new` is never inf - inf.
M_INIT = -0.5 * float(jnp.finfo(jnp.float32).max)
# logsumexp stored for rows that see no key (and for padded rows): exp2(s - BIG) == 0 for every score.
LSE_EMPTY = 1e30


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pad_axis(x: jax.Array, axis: int, size: int, value: float | int = 0) -> jax.Array:
    """Pad `x` along `axis` at the end up to `size` (no copy when already that size)."""
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


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


def kv_blocks(i, *, block_q: int, block_k: int, kv_len: int, causal: bool):
    """For q block `i`: (n_full, n_all): key blocks [0, n_full) need no causal/padding mask, [n_full, n_all)
    need one, blocks >= n_all are fully masked (skipped)."""
    n_full = kv_len // block_k
    n_all = -(-kv_len // block_k)
    if causal:
        # Every key of block j is <= the first row i*block_q  iff  (j+1)*block_k - 1 <= i*block_q.
        n_full = jnp.minimum(n_full, lax.div(i * block_q + 1, np.int32(block_k)))
        n_all = jnp.minimum(n_all, cdiv((i + 1) * block_q, block_k))
    return n_full, n_all


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
