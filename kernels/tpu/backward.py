"""Backward flash-attention kernels: dq (reduction over kv blocks) and dk/dv (reduction over query blocks).

Both recompute p = exp(s - lse) from the saved logsumexp, so nothing of size [q, kv] is stored. The dk/dv kernel
works on transposed scores [keys, queries] (lse, di and query ids laid out along lanes) so that every matmul is
a plain or rhs-transposed one: no in-kernel transposes. It runs over kv heads and folds the query heads of a
group into its reduction axis, so GQA needs neither a repeat of k and v nor a per-query-head dk/dv buffer.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.tpu import common
from kernels.tpu.common import Static
from kernels.tpu.config import LANES, SUBLANES, Config


def _unpack(refs, st: Static, n_out: int):
    """Split refs into lengths (or None), inputs (q, k, v, do, lse, di, q_ids, kv_ids), outputs and scratch."""
    lengths = None
    if st.lengths:
        lengths, refs = refs[:2], refs[2:]
    ins = list(refs[:6])
    rest = refs[6:]
    if st.segments:
        ins += rest[:2]
        rest = rest[2:]
    else:
        ins += [None, None]
    return lengths, ins, rest[:n_out], rest[n_out:]


def _scores(a, b, st: Static, lse_col):
    """p = exp(capped scores - lse) of a [m, d] x [n, d] tile, and tanh(s / cap) (None without a cap)."""
    s, t = common.cap_scores(common.dot_nt(a, b, st) * st.scale, st)
    return jnp.exp(s - lse_col), t


def _ds(p, dp, di, t):
    """dS = p (dP - delta), times the cap's derivative 1 - tanh^2 when capped."""
    ds = p * (dp - di)
    return ds if t is None else ds * (1.0 - t * t)


