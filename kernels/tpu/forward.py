"""Forward flash-attention kernel: online softmax over kv blocks, f32 state in VMEM scratch.

Grid (batch blocks, query tiles: a head or a pair of heads (kernels.tpu.layout), q blocks, kv steps); the kv axis
is the sequential reduction. It holds only as many steps as the widest range of kv major blocks a q block can see
(all of them without a window; the band's width with one), and step j of q block qi loads kv block first(qi) + j
(first: where qi's window starts), repeating the last needed block past the range, so blocks outside the window
are neither fetched nor computed. Each step walks its [block_k_major, width] tile of k and v in block_k chunks,
skipping chunks wholly outside the causal/window band, wholly padding or wholly past the row's kv length (lengths
arrive as scalar-prefetch operands). A pair tile keeps one running max and sum per head.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.tpu import common
from kernels.tpu.common import MASK_VALUE, NO_KEY_LSE, Static
from kernels.tpu.config import LANES, SUBLANES, Config


def _rows_may_start_blind(st: Static) -> bool:
    """Whether a row can have seen no key after the first chunk it walks, so that its masked scores give
    exp(MASK_VALUE - MASK_VALUE) = 1 and p must be masked again. Without segment ids, lengths or a left window
    bound every q block starts at key 0, which every row sees (a window's right side is never negative); from
    then on a row's max is a real score and its masked entries give exp(MASK_VALUE - max) = 0 exactly."""
    return st.segments or st.lengths or st.left is not None


def _kernel(*refs, st: Static, block_k: int, n_kv: int, n_steps: int, kv_pad: bool, save_lse: bool) -> None:
    lengths = None
    if st.lengths:
        lengths, refs = refs[:2], refs[2:]
    q_ref, k_ref, v_ref = refs[:3]
    rest = refs[3:]
    q_ids_ref = kv_ids_ref = None
    if st.segments:
        q_ids_ref, kv_ids_ref, *rest = rest
    o_ref, *rest = rest
    lse_ref = None
    if save_lse:
        lse_ref, *rest = rest
    m_ref, l_ref, acc_ref = rest

    block_b, block_q, _ = q_ref.shape
    block_k_major = k_ref.shape[1]
    bi, qi, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    q_start = qi * block_q
    limits = common.batch_limits(lengths, bi, block_b)
    first, last = common.kv_blocks(st, q_start, block_q, block_k_major, n_kv, limits)
    block = first + j
    # past its range a step repeats the last block: skip it (without a left bound or lengths, the band and
    # padding checks of each chunk already do)
    active = None if st.left is None and limits is None else block <= last

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    heads = range(st.layout.per_tile)  # query heads in this tile: one, or a pair sharing the lanes
    for c in range(0, block_k_major, block_k):
        k_start = block * block_k_major + c

        def chunk(c=c, k_start=k_start):
            @common.for_each(block_b)
            def _step(b):
                q = q_ref[b]
                ks = common.kv_for_heads(k_ref[b, c:c + block_k, :], pl.program_id(1), st)
                vs = common.kv_for_heads(v_ref[b, c:c + block_k, :], pl.program_id(1), st)
                q_ids = kv_ids = None
                if st.segments:
                    q_ids = common.lane_tile(q_ids_ref[b], block_k)
                    kv_ids = kv_ids_ref[b, 0:1, c:c + block_k]
                mask = common.visible(st, q_start, k_start, (block_q, block_k), q_ids, kv_ids, kv_pad,
                                      lengths=common.row_lengths(lengths, bi * block_b, b))
                alphas, products = [], []
                for h in heads:
                    s = common.dot_nt(common.head_lanes(q, h, st), ks[h], st) * st.scale  # [bq, bk]
                    s, _ = common.cap_scores(s, st)
                    if mask is not None:
                        s = jnp.where(mask, s, MASK_VALUE)
                    m_prev = m_ref[b, h]  # [bq, 128], all lanes equal
                    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
                    p = jnp.exp(s - common.lane_tile(m_next, s.shape[1]))
                    if mask is not None and _rows_may_start_blind(st):
                        p = jnp.where(mask, p, 0.0)  # a row that saw no key yet has m == MASK_VALUE and p == 1
                    alpha = jnp.exp(m_prev - m_next)
                    l_ref[b, h] = alpha * l_ref[b, h] + jnp.sum(p, axis=1, keepdims=True)
                    m_ref[b, h] = m_next
                    alphas.append(common.lane_tile(alpha, acc_ref.shape[2]))
                    products.append(common.dot_nn(p.astype(vs[h].dtype), vs[h], st))
                acc_ref[b] = acc_ref[b] * common.merge_heads(alphas) + common.merge_heads(products)

        common.when(common.chunk_needed(st, q_start, block_q, k_start, block_k, kv_pad, limits, active), chunk)

    @pl.when(j == n_steps - 1)
    def _finish():
        @common.for_each(block_b)
        def _step(b):
            inverses = []
            for h in heads:
                l = l_ref[b, h]
                inverse = common.row_inverse(l, _rows_may_start_blind(st))
                inverses.append(common.lane_tile(inverse, acc_ref.shape[2]))
                if lse_ref is not None:
                    seen = l > 0.0
                    lse_ref[b, h] = jnp.where(seen, m_ref[b, h] + jnp.log(jnp.where(seen, l, 1.0)), NO_KEY_LSE)
            o_ref[b] = (acc_ref[b] * common.merge_heads(inverses)).astype(o_ref.dtype)


def forward(q, k, v, q_ids, kv_ids, lengths, *, st: Static, config: Config, save_lse: bool):
    """Padded q, k, v in `st.layout` (kernels.tpu.layout), ids [b, q] / [b, kv] or None, lengths (q_lengths,
    kv_lengths) int32 [b] or None -> out (like q), lse or None.

    lse is [b, h, q, 128] float32 (lane-broadcast, natural log, NO_KEY_LSE for a row that sees no key), only
    computed when save_lse.
    """
    layout = st.layout
    batch, heads, q_pad = layout.dims(q)
    kv_pad_len = layout.dims(k)[2]
    bb, bq, bkm = config.block_b, config.block_q, config.block_k_major
    n_q, n_kv = q_pad // bq, kv_pad_len // bkm
    n_steps = common.kv_steps(st, n_q, bq, bkm, n_kv)
    groups, per_tile = st.groups, layout.per_tile

    def kv_block(b, qi, j, lens):
        first, last = common.kv_blocks(st, qi * bq, bq, bkm, n_kv, common.batch_limits(lens or None, b, bb))
        return common.clamp_block(first, last, j)

    # grid (batch block, query tile: a head or a pair of heads, q block, kv step); kv tile = query tile // groups
    def kv_at(b, t, qi, j, *lens):
        return b, common.div(t, groups), kv_block(b, qi, j, lens)

    def q_at(b, t, qi, j, *lens):
        return b, t, qi

    in_specs = [layout.spec(bb, bq, q_at), layout.spec(bb, bkm, kv_at), layout.spec(bb, bkm, kv_at)]
    args = [q, k, v]
    if st.segments:
        in_specs += [
            pl.BlockSpec((bb, bq, LANES), lambda b, t, qi, j, *lens: (b, qi, 0)),
            pl.BlockSpec((bb, SUBLANES, bkm), lambda b, t, qi, j, *lens: (b, 0, kv_block(b, qi, j, lens))),
        ]
        args += [common.lane_layout(q_ids), common.sublane_layout(kv_ids)]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    out_specs = [layout.spec(bb, bq, q_at)]
    if save_lse:
        out_shape.append(jax.ShapeDtypeStruct((batch, heads, q_pad, LANES), jnp.float32))
        out_specs.append(pl.BlockSpec((bb, per_tile, bq, LANES), lambda b, t, qi, j, *lens: (b, t, qi, 0)))
    scratch = [
        pltpu.VMEM((bb, per_tile, bq, LANES), jnp.float32),  # running max, per head
        pltpu.VMEM((bb, per_tile, bq, LANES), jnp.float32),  # running denominator, per head
        pltpu.VMEM((bb, bq, layout.width), jnp.float32),  # unnormalised output
    ]
    kernel = functools.partial(_kernel, st=st, block_k=config.block_k, n_kv=n_kv, n_steps=n_steps,
                               kv_pad=kv_pad_len != st.kv_len, save_lse=save_lse)
    nbytes = sum(x.size * x.dtype.itemsize for x in args) + sum(
        int(np.prod(o.shape)) * o.dtype.itemsize for o in out_shape)
    outs = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        **common.pallas_grid(st, (batch // bb, heads // per_tile, n_q, n_steps), in_specs, out_specs, scratch),
        compiler_params=common.compiler_params(st.interpret, st.vmem_limit),
        cost_estimate=common.cost_estimate(st, batch=batch, heads=heads, head_dim=layout.head_dim, matmuls=2,
                                           nbytes=nbytes),
        interpret=common.interpret_param(st.interpret),
        name="flash_attention_tpu_fwd",
    )(*(list(lengths) if st.lengths else []), *args)
    return outs[0], (outs[1] if save_lse else None)
