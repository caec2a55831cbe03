"""Backward kernels: dq (one program per q block, streaming key blocks) and dk/dv (one per key block and kv head,
streaming the q blocks of every query head in its group).

Two kernels instead of one fused pass avoid atomics: each program owns the rows it writes. Probabilities are
recomputed from the saved base-2 logsumexp, and delta = rowsum(o * do) comes precomputed from JAX. With GQA the
dk/dv program sums over the query heads of its group in its float32 accumulators, so dk/dv are written once per kv
head in the input dtype (no per-query-head buffer, no reduction in XLA). Like the forward, nothing is padded in
HBM: tiles past the sequence ends or head_dim are masked loads and stores. Both kernels visit only the blocks the
forward's mask reaches (window, causal diagonal, run-time lengths: `kv_ranges`, `q_ranges`); soft-capping scales
dS by tanh's derivative.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels.gpu.common import (
    LSE_EMPTY, Masking, dot_nn, dot_nt, dot_tn, exp2, fma, kv_head, kv_ranges, load, masked_where, q_ranges,
    row_length, rows_at, run_ranges, scores, store, tile_mask, visible,
)
from kernels.gpu.config import Config, padded_head_dim
from kernels.cost import estimate


def _split_refs(refs, segments: bool, lengths: bool):
    """(q_ids, kv_ids, q_lengths, kv_lengths, outputs) of a backward kernel's trailing refs (None where absent)."""
    refs = list(refs)
    ids = (refs.pop(0), refs.pop(0)) if segments else (None, None)
    lens = (refs.pop(0), refs.pop(0)) if lengths else (None, None)
    return (*ids, *lens, refs)


def _grad_scores(p, dp, delta, t):
    """dS of the natural (pre-cap) scores: p * (dp - delta), times tanh's derivative 1 - t^2 when capped."""
    ds = p * (dp - delta[:, None])
    return ds if t is None else ds * (1.0 - t * t)


def _dq_kernel(
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs,
    scale: float, masking: Masking, segments: bool, q_len: int, kv_len: int, head_dim: int, block_q: int,
    block_k: int, one_loop: bool, native: bool,
):
    q_ids_ref, kv_ids_ref, q_len_ref, kv_len_ref, outs = _split_refs(refs, segments, masking.lengths)
    dq_ref = outs[0]
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
    do = load(do_ref.at[q_rows, cols], q_mask)
    lse = load(lse_ref.at[q_rows], row_mask, other=LSE_EMPTY)  # rows past q_lengths hold LSE_EMPTY: p = 0
    delta = load(delta_ref.at[q_rows], row_mask)
    q_ids = load(q_ids_ref.at[q_rows], row_mask) if segments else None
    padded_kv = kv_len % block_k != 0

    def step(j, dq, *, masked):
        # masked: a Python bool (split loops), or a traced one (one loop: the edge mask behind a branch)
        k_start = j * block_k
        k_rows = rows_at(k_start, block_k)
        tail = masked is not False and padded_kv
        kv_mask = tile_mask(k_start, block_k, kv_len if tail else None, width, head_dim)
        k = load(k_ref.at[k_rows, cols], kv_mask)
        v = load(v_ref.at[k_rows, cols], kv_mask)
        x, factor, t = scores(q, k, scale, masking.softcap)  # base-2 scores x * factor
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
        p = exp2(fma(x, factor, -lse[:, None], native=native), native=native)  # one FFMA per score
        ds = _grad_scores(p, dot_nt(do, v), delta, t)
        return dq + dot_nn(ds.astype(k.dtype), k)

    ranges = kv_ranges(i, block_q=block_q, block_k=block_k, kv_len=kv_len, masking=masking, q_len_b=q_len_b,
                       kv_len_b=kv_len_b)
    dq = run_ranges(ranges, step, jnp.zeros((block_q, width), jnp.float32), one_loop=one_loop)
    store(dq_ref.at[q_rows, cols], (dq * scale).astype(dq_ref.dtype), q_mask)


