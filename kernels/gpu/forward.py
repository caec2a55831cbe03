"""Forward kernel: one program per (q block, batch, head) streams the key blocks with an online softmax.

The [q_len, kv_len] scores never leave the program; only the output and the base-2 logsumexp (for the backward)
are written. Key blocks past the causal diagonal are not visited at all, and the mask is only built for the blocks
that straddle the diagonal or the padded tail (and always with segment ids, which are data).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels.gpu.common import (
    LOG2E, LSE_EMPTY, M_INIT, block_loop, dot_nn, dot_nt, kv_blocks, kv_head, pad_axis, round_up, visible,
)
from kernels.gpu.config import Config, padded_head_dim


def _forward_kernel(
    q_ref, k_ref, v_ref, *refs,
    scale2: float, causal: bool, segments: bool, kv_len: int, block_q: int, block_k: int,
):
    if segments:
        q_ids_ref, kv_ids_ref, o_ref, lse_ref = refs
        q_ids = q_ids_ref[...]
    else:
        o_ref, lse_ref = refs
        q_ids = kv_ids_ref = None
    i = pl.program_id(0)
    q_start = i * block_q
    q = q_ref[...]
    padded_kv = kv_len % block_k != 0

    def step(j, carry, *, masked: bool):
        acc, m, l = carry
        k_start = pl.multiple_of(j * block_k, block_k)
        k = k_ref[pl.ds(k_start, block_k), :]
        v = v_ref[pl.ds(k_start, block_k), :]
        s = dot_nt(q, k) * scale2
        mask = visible(
            q_start, k_start, block_q, block_k,
            causal=causal and masked,
            kv_len=kv_len if (masked and padded_kv) else None,
            q_ids=q_ids, kv_ids=None if kv_ids_ref is None else kv_ids_ref[pl.ds(k_start, block_k)],
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
        jnp.zeros((block_q, q.shape[-1]), jnp.float32),
        jnp.full((block_q,), M_INIT, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    n_full, n_all = kv_blocks(i, block_q=block_q, block_k=block_k, kv_len=kv_len, causal=causal)
    carry = block_loop(0, n_full, functools.partial(step, masked=False), carry)
    acc, m, l = block_loop(n_full, n_all, functools.partial(step, masked=True), carry)

    seen = l > 0.0
    o_ref[...] = (acc / jnp.where(seen, l, 1.0)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log2(jnp.where(seen, l, 1.0)), LSE_EMPTY)


def forward(
    q: jax.Array, k: jax.Array, v: jax.Array, q_ids: jax.Array | None, kv_ids: jax.Array | None, *,
    scale: float, causal: bool, config: Config, interpret: bool,
) -> tuple[jax.Array, jax.Array]:
    """Attention output [b, q_len, h, d] and base-2 logsumexp [b, h, q_len] (float32) of unpadded inputs."""
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    bq, bk = config.block_q, config.block_k
    lq, lk, dp = round_up(q_len, bq), round_up(kv_len, bk), padded_head_dim(head_dim)
    qp = pad_axis(pad_axis(q, 1, lq), 3, dp)
    kp = pad_axis(pad_axis(k, 1, lk), 3, dp)
    vp = pad_axis(pad_axis(v, 1, lk), 3, dp)
    segments = q_ids is not None

    in_specs = [
        pl.BlockSpec((None, bq, None, dp), lambda i, b, h: (b, i, h, 0)),
        pl.BlockSpec((None, lk, None, dp), lambda i, b, h: (b, 0, kv_head(h, groups), 0)),
        pl.BlockSpec((None, lk, None, dp), lambda i, b, h: (b, 0, kv_head(h, groups), 0)),
    ]
    args = [qp, kp, vp]
    if segments:
        in_specs += [
            pl.BlockSpec((None, bq), lambda i, b, h: (b, i)),
            pl.BlockSpec((None, lk), lambda i, b, h: (b, 0)),
        ]
        args += [pad_axis(q_ids, 1, lq), pad_axis(kv_ids, 1, lk)]
    kernel = functools.partial(
        _forward_kernel, scale2=scale * LOG2E, causal=causal, segments=segments, kv_len=kv_len,
        block_q=bq, block_k=bk,
    )
    out, lse = pl.pallas_call(
        kernel,
        grid=(lq // bq, batch, heads),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, bq, None, dp), lambda i, b, h: (b, i, h, 0)),
            pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((batch, lq, heads, dp), q.dtype),
            jax.ShapeDtypeStruct((batch, heads, lq), jnp.float32),
        ],
        compiler_params=pltriton.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name="flash_attention_fwd",
    )(*args)
    return out[:, :q_len, :, :head_dim], lse[:, :, :q_len]
