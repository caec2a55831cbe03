"""Forward kernel: one program per (q block, batch, head) streams the key blocks with an online softmax.

The [q_len, kv_len] scores never leave the program; only the output and the base-2 logsumexp (for the backward)
are written. Key blocks past the causal diagonal are not visited at all, and the mask is only built for the blocks
that straddle the diagonal or the ragged tail (on Hopper: for every visited block of a causal or ragged problem, in
one loop; see `kv_blocks`). Inputs and outputs stay unpadded: tiles past the sequence end or head_dim are masked
loads and stores.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels.cost import estimate
from kernels.gpu.common import (
    LOG2E, LSE_EMPTY, M_INIT, block_loop, dot_nn, dot_nt, kv_blocks, kv_head, load, rows_at, store, tile_mask,
    visible,
)
from kernels.gpu.config import Config, padded_head_dim


def _forward_kernel(
    q_ref, k_ref, v_ref, *refs,
    scale2: float, causal: bool, segments: bool, q_len: int, kv_len: int, head_dim: int, block_q: int,
    block_k: int, one_loop: bool,
):
    # Refs hold the whole unpadded sequence of this (batch, head): [q_len, head_dim], [kv_len, head_dim], [q_len].
    if segments:
        q_ids_ref, kv_ids_ref, o_ref, lse_ref = refs
    else:
        o_ref, lse_ref = refs
        kv_ids_ref = None
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

    def step(j, carry, *, masked: bool):
        acc, m, l = carry
        k_start = j * block_k
        k_rows = rows_at(k_start, block_k)
        tail = masked and padded_kv  # only the masked steps can reach past kv_len
        kv_mask = tile_mask(k_start, block_k, kv_len if tail else None, width, head_dim)
        k = load(k_ref.at[k_rows, cols], kv_mask)
        v = load(v_ref.at[k_rows, cols], kv_mask)
        s = dot_nt(q, k) * scale2
        kv_ids = None
        if kv_ids_ref is not None:
            kv_ids = load(kv_ids_ref.at[k_rows], tile_mask(k_start, block_k, kv_len if tail else None), other=-1)
        mask = visible(
            q_start, k_start, block_q, block_k,
            causal=causal and masked, kv_len=kv_len if tail else None, q_ids=q_ids, kv_ids=kv_ids,
        )
        if mask is not None:
            s = jnp.where(mask, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        l_new = l * alpha + jnp.sum(p, axis=1)
        acc_new = acc * alpha[:, None] + dot_nn(p.astype(v.dtype), v)
        return acc_new, m_new, l_new

    carry = (
        jnp.zeros((block_q, width), jnp.float32),
        jnp.full((block_q,), M_INIT, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    n_full, n_all = kv_blocks(i, block_q=block_q, block_k=block_k, kv_len=kv_len, causal=causal,
                              one_loop=one_loop)
    carry = block_loop(0, n_full, functools.partial(step, masked=False), carry)
    acc, m, l = block_loop(n_full, n_all, functools.partial(step, masked=True), carry)

    seen = l > 0.0
    store(o_ref.at[q_rows, cols], (acc / jnp.where(seen, l, 1.0)[:, None]).astype(o_ref.dtype), q_mask)
    store(lse_ref.at[q_rows], jnp.where(seen, m + jnp.log2(jnp.where(seen, l, 1.0)), LSE_EMPTY), row_mask)


def forward(
    q: jax.Array, k: jax.Array, v: jax.Array, q_ids: jax.Array | None, kv_ids: jax.Array | None, *,
    scale: float, causal: bool, config: Config, interpret: bool, one_loop: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Attention output [b, q_len, h, d] and base-2 logsumexp [b, h, q_len] (float32); no padded copies.
    `one_loop`: one masked loop over the key blocks (for Hopper, see `kv_blocks`) instead of plain + masked."""
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    bq, bk = config.block_q, config.block_k
    segments = q_ids is not None

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
    kernel = functools.partial(
        _forward_kernel, scale2=scale * LOG2E, causal=causal, segments=segments, q_len=q_len, kv_len=kv_len,
        head_dim=head_dim, block_q=bq, block_k=bk, one_loop=one_loop,
    )
    itemsize = q.dtype.itemsize
    nbytes = (2 * q.size + k.size + v.size) * itemsize + batch * heads * q_len * 4
    out, lse = pl.pallas_call(
        kernel,
        grid=(-(-q_len // bq), batch, heads),
        in_specs=in_specs,
        out_specs=[q_spec, pl.BlockSpec((None, None, q_len), lambda i, b, h: (b, h, 0))],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((batch, heads, q_len), jnp.float32),
        ],
        compiler_params=pltriton.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        cost_estimate=estimate(batch=batch, heads=heads, q_len=q_len, kv_len=kv_len, head_dim=head_dim,
                               causal=causal, matmuls=2, exps=1, nbytes=nbytes),
        interpret=interpret,
        name="flash_attention_fwd",
    )(*args)
    return out, lse
