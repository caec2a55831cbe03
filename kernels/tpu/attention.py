"""The public entry point: input checks, layout and padding around the kernels, and the custom VJP.

Our layout is [batch, seq, heads, head_dim]. The kernels read and write it in place where Mosaic's tiling allows
(head_dim a multiple of 128, or 64 with pairs of heads: kernels.tpu.layout), and otherwise a [batch, heads, seq,
head_dim] copy. The sequence is padded to whole blocks (interpret mode reads NaN out of bounds, and Mosaic wants
whole tiles anyway): a copy only when the length is not a multiple of the blocks (fused into the transposed copy
where there is one). float16 is widened to float32 here: Mosaic (libtpu 0.0.42, jax 0.10.2) cannot load float16
vectors on any generation (v4, v5e, v5p, v6e: "Invalid vector type for load"), so float16 cannot stay float16 in
HBM.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels.entry import checked_config, configs_unchecked, prepare
from kernels.problem import Problem
from kernels.tpu.backward import backward
from kernels.tpu.common import NO_KEY_LSE, Static
from kernels.tpu.config import Config, invalid_reasons, round_up, vmem_limit_bytes
from kernels.tpu.forward import forward
from kernels.tpu.layout import Layout


def _kernel_dtype(dtype) -> jnp.dtype:
    return jnp.dtype(jnp.float32) if jnp.dtype(dtype) == jnp.float16 else jnp.dtype(dtype)


def _resize_lse(lse: jax.Array, true_len: int, length: int) -> jax.Array:
    """Re-pad the [b, h, padded, 128] log-sum-exp from the forward's block padding to the backward's; padded rows
    get NO_KEY_LSE, so their p is 0."""
    if lse.shape[2] == length:
        return lse
    return jnp.pad(lse[:, :, :true_len], ((0, 0), (0, 0), (0, length - true_len), (0, 0)),
                   constant_values=NO_KEY_LSE)


def _kernel_precision():
    """Trace the kernels with 32-bit defaults even under `jax_enable_x64`: Mosaic cannot lower the int64 grid
    indices and float64 constants that Python literals become there (its operands are 32-bit already)."""
    return jax.enable_x64(False)


def _ids(q_ids, kv_ids, q_len: int, kv_len: int):
    """Segment ids padded to the kernels' lengths, or (None, None)."""
    if q_ids is None:
        return None, None
    q_ids = jnp.pad(q_ids, ((0, 0), (0, q_len - q_ids.shape[1])))
    kv_ids = jnp.pad(kv_ids, ((0, 0), (0, kv_len - kv_ids.shape[1])))
    return q_ids, kv_ids


def _forward(st: Static, config: Config, q, k, v, q_ids, kv_ids, lengths, save_lse: bool):
    q_pad = round_up(st.q_len, config.block_q)
    kv_pad = round_up(st.kv_len, config.block_k_major)
    dtype = _kernel_dtype(q.dtype)
    layout = st.layout
    qt, kt, vt = (layout.to_kernel(x, n, dtype) for x, n in ((q, q_pad), (k, kv_pad), (v, kv_pad)))
    q_ids_p, kv_ids_p = _ids(q_ids, kv_ids, q_pad, kv_pad)
    with _kernel_precision():
        out_t, lse = forward(qt, kt, vt, q_ids_p, kv_ids_p, lengths, st=st, config=config, save_lse=save_lse)
    return layout.from_kernel(out_t, st.q_len, q.dtype), (qt, kt, vt, out_t, lse)


def _public_lse(lse: jax.Array, q_len: int) -> jax.Array:
    """The kernels' lane-broadcast [b, h, padded, 128] log-sum-exp as float32 [b, q_len, h], -inf for rows that
    see no key (the kernels store NO_KEY_LSE there)."""
    lse = jnp.swapaxes(lse[:, :, :q_len, 0], 1, 2)
    return jnp.where(lse >= 0.5 * NO_KEY_LSE, -jnp.inf, lse)


def _result(st: Static, out, lse):
    return (out, _public_lse(lse, st.q_len)) if st.return_lse else out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _attention(st: Static, config: Config, problem: Problem, q, k, v, q_ids, kv_ids, lengths):
    out, (*_, lse) = _forward(st, config, q, k, v, q_ids, kv_ids, lengths, save_lse=st.return_lse)
    return _result(st, out, lse)


def _attention_fwd(st: Static, config: Config, problem: Problem, q, k, v, q_ids, kv_ids, lengths):
    reasons = [] if configs_unchecked() else invalid_reasons(config, problem.replace(backward=True),
                                                              device_kind=st.device_kind)
    if reasons:
        raise ValueError("config cannot run the backward pass of this problem: " + "; ".join(reasons))
    out, (qt, kt, vt, out_t, lse) = _forward(st, config, q, k, v, q_ids, kv_ids, lengths, save_lse=True)
    return _result(st, out, lse), (qt, kt, vt, out_t, lse, q_ids, kv_ids, lengths)


