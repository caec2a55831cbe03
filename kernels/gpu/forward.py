"""Forward kernel: one program per (q block, batch, head) streams the key blocks with an online softmax.

The [q_len, kv_len] scores never leave the program; only the output and the base-2 logsumexp (for the backward)
are written. Key blocks out of the sliding window, past the causal diagonal or past the row's run-time length are
not visited at all (the loop bounds come from `kv_ranges`), and the mask is only built for the blocks that straddle
a window edge, the diagonal or a tail (split loops; on Hopper one loop whose plain blocks branch past the mask).
The scale folds into the max subtraction (one FFMA per score). Soft-capping bends the scores before the mask.
Inputs and outputs stay unpadded: tiles past the sequence end or head_dim are masked loads and stores.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels.gpu.common import (
    LSE_EMPTY, M_INIT, Masking, dot_nn, exp2, fma, kv_head, kv_ranges, load, masked_where, row_length, rows_at,
    run_ranges, scores, store, tile_mask, visible,
)
from kernels.gpu.config import Config, padded_head_dim
from kernels.cost import estimate


def _forward_kernel(
    q_ref, k_ref, v_ref, *refs,
    scale: float, masking: Masking, segments: bool, q_len: int, kv_len: int, head_dim: int, block_q: int,
    block_k: int, one_loop: bool, native: bool,
):
    # Refs hold the whole unpadded sequence of this (batch, head): [q_len, head_dim], [kv_len, head_dim], [q_len];
    # then the [batch] run-time lengths and the outputs.
    refs = list(refs)
    q_ids_ref, kv_ids_ref = (refs.pop(0), refs.pop(0)) if segments else (None, None)
    q_len_ref, kv_len_ref = (refs.pop(0), refs.pop(0)) if masking.lengths else (None, None)
    o_ref, lse_ref = refs[:2]
    q_len_b, kv_len_b = row_length(q_len_ref), row_length(kv_len_ref)
    width = padded_head_dim(head_dim)
    cols = pl.ds(np.int32(0), width)
    i = pl.program_id(0)
    q_start = i * block_q
    q_rows = rows_at(q_start, block_q)
    ragged_q = q_len % block_q != 0
    q_mask = tile_mask(q_start, block_q, q_len if ragged_q else None, width, head_dim)
    row_mask = tile_mask(q_start, block_q, q_len if ragged_q else None)
    q = load(q_ref.at[q_rows, cols], q_mask)
    q_ids = load(q_ids_ref.at[q_rows], row_mask) if segments else None
    padded_kv = kv_len % block_k != 0

    def step(j, carry, *, masked):
        # masked: a Python bool (split loops), or a traced one (one loop: the edge mask behind a branch)
        acc, m, l = carry
        k_start = j * block_k
        k_rows = rows_at(k_start, block_k)
        tail = masked is not False and padded_kv  # only the masked steps can reach past kv_len
        kv_mask = tile_mask(k_start, block_k, kv_len if tail else None, width, head_dim)
        k = load(k_ref.at[k_rows, cols], kv_mask)
        v = load(v_ref.at[k_rows, cols], kv_mask)
        x, factor, _ = scores(q, k, scale, masking.softcap)  # base-2 scores x * factor
        kv_ids = None
        if kv_ids_ref is not None:
            kv_ids = load(kv_ids_ref.at[k_rows], tile_mask(k_start, block_k, kv_len if tail else None), other=-1)
        limit = kv_len_b if kv_len_b is not None else kv_len if tail else None
        x = masked_where(
            masked,
            lambda: visible(q_start, k_start, block_q, block_k, masking.band, kv_len=limit, q_ids=q_ids,
                            kv_ids=kv_ids),
            lambda: visible(q_start, k_start, block_q, block_k, None, q_ids=q_ids, kv_ids=kv_ids),
            x,
        )
        m_new = jnp.maximum(m, jnp.max(x, axis=1) * factor)
        alpha = exp2(m - m_new, native=native)
        p = exp2(fma(x, factor, -m_new[:, None], native=native), native=native)  # one FFMA per score
        l_new = l * alpha + jnp.sum(p, axis=1)
        acc_new = acc * alpha[:, None] + dot_nn(p.astype(v.dtype), v)
        return acc_new, m_new, l_new

    carry = (
        jnp.zeros((block_q, width), jnp.float32),
        jnp.full((block_q,), M_INIT, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    ranges = kv_ranges(i, block_q=block_q, block_k=block_k, kv_len=kv_len, masking=masking, q_len_b=q_len_b,
                       kv_len_b=kv_len_b)
    acc, m, l = run_ranges(ranges, step, carry, one_loop=one_loop)

    seen = l > 0.0
    out = acc / jnp.where(seen, l, 1.0)[:, None]
    if q_len_b is not None:  # rows past the row's length output zeros and an empty logsumexp
        seen = seen & (q_start + jnp.arange(block_q, dtype=jnp.int32) < q_len_b)
        out = jnp.where(seen[:, None], out, 0.0)
    store(o_ref.at[q_rows, cols], out.astype(o_ref.dtype), q_mask)
    store(lse_ref.at[q_rows], jnp.where(seen, m + jnp.log2(jnp.where(seen, l, 1.0)), LSE_EMPTY), row_mask)


def forward(
    q: jax.Array, k: jax.Array, v: jax.Array, q_ids: jax.Array | None, kv_ids: jax.Array | None,
    q_lengths: jax.Array | None = None, kv_lengths: jax.Array | None = None, *,
    scale: float, masking: Masking, config: Config, interpret: bool, one_loop: bool = True,
):
    """Attention output [b, q_len, h, d] and base-2 logsumexp [b, h, q_len] (float32); no padded copies.
    `q_lengths`/`kv_lengths`: int32 [batch], both given iff `masking.lengths`. `one_loop`: one loop over the key
    blocks with the mask behind a branch (for Hopper, see `run_ranges`)."""
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    bq, bk = config.block_q, config.block_k
    segments = q_ids is not None
    q_blocks = -(-q_len // bq)

    q_spec = pl.BlockSpec((None, q_len, None, head_dim), lambda i, b, h: (b, 0, h, 0))
    kv_spec = pl.BlockSpec((None, kv_len, None, head_dim), lambda i, b, h: (b, 0, kv_head(h, groups), 0))
    in_specs = [q_spec, kv_spec, kv_spec]
    args = [q, k, v]
    if segments:
        in_specs += [
            pl.BlockSpec((None, q_len), lambda i, b, h: (b, 0)),
            pl.BlockSpec((None, kv_len), lambda i, b, h: (b, 0)),
        ]
        args += [q_ids, kv_ids]
    if masking.lengths:
        in_specs += [pl.BlockSpec((batch,), lambda i, b, h: (0,))] * 2
        args += [q_lengths, kv_lengths]
    kernel = functools.partial(
        _forward_kernel, scale=scale, masking=masking, segments=segments, q_len=q_len, kv_len=kv_len,
        head_dim=head_dim, block_q=bq, block_k=bk, one_loop=one_loop, native=not interpret,
    )
    out_specs = [q_spec, pl.BlockSpec((None, None, q_len), lambda i, b, h: (b, h, 0))]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((batch, heads, q_len), jnp.float32)]
    itemsize = q.dtype.itemsize
    nbytes = (2 * q.size + k.size + v.size) * itemsize + batch * heads * q_len * 4
    return pl.pallas_call(
        kernel,
        grid=(q_blocks, batch, heads),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=pltriton.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        cost_estimate=estimate(batch=batch, heads=heads, q_len=q_len, kv_len=kv_len, head_dim=head_dim,
                               band=masking.band, softcap=masking.softcap, matmuls=2, exps=1, nbytes=nbytes),
        interpret=interpret,
        name="flash_attention_fwd",
    )(*args)
