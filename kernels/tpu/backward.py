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

from kernels.cost import estimate
from kernels.tpu import common
from kernels.tpu.common import SQUEEZED, Static
from kernels.tpu.config import LANES, SUBLANES, Config


def _unpack(refs, st: Static, n_out: int):
    """Split refs into inputs (q, k, v, do, lse, di, q_ids, kv_ids), outputs and scratch."""
    ins = list(refs[:6])
    rest = refs[6:]
    if st.segments:
        ins += rest[:2]
        rest = rest[2:]
    else:
        ins += [None, None]
    return ins, rest[:n_out], rest[n_out:]


def _dq_kernel(*refs, st: Static, block_k: int, n_kv: int, kv_pad: bool) -> None:
    (q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, q_ids_ref, kv_ids_ref), (dq_ref,), (acc_ref,) = \
        _unpack(refs, st, 1)
    block_b, block_q, _ = q_ref.shape
    block_k_major = k_ref.shape[1]
    qi, j = pl.program_id(2), pl.program_id(3)
    q_start = qi * block_q

    @pl.when(j == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    for c in range(0, block_k_major, block_k):
        k_start = j * block_k_major + c

        def chunk(c=c, k_start=k_start):
            @common.for_each(block_b)
            def _step(b):
                k = k_ref[b, c:c + block_k, :]
                s = common.dot_nt(q_ref[b], k, st) * st.scale  # [bq, bk]
                p = jnp.exp(s - lse_ref[b][:, :1])
                q_ids = kv_ids = None
                if st.segments:
                    q_ids, kv_ids = q_ids_ref[b][:, :1], kv_ids_ref[b, 0:1, c:c + block_k]
                mask = common.visible(st, q_start, k_start, s.shape, q_ids, kv_ids, kv_pad, q_axis=0)
                if mask is not None:
                    p = jnp.where(mask, p, 0.0)
                dp = common.dot_nt(do_ref[b], v_ref[b, c:c + block_k, :], st)
                ds = p * (dp - di_ref[b][:, :1])
                acc_ref[b] += common.dot_nn(ds.astype(k.dtype), k, st)

        common.when(common.chunk_needed(st, q_start + block_q - 1, k_start, kv_pad), chunk)

    @pl.when(j == n_kv - 1)
    def _finish():
        dq_ref[...] = (acc_ref[...] * st.scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, st: Static, block_k: int, n_q: int, kv_pad: bool) -> None:
    (q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, q_ids_ref, kv_ids_ref), (dk_ref, dv_ref), (dk_acc, dv_acc) = \
        _unpack(refs, st, 2)
    block_b, block_q, _ = q_ref.shape
    block_k_major = k_ref.shape[1]
    j, r = pl.program_id(2), pl.program_id(3)
    q_start = common.rem(r, n_q) * block_q

    @pl.when(r == 0)
    def _init():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    for c in range(0, block_k_major, block_k):
        k_start = j * block_k_major + c

        def chunk(c=c, k_start=k_start):
            @common.for_each(block_b)
            def _step(b):
                q, do = q_ref[b], do_ref[b]
                s = common.dot_nt(k_ref[b, c:c + block_k, :], q, st) * st.scale  # [bk, bq]
                p = jnp.exp(s - lse_ref[b][0:1, :])
                q_ids = kv_ids = None
                if st.segments:
                    q_ids, kv_ids = q_ids_ref[b][0:1, :], kv_ids_ref[b, c:c + block_k, :][:, :1]
                mask = common.visible(st, q_start, k_start, s.shape, q_ids, kv_ids, kv_pad, q_axis=1)
                if mask is not None:
                    p = jnp.where(mask, p, 0.0)
                dv_acc[b, c:c + block_k, :] += common.dot_nn(p.astype(do.dtype), do, st)
                dp = common.dot_nt(v_ref[b, c:c + block_k, :], do, st)  # [bk, bq]
                ds = p * (dp - di_ref[b][0:1, :])
                dk_acc[b, c:c + block_k, :] += common.dot_nn(ds.astype(q.dtype), q, st)

        common.when(common.chunk_needed(st, q_start + block_q - 1, k_start, kv_pad), chunk)

    @pl.when(r == st.groups * n_q - 1)
    def _finish():
        dk_ref[...] = (dk_acc[...] * st.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def backward(q, k, v, out, lse, do, q_ids, kv_ids, *, st: Static, config: Config):
    """dq, dk, dv (inputs' dtype) from padded kernel-layout arrays.

    q, out, do [b, h, q, d]; k, v [b, hk, kv, d]; lse [b, h, q, 128] from the forward; ids [b, q] / [b, kv] or None.
    """
    batch, heads, q_pad, d = q.shape
    kv_heads, kv_pad_len = k.shape[1], k.shape[2]
    bb, bq, bkm, bk = config.block_b, config.bwd_block_q, config.bwd_block_k_major, config.bwd_block_k
    n_q, n_kv = q_pad // bq, kv_pad_len // bkm
    kv_pad = kv_pad_len != st.kv_len
    interpret = common.interpret_param(st.interpret)
    params = common.compiler_params(st.interpret, st.vmem_limit)

    def cost(matmuls: int, operands, outputs):
        nbytes = sum(x.size * x.dtype.itemsize for x in (*operands, *outputs))
        return estimate(batch=batch, heads=heads, q_len=st.q_len, kv_len=st.kv_len, head_dim=d, causal=st.causal,
                        matmuls=matmuls, exps=1, nbytes=nbytes)
    di = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [b, h, q]

    def specs_for(q_block, kv_block, head, row_stats):
        """BlockSpecs of (q, k, v, do, lse, di, ids) from index functions of the last two grid indices."""

        def rows(b, h, x, y):
            return (b, head(h, y), q_block(x, y), 0)

        def keys(b, h, x, y):
            return (b, common.div(head(h, y), st.groups), kv_block(x, y), 0)

        stat = ((bb, SQUEEZED, SUBLANES, bq), lambda b, h, x, y: (b, head(h, y), 0, q_block(x, y))) if row_stats \
            else ((bb, SQUEEZED, bq, LANES), rows)
        specs = [pl.BlockSpec((bb, SQUEEZED, bq, d), rows), pl.BlockSpec((bb, SQUEEZED, bkm, d), keys),
                 pl.BlockSpec((bb, SQUEEZED, bkm, d), keys), pl.BlockSpec((bb, SQUEEZED, bq, d), rows),
                 pl.BlockSpec(*stat), pl.BlockSpec(*stat)]
        if st.segments:
            if row_stats:  # query ids along lanes, kv ids along sublanes
                specs += [pl.BlockSpec((bb, SUBLANES, bq), lambda b, h, x, y: (b, 0, q_block(x, y))),
                          pl.BlockSpec((bb, bkm, LANES), lambda b, h, x, y: (b, kv_block(x, y), 0))]
            else:
                specs += [pl.BlockSpec((bb, bq, LANES), lambda b, h, x, y: (b, q_block(x, y), 0)),
                          pl.BlockSpec((bb, SUBLANES, bkm), lambda b, h, x, y: (b, 0, kv_block(x, y)))]
        return specs

    # dq: grid (b, h, q block, kv block); kv blocks past the diagonal re-point at the last needed one.
    args = [q, k, v, do, lse, common.lane_layout(di)]
    if st.segments:
        args += [common.lane_layout(q_ids), common.sublane_layout(kv_ids)]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, st=st, block_k=bk, n_kv=n_kv, kv_pad=kv_pad),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=(batch // bb, heads, n_q, n_kv),
        in_specs=specs_for(lambda qi, j: qi, lambda qi, j: common.kv_block_clamp(st, qi, j, bq, bkm, n_kv),
                           lambda h, y: h, row_stats=False),
        out_specs=pl.BlockSpec((bb, SQUEEZED, bq, d), lambda b, h, qi, j: (b, h, qi, 0)),
        scratch_shapes=[pltpu.VMEM((bb, bq, d), jnp.float32)],
        compiler_params=params,
        cost_estimate=cost(3, args, [q]),
        interpret=interpret,
        name="flash_attention_tpu_dq",
    )(*args)

    # dk, dv: grid (b, kv head, kv block, group member x q block); the last axis is the reduction.
    args = [q, k, v, do, common.sublane_layout(lse[..., 0]), common.sublane_layout(di)]
    if st.segments:
        args += [common.sublane_layout(q_ids), common.lane_layout(kv_ids)]
    kv_spec = pl.BlockSpec((bb, SQUEEZED, bkm, d), lambda b, hk, j, r: (b, hk, j, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, st=st, block_k=bk, n_q=n_q, kv_pad=kv_pad),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        grid=(batch // bb, kv_heads, n_kv, st.groups * n_q),
        in_specs=specs_for(lambda j, r: common.q_block_clamp(st, common.rem(r, n_q), j, bq, bkm, n_q),
                           lambda j, r: j,
                           lambda hk, r: hk * st.groups + common.div(r, n_q), row_stats=True),
        out_specs=[kv_spec, kv_spec],
        scratch_shapes=[pltpu.VMEM((bb, bkm, d), jnp.float32), pltpu.VMEM((bb, bkm, d), jnp.float32)],
        compiler_params=params,
        cost_estimate=cost(4, args, [k, v]),
        interpret=interpret,
        name="flash_attention_tpu_dkv",
    )(*args)
    return dq, dk, dv