def _attention_bwd(st: Static, config: Config, problem: Problem, res, cotangent):
    qt, kt, vt, out_t, lse, q_ids, kv_ids, lengths = res
    d_out = cotangent[0] if st.return_lse else cotangent  # the lse carries no gradient
    dtype = jnp.dtype(problem.dtype)
    q_pad = round_up(st.q_len, config.bwd_block_q)
    kv_pad = round_up(st.kv_len, config.bwd_block_k_major)
    layout = st.layout
    qt, out_t = layout.resize(qt, st.q_len, q_pad), layout.resize(out_t, st.q_len, q_pad)
    lse = _resize_lse(lse, st.q_len, q_pad)
    kt, vt = layout.resize(kt, st.kv_len, kv_pad), layout.resize(vt, st.kv_len, kv_pad)
    do_t = layout.to_kernel(d_out, q_pad, _kernel_dtype(d_out.dtype))
    q_ids_p, kv_ids_p = _ids(q_ids, kv_ids, q_pad, kv_pad)
    with _kernel_precision():
        dq, dk, dv = backward(qt, kt, vt, out_t, lse, do_t, q_ids_p, kv_ids_p, lengths, st=st, config=config)
    return (layout.from_kernel(dq, st.q_len, dtype), layout.from_kernel(dk, st.kv_len, dtype),
            layout.from_kernel(dv, st.kv_len, dtype), None, None, None)


_attention.defvjp(_attention_fwd, _attention_bwd)


def flash_attention(q, k, v, *, causal: bool = False, segment_ids=None, sm_scale: float | None = None,
                    window=None, softcap: float | None = None, q_lengths=None, kv_lengths=None,
                    return_lse: bool = False, config: Config | None = None, interpret: bool = False,
                    device_kind: str | None = None):
    """Flash attention on TPU (Mosaic), or on the CPU in TPU interpret mode when `interpret` is true.

    q [batch, q_len, heads, head_dim], k and v [batch, kv_len, kv_heads, head_dim] (kv_heads divides heads);
    segment_ids: [batch, seq] when q_len == kv_len, or a pair (q_ids, kv_ids). Top-left causal.
    window: w or (left, right) (None on a side: unbounded): query i sees keys i - left .. i + right; kv blocks
    outside a q block's window are not visited. softcap: scores become softcap * tanh(scores / softcap).
    q_lengths / kv_lengths: int [batch] (may be traced): keys at or past kv_lengths[b] are never seen, rows at or
    past q_lengths[b] output zeros; blocks wholly past them are skipped. Returns an array like q, or with
    `return_lse` (out, lse): lse float32 [batch, q_len, heads], natural log, -inf for rows that see no key, no
    gradient. Differentiable in q, k, v (backward kernels for dq and dk/dv); works under jit and vmap.
    `device_kind` (e.g. 'TPU v5 lite') is the TPU the VMEM checks and the kernels' VMEM limit are for; give it
    when compiling for a target that is not `jax.devices()[0]` (deviceless compiles).
    """
    call = prepare(q, k, v, causal=causal, segment_ids=segment_ids, sm_scale=sm_scale, window=window,
                   softcap=softcap, q_lengths=q_lengths, kv_lengths=kv_lengths, return_lse=return_lse,
                   interpret=interpret, device_kind=device_kind, platform="tpu")
    problem, kind = call.problem, call.device_kind
    reasons = functools.partial(invalid_reasons, return_lse=call.return_lse)
    config = checked_config(config, Config, reasons, problem, kind, "kernels.tpu.Config")
    st = Static(band=call.band, scale=call.scale, q_len=problem.q_len, kv_len=problem.kv_len,
                groups=problem.groups, segments=problem.segments, highest=problem.dtype != "bfloat16",
                interpret=call.interpret, device_kind=kind,
                vmem_limit=vmem_limit_bytes(config, problem.replace(backward=True), device_kind=kind),
                softcap=problem.softcap, lengths=problem.lengths, return_lse=call.return_lse,
                layout=Layout.of(problem.heads, problem.kv_heads, problem.head_dim))
    lengths = (call.q_lengths, call.kv_lengths) if problem.lengths else None
    result = _attention(st, config, problem, call.q, call.k, call.v, call.q_ids, call.kv_ids, lengths)
    if st.return_lse:
        out, lse = result
        return out, jax.lax.stop_gradient(lse)
    return result