def _dq_kernel(*refs, st: Static, block_k: int, n_kv: int, n_steps: int, kv_pad: bool) -> None:
    lengths, (q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, q_ids_ref, kv_ids_ref), (dq_ref,), (acc_ref,) = \
        _unpack(refs, st, 1)
    block_b, block_q, _ = q_ref.shape
    block_k_major = k_ref.shape[1]
    bi, qi, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    q_start = qi * block_q
    limits = common.batch_limits(lengths, bi, block_b)
    first, last = common.kv_blocks(st, q_start, block_q, block_k_major, n_kv, limits)
    block = first + j
    active = None if st.left is None and limits is None else block <= last

    @pl.when(j == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    heads = range(st.layout.per_tile)
    for c in range(0, block_k_major, block_k):
        k_start = block * block_k_major + c

        def chunk(c=c, k_start=k_start):
            @common.for_each(block_b)
            def _step(b):
                q, do = q_ref[b], do_ref[b]
                ks = common.kv_for_heads(k_ref[b, c:c + block_k, :], pl.program_id(1), st)
                vs = common.kv_for_heads(v_ref[b, c:c + block_k, :], pl.program_id(1), st)
                q_ids = kv_ids = None
                if st.segments:
                    q_ids, kv_ids = common.lane_tile(q_ids_ref[b], block_k), kv_ids_ref[b, 0:1, c:c + block_k]
                mask = common.visible(st, q_start, k_start, (block_q, block_k), q_ids, kv_ids, kv_pad, q_axis=0,
                                      lengths=common.row_lengths(lengths, bi * block_b, b))
                products = []
                for h in heads:
                    p, t = _scores(common.head_lanes(q, h, st), ks[h], st,
                                   common.lane_tile(lse_ref[b, h], block_k))  # [bq, bk]
                    if mask is not None:
                        p = jnp.where(mask, p, 0.0)
                    dp = common.dot_nt(common.head_lanes(do, h, st), vs[h], st)
                    ds = _ds(p, dp, common.lane_tile(di_ref[b, h], block_k), t)
                    products.append(common.dot_nn(ds.astype(ks[h].dtype), ks[h], st))
                acc_ref[b] += common.merge_heads(products)

        common.when(common.chunk_needed(st, q_start, block_q, k_start, block_k, kv_pad, limits, active), chunk)

    @pl.when(j == n_steps - 1)
    def _finish():
        dq_ref[...] = (acc_ref[...] * st.scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, st: Static, block_k: int, n_q: int, n_steps: int, kv_pad: bool) -> None:
    lengths, (q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, q_ids_ref, kv_ids_ref), (dk_ref, dv_ref), \
        (dk_acc, dv_acc) = _unpack(refs, st, 2)
    block_b, block_q, _ = q_ref.shape
    block_k_major = k_ref.shape[1]
    bi, j, r = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    limits = common.batch_limits(lengths, bi, block_b)
    first, last = common.q_blocks(st, j * block_k_major, block_k_major, block_q, n_q, limits)
    block = first + common.rem(r, n_steps)
    q_start = block * block_q
    active = None if st.right is None and limits is None else block <= last

    @pl.when(r == 0)
    def _init():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    # the query heads of this step and the kv lane half each belongs to: with one head per tile, the tile; with
    # pairs of groups 1, both heads of query pair j's twin (each its own half); with even groups, both heads of
    # one query pair, all of kv head (2 * tile + member // (groups / 2)) at that head's half
    heads = range(st.layout.per_tile)
    if st.layout.per_tile == 1 or st.groups == 1:
        halves = list(heads)
    else:
        halves = [common.kv_half(st, pl.program_id(1) * st.groups + common.div(r, n_steps))] * 2
    for c in range(0, block_k_major, block_k):
        k_start = j * block_k_major + c

        def chunk(c=c, k_start=k_start):
            @common.for_each(block_b)
            def _step(b):
                k, v = k_ref[b, c:c + block_k, :], v_ref[b, c:c + block_k, :]
                q_ids = kv_ids = None
                if st.segments:
                    q_ids, kv_ids = q_ids_ref[b][0:1, :], common.lane_tile(kv_ids_ref[b, c:c + block_k, :], block_q)
                mask = common.visible(st, q_start, k_start, (block_k, block_q), q_ids, kv_ids, kv_pad, q_axis=1,
                                      lengths=common.row_lengths(lengths, bi * block_b, b))
                dv, dk = None, None
                for h in heads:
                    q = common.place_head(q_ref[b], h, halves[h], st)
                    do = common.place_head(do_ref[b], h, halves[h], st)
                    p, t = _scores(k, q, st, lse_ref[b, h][0:1, :])  # [bk, bq]
                    if mask is not None:
                        p = jnp.where(mask, p, 0.0)
                    dp = common.dot_nt(v, do, st)  # [bk, bq]
                    ds = _ds(p, dp, di_ref[b, h][0:1, :], t)
                    dv_h = common.dot_nn(p.astype(do.dtype), do, st)
                    dk_h = common.dot_nn(ds.astype(q.dtype), q, st)
                    dv, dk = (dv_h, dk_h) if dv is None else (dv + dv_h, dk + dk_h)
                dv_acc[b, c:c + block_k, :] += dv
                dk_acc[b, c:c + block_k, :] += dk

        common.when(common.chunk_needed(st, q_start, block_q, k_start, block_k, kv_pad, limits, active), chunk)

    @pl.when(r == st.groups * n_steps - 1)
    def _finish():
        dk_ref[...] = (dk_acc[...] * st.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def backward(q, k, v, out, lse, do, q_ids, kv_ids, lengths, *, st: Static, config: Config):
    """dq, dk, dv (inputs' dtype) from padded arrays in `st.layout` (kernels.tpu.layout).

    q, out, do hold h heads, k, v hk; lse [b, h, q, 128] from the forward; ids [b, q] / [b, kv] or None;
    lengths (q_lengths, kv_lengths) int32 [b] or None.
    """
    layout = st.layout
    batch, heads, q_pad = layout.dims(q)
    _, kv_heads, kv_pad_len = layout.dims(k)
    d, per_tile = layout.head_dim, layout.per_tile
    bb, bq, bkm, bk = config.block_b, config.bwd_block_q, config.bwd_block_k_major, config.bwd_block_k
    n_q, n_kv = q_pad // bq, kv_pad_len // bkm
    kv_pad = kv_pad_len != st.kv_len
    interpret = common.interpret_param(st.interpret)
    params = common.compiler_params(st.interpret, st.vmem_limit)
    prefetch = list(lengths) if st.lengths else []

    def cost(matmuls: int, operands, outputs):
        nbytes = sum(x.size * x.dtype.itemsize for x in (*operands, *outputs))
        return common.cost_estimate(st, batch=batch, heads=heads, head_dim=d, matmuls=matmuls, nbytes=nbytes)
    di = layout.row_sums(do, out)  # [b, h, q]

    def specs_for(q_block, kv_block, head, row_stats):
        """BlockSpecs of (q, k, v, do, lse, di, ids) from index functions of (batch block, the last two grid
        indices, the scalar-prefetch lengths)."""

        def rows(b, h, x, y, *lens):
            return b, head(h, y), q_block(b, x, y, lens)

        def keys(b, h, x, y, *lens):
            return b, common.div(head(h, y), st.groups), kv_block(b, x, y, lens)

        def stat_rows(b, h, x, y, *lens):
            return b, head(h, y), q_block(b, x, y, lens), 0

        def stat_cols(b, h, x, y, *lens):
            return b, head(h, y), 0, q_block(b, x, y, lens)

        stat = ((bb, per_tile, SUBLANES, bq), stat_cols) if row_stats else ((bb, per_tile, bq, LANES), stat_rows)
        specs = [layout.spec(bb, bq, rows), layout.spec(bb, bkm, keys), layout.spec(bb, bkm, keys),
                 layout.spec(bb, bq, rows), pl.BlockSpec(*stat), pl.BlockSpec(*stat)]
        if st.segments:
            if row_stats:  # query ids along lanes, kv ids along sublanes
                specs += [pl.BlockSpec((bb, SUBLANES, bq), lambda b, h, x, y, *lens: (b, 0, q_block(b, x, y, lens))),
                          pl.BlockSpec((bb, bkm, LANES), lambda b, h, x, y, *lens: (b, kv_block(b, x, y, lens), 0))]
            else:
                specs += [pl.BlockSpec((bb, bq, LANES), lambda b, h, x, y, *lens: (b, q_block(b, x, y, lens), 0)),
                          pl.BlockSpec((bb, SUBLANES, bkm), lambda b, h, x, y, *lens: (b, 0, kv_block(b, x, y, lens)))]
        return specs

    # dq: grid (b, query tile, q block, kv step); as in the forward, step j loads kv block first(qi) + j, clamped.
    def dq_kv_block(b, qi, j, lens):
        first, last = common.kv_blocks(st, qi * bq, bq, bkm, n_kv, common.batch_limits(lens or None, b, bb))
        return common.clamp_block(first, last, j)

    kv_n = common.kv_steps(st, n_q, bq, bkm, n_kv)
    args = [q, k, v, do, lse, common.lane_layout(di)]
    if st.segments:
        args += [common.lane_layout(q_ids), common.sublane_layout(kv_ids)]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, st=st, block_k=bk, n_kv=n_kv, n_steps=kv_n, kv_pad=kv_pad),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        **common.pallas_grid(
            st, (batch // bb, heads // per_tile, n_q, kv_n),
            specs_for(lambda b, qi, j, lens: qi, dq_kv_block, lambda t, y: t, row_stats=False),
            layout.spec(bb, bq, lambda b, t, qi, j, *lens: (b, t, qi)),
            [pltpu.VMEM((bb, bq, layout.width), jnp.float32)]),
        compiler_params=params,
        cost_estimate=cost(3, args, [q]),
        interpret=interpret,
        name="flash_attention_tpu_dq",
    )(*prefetch, *args)

    # dk, dv: grid (b, kv tile, kv block, group member x q step), query tile = kv tile * groups + member; the last axis is the reduction. Step s of a
    # member loads q block first(j) + s (first: the first q block that sees kv block j), clamped.
    q_n = common.q_steps(st, n_kv, bkm, bq, n_q)

    def dkv_q_block(b, j, r, lens):
        first, last = common.q_blocks(st, j * bkm, bkm, bq, n_q, common.batch_limits(lens or None, b, bb))
        return common.clamp_block(first, last, common.rem(r, q_n))

    args = [q, k, v, do, common.sublane_layout(lse[..., 0]), common.sublane_layout(di)]
    if st.segments:
        args += [common.sublane_layout(q_ids), common.lane_layout(kv_ids)]
    kv_spec = layout.spec(bb, bkm, lambda b, t, j, r, *lens: (b, t, j))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, st=st, block_k=bk, n_q=n_q, n_steps=q_n, kv_pad=kv_pad),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        **common.pallas_grid(
            st, (batch // bb, kv_heads // per_tile, n_kv, st.groups * q_n),
            specs_for(dkv_q_block, lambda b, j, r, lens: j,
                      lambda hk, r: hk * st.groups + common.div(r, q_n), row_stats=True),
            [kv_spec, kv_spec],
            [pltpu.VMEM((bb, bkm, layout.width), jnp.float32), pltpu.VMEM((bb, bkm, layout.width), jnp.float32)]),
        compiler_params=params,
        cost_estimate=cost(4, args, [k, v]),
        interpret=interpret,
        name="flash_attention_tpu_dkv",
    )(*prefetch, *args)
    return dq, dk, dv
