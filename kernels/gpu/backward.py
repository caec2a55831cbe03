"""Backward kernels: dq (one program per q block, streaming key blocks) and dk/dv (one per key block and query
head, streaming q blocks).

Two kernels instead of one fused pass avoid atomics: each program owns the rows it writes. Probabilities are
recomputed from the saved base-2 logsumexp, and delta = rowsum(o * do) comes precomputed from JAX. With GQA the
dk/dv kernel runs per query head and the group is summed in JAX (in float32), so no program races another.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels.gpu.common import (
    LOG2E, LSE_EMPTY, block_loop, dot_nn, dot_nt, dot_tn, kv_blocks, kv_head, pad_axis, q_blocks, round_up,
    visible,
)
from kernels.gpu.config import Config, padded_head_dim


def _dq_kernel(
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs,
    scale: float, causal: bool, segments: bool, kv_len: int, block_q: int, block_k: int,
):
    if segments:
        q_ids_ref, kv_ids_ref, dq_ref = refs
        q_ids = q_ids_ref[...]
    else:
        (dq_ref,) = refs
        q_ids = kv_ids_ref = None
    i = pl.program_id(0)
    q_start = i * block_q
    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...]
    delta = delta_ref[...]
    padded_kv = kv_len % block_k != 0

    def step(j, dq, *, masked: bool):
        k_start = pl.multiple_of(j * block_k, block_k)
        k = k_ref[pl.ds(k_start, block_k), :]
        v = v_ref[pl.ds(k_start, block_k), :]
        s = dot_nt(q, k) * (scale * LOG2E)
        mask = visible(
            q_start, k_start, block_q, block_k,
            causal=causal and masked,
            kv_len=kv_len if (masked and padded_kv) else None,
            q_ids=q_ids, kv_ids=None if kv_ids_ref is None else kv_ids_ref[pl.ds(k_start, block_k)],
        )
        if mask is not None:
            s = jnp.where(mask, s, -jnp.inf)
        p = jnp.exp2(s - lse[:, None])
        ds = p * (dot_nt(do, v) - delta[:, None])
        return dq + dot_nn(ds.astype(k.dtype), k)

    dq = jnp.zeros((block_q, q.shape[-1]), jnp.float32)
    n_full, n_all = kv_blocks(i, block_q=block_q, block_k=block_k, kv_len=kv_len, causal=causal)
    dq = block_loop(0, n_full, functools.partial(step, masked=False), dq)
    dq = block_loop(n_full, n_all, functools.partial(step, masked=True), dq)
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs,
    scale: float, causal: bool, segments: bool, q_blocks_total: int, block_q: int, block_k: int,
):
    # Padded keys need no mask here: their rows of dk/dv are sliced off and they touch no other key's rows.
    # Padded queries have do = 0 and lse = LSE_EMPTY, so they contribute exactly zero.
    if segments:
        q_ids_ref, kv_ids_ref, dk_ref, dv_ref = refs
        kv_ids = kv_ids_ref[...]
    else:
        dk_ref, dv_ref = refs
        q_ids_ref = kv_ids = None
    j = pl.program_id(0)
    k_start = j * block_k
    k = k_ref[...]
    v = v_ref[...]

    def step(i, carry, *, masked: bool):
        dk, dv = carry
        q_start = pl.multiple_of(i * block_q, block_q)
        rows = pl.ds(q_start, block_q)
        q = q_ref[rows, :]
        do = do_ref[rows, :]
        lse = lse_ref[rows]
        delta = delta_ref[rows]
        s = dot_nt(q, k) * (scale * LOG2E)
        mask = visible(
            q_start, k_start, block_q, block_k, causal=causal and masked,
            q_ids=None if q_ids_ref is None else q_ids_ref[rows], kv_ids=kv_ids,
        )
        if mask is not None:
            s = jnp.where(mask, s, -jnp.inf)
        p = jnp.exp2(s - lse[:, None])
        dv = dv + dot_tn(p.astype(do.dtype), do)
        ds = p * (dot_nt(do, v) - delta[:, None])
        dk = dk + dot_tn(ds.astype(q.dtype), q)
        return dk, dv

    zeros = jnp.zeros((block_k, k.shape[-1]), jnp.float32)
    first, unmasked = q_blocks(j, block_q=block_q, block_k=block_k, q_blocks_total=q_blocks_total, causal=causal)
    carry = block_loop(first, unmasked, functools.partial(step, masked=True), (zeros, zeros))
    dk, dv = block_loop(unmasked, q_blocks_total, functools.partial(step, masked=False), carry)
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def backward(
    q: jax.Array, k: jax.Array, v: jax.Array, q_ids: jax.Array | None, kv_ids: jax.Array | None,
    out: jax.Array, lse: jax.Array, dout: jax.Array, *,
    scale: float, causal: bool, config: Config, interpret: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Gradients (dq, dk, dv) of unpadded inputs, given the forward's output, its logsumexp and the cotangent."""
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    bq, bk = config.bwd_block_q, config.bwd_block_k
    lq, lk, dp = round_up(q_len, bq), round_up(kv_len, bk), padded_head_dim(head_dim)
    segments = q_ids is not None

    delta = jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32), axis=-1).transpose(0, 2, 1)
    qp = pad_axis(pad_axis(q, 1, lq), 3, dp)
    dop = pad_axis(pad_axis(dout.astype(q.dtype), 1, lq), 3, dp)
    kp = pad_axis(pad_axis(k, 1, lk), 3, dp)
    vp = pad_axis(pad_axis(v, 1, lk), 3, dp)
    lse_p = pad_axis(lse, 2, lq, LSE_EMPTY)
    delta_p = pad_axis(delta, 2, lq)
    ids = [pad_axis(q_ids, 1, lq), pad_axis(kv_ids, 1, lk)] if segments else []
    statics = dict(scale=scale, causal=causal, segments=segments, block_q=bq, block_k=bk)
    params = pltriton.CompilerParams(num_warps=config.bwd_num_warps, num_stages=config.bwd_num_stages)

    # dq: grid over (q block, batch, head); whole k/v sequence of the head's kv head visible to each program.
    q_tile = pl.BlockSpec((None, bq, None, dp), lambda i, b, h: (b, i, h, 0))
    kv_whole = pl.BlockSpec((None, lk, None, dp), lambda i, b, h: (b, 0, kv_head(h, groups), 0))
    row_tile = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
    dq_specs = [q_tile, kv_whole, kv_whole, q_tile, row_tile, row_tile]
    if segments:
        dq_specs += [
            pl.BlockSpec((None, bq), lambda i, b, h: (b, i)),
            pl.BlockSpec((None, lk), lambda i, b, h: (b, 0)),
        ]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, kv_len=kv_len, **statics),
        grid=(lq // bq, batch, heads),
        in_specs=dq_specs,
        out_specs=q_tile,
        out_shape=jax.ShapeDtypeStruct(qp.shape, q.dtype),
        compiler_params=params,
        interpret=interpret,
        name="flash_attention_bwd_dq",
    )(qp, kp, vp, dop, lse_p, delta_p, *ids)

    # dk/dv: grid over (key block, batch, query head); whole q sequence of that head visible to each program.
    q_whole = pl.BlockSpec((None, lq, None, dp), lambda j, b, h: (b, 0, h, 0))
    kv_tile = pl.BlockSpec((None, bk, None, dp), lambda j, b, h: (b, j, kv_head(h, groups), 0))
    row_whole = pl.BlockSpec((None, None, lq), lambda j, b, h: (b, h, 0))
    dkv_specs = [q_whole, kv_tile, kv_tile, q_whole, row_whole, row_whole]
    if segments:
        dkv_specs += [
            pl.BlockSpec((None, lq), lambda j, b, h: (b, 0)),
            pl.BlockSpec((None, bk), lambda j, b, h: (b, j)),
        ]
    grad_dtype = k.dtype if groups == 1 else jnp.float32
    out_tile = pl.BlockSpec((None, bk, None, dp), lambda j, b, h: (b, j, h, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, q_blocks_total=lq // bq, **statics),
        grid=(lk // bk, batch, heads),
        in_specs=dkv_specs,
        out_specs=[out_tile, out_tile],
        out_shape=[jax.ShapeDtypeStruct((batch, lk, heads, dp), grad_dtype)] * 2,
        compiler_params=params,
        interpret=interpret,
        name="flash_attention_bwd_dkv",
    )(qp, kp, vp, dop, lse_p, delta_p, *ids)

    dq = dq[:, :q_len, :, :head_dim]
    dk = dk[:, :kv_len, :, :head_dim]
    dv = dv[:, :kv_len, :, :head_dim]
    if groups > 1:
        dk = dk.reshape(batch, kv_len, kv_heads, groups, head_dim).sum(axis=3).astype(k.dtype)
        dv = dv.reshape(batch, kv_len, kv_heads, groups, head_dim).sum(axis=3).astype(v.dtype)
    return dq, dk, dv