def _dkv_kernel(
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs,
    scale: float, masking: Masking, segments: bool, q_len: int, kv_len: int, head_dim: int, groups: int,
    block_q: int, block_k: int, native: bool,
):
    # q/do refs are [q_len, groups, head_dim] and lse/delta [groups, q_len]: the query heads of this kv head.
    # Keys past kv_len need no mask: their dk/dv rows are never stored and they touch no other key's rows; keys
    # past the run-time length are stored as zeros. Query rows past q_len (or past the run-time length: their lse
    # is LSE_EMPTY) read do = 0 and lse = LSE_EMPTY, so they contribute exactly zero.
    q_ids_ref, kv_ids_ref, q_len_ref, kv_len_ref, outs = _split_refs(refs, segments, masking.lengths)
    dk_ref, dv_ref = outs[:2]
    q_len_b, kv_len_b = row_length(q_len_ref), row_length(kv_len_ref)
    width = padded_head_dim(head_dim)
    cols = pl.ds(np.int32(0), width)
    j = pl.program_id(0)
    k_start = j * block_k
    k_rows = rows_at(k_start, block_k)
    ragged_kv = kv_len % block_k != 0
    kv_mask = tile_mask(k_start, block_k, kv_len if ragged_kv else None, width, head_dim)
    k = load(k_ref.at[k_rows, cols], kv_mask)
    v = load(v_ref.at[k_rows, cols], kv_mask)
    kv_ids = None
    if segments:
        kv_ids = load(kv_ids_ref.at[k_rows], tile_mask(k_start, block_k, kv_len if ragged_kv else None), other=-1)
    ragged_q = q_len % block_q != 0

    def step(i, carry, *, g, masked: bool):
        dk, dv = carry
        q_start = i * block_q
        rows = rows_at(q_start, block_q)
        q_mask = tile_mask(q_start, block_q, q_len if ragged_q else None, width, head_dim)
        row_mask = tile_mask(q_start, block_q, q_len if ragged_q else None)
        q = load(q_ref.at[rows, g, cols], q_mask)
        do = load(do_ref.at[rows, g, cols], q_mask)
        lse = load(lse_ref.at[g, rows], row_mask, other=LSE_EMPTY)
        delta = load(delta_ref.at[g, rows], row_mask)
        x, factor, t = scores(q, k, scale, masking.softcap)  # base-2 scores x * factor
        q_ids = None if q_ids_ref is None else load(q_ids_ref.at[rows], row_mask)
        mask = visible(q_start, k_start, block_q, block_k, masking.band if masked else None, q_ids=q_ids,
                       kv_ids=kv_ids)
        if mask is not None:
            x = jnp.where(mask, x, -jnp.inf)
        p = exp2(fma(x, factor, -lse[:, None], native=native), native=native)  # one FFMA per score
        dv = dv + dot_tn(p.astype(do.dtype), do)
        ds = _grad_scores(p, dot_nt(do, v), delta, t)
        dk = dk + dot_tn(ds.astype(q.dtype), q)
        return dk, dv

    ranges = q_ranges(j, block_q=block_q, block_k=block_k, q_len=q_len, masking=masking, q_len_b=q_len_b,
                      kv_len_b=kv_len_b)

    def head(g, carry):
        return run_ranges(ranges, functools.partial(step, g=g), carry)

    zeros = jnp.zeros((block_k, width), jnp.float32)
    if groups == 1:
        dk, dv = head(np.int32(0), (zeros, zeros))
    else:
        dk, dv = lax.fori_loop(np.int32(0), np.int32(groups), head, (zeros, zeros))
    if kv_len_b is not None:  # keys past the row's length get zero gradients
        kept = (k_start + jnp.arange(block_k, dtype=jnp.int32) < kv_len_b)[:, None]
        dk, dv = jnp.where(kept, dk, 0.0), jnp.where(kept, dv, 0.0)
    store(dk_ref.at[k_rows, cols], (dk * scale).astype(dk_ref.dtype), kv_mask)
    store(dv_ref.at[k_rows, cols], dv.astype(dv_ref.dtype), kv_mask)


def backward(
    q: jax.Array, k: jax.Array, v: jax.Array, q_ids: jax.Array | None, kv_ids: jax.Array | None,
    q_lengths: jax.Array | None, kv_lengths: jax.Array | None, out: jax.Array, lse: jax.Array, dout: jax.Array, *,
    scale: float, masking: Masking, config: Config, interpret: bool, one_loop: bool = True,
):
    """Gradients (dq, dk, dv), given the forward's output, its logsumexp and the cotangent; no padded copies.
    `one_loop`: the dq kernel's key blocks in one loop with the mask behind a branch (for Hopper, see
    `run_ranges`)."""
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    bq, bk = config.bwd_block_q, config.bwd_block_k
    segments = q_ids is not None
    q_blocks, kv_blocks = -(-q_len // bq), -(-kv_len // bk)

    delta = jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32), axis=-1).transpose(0, 2, 1)
    dout = dout.astype(q.dtype)
    extra = ([q_ids, kv_ids] if segments else []) + ([q_lengths, kv_lengths] if masking.lengths else [])
    statics = dict(scale=scale, masking=masking, segments=segments, q_len=q_len, kv_len=kv_len, head_dim=head_dim,
                   block_q=bq, block_k=bk, native=not interpret)
    params = pltriton.CompilerParams(num_warps=config.bwd_num_warps, num_stages=config.bwd_num_stages)
    itemsize = q.dtype.itemsize
    row_bytes = 2 * batch * heads * q_len * 4  # lse and delta

    def cost(matmuls: int, nbytes: int) -> pl.CostEstimate:
        return estimate(batch=batch, heads=heads, q_len=q_len, kv_len=kv_len, head_dim=head_dim, band=masking.band,
                        softcap=masking.softcap, matmuls=matmuls, exps=1, nbytes=nbytes)

    extra_specs = [pl.BlockSpec((None, q_len), lambda x, b, h: (b, 0)),
                   pl.BlockSpec((None, kv_len), lambda x, b, h: (b, 0))] if segments else []
    if masking.lengths:
        extra_specs += [pl.BlockSpec((batch,), lambda x, b, h: (0,))] * 2

    # dq: grid over (q block, batch, head); whole unpadded sequences of the head (and its kv head) visible.
    q_whole = pl.BlockSpec((None, q_len, None, head_dim), lambda i, b, h: (b, 0, h, 0))
    kv_whole = pl.BlockSpec((None, kv_len, None, head_dim), lambda i, b, h: (b, 0, kv_head(h, groups), 0))
    row_whole = pl.BlockSpec((None, None, q_len), lambda i, b, h: (b, h, 0))
    dq_out = pl.pallas_call(
        functools.partial(_dq_kernel, one_loop=one_loop, **statics),
        grid=(q_blocks, batch, heads),
        in_specs=[q_whole, kv_whole, kv_whole, q_whole, row_whole, row_whole, *extra_specs],
        out_specs=q_whole,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params,
        cost_estimate=cost(3, (3 * q.size + k.size + v.size) * itemsize + row_bytes),
        interpret=interpret,
        name="flash_attention_bwd_dq",
    )(q, k, v, dout, lse, delta, *extra)

    # dk/dv: grid over (key block, batch, kv head); the q, do, lse and delta of the whole query-head group visible.
    q_group = pl.BlockSpec((None, q_len, groups, head_dim), lambda j, b, hk: (b, 0, hk, 0))
    kv_tile = pl.BlockSpec((None, kv_len, None, head_dim), lambda j, b, hk: (b, 0, hk, 0))
    row_group = pl.BlockSpec((None, groups, q_len), lambda j, b, hk: (b, hk, 0))
    dkv_out = pl.pallas_call(
        functools.partial(_dkv_kernel, groups=groups, **statics),
        grid=(kv_blocks, batch, kv_heads),
        in_specs=[q_group, kv_tile, kv_tile, q_group, row_group, row_group, *extra_specs],
        out_specs=[kv_tile, kv_tile],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=params,
        cost_estimate=cost(4, (2 * q.size + 2 * k.size + 2 * v.size) * itemsize + row_bytes),
        interpret=interpret,
        name="flash_attention_bwd_dkv",
    )(q, k, v, dout, lse, delta, *extra)
    return dq_out, dkv_out[0], dkv_out[1]
