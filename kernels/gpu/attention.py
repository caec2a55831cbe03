"""The public entry point: validation, then a custom_vjp whose forward and backward are the Pallas kernels.

Everything that can be wrong with the arguments is reported here, before anything is traced into a kernel.
Nothing is padded: ragged sequence tails and a head_dim that is not a power of two are masked inside each kernel,
so the forward and the backward can use different block sizes and no pass copies its operands in HBM.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from kernels.devices import is_hopper
from kernels.entry import checked_config, prepare
from kernels.gpu.backward import backward
from kernels.gpu.common import LOG2E, LSE_EMPTY, Masking
from kernels.gpu.config import Config, invalid_reasons
from kernels.gpu.forward import forward


@dataclass(frozen=True)
class _Static:
    """Hashable static arguments of one attention call (jit and custom_vjp key on them)."""

    scale: float
    masking: Masking
    config: Config
    interpret: bool
    one_loop: bool = True  # Hopper: one loop over key blocks (see kernels.gpu.common.kv_ranges)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _attention(q, k, v, q_ids, kv_ids, q_lengths, kv_lengths, static: _Static):
    return _attention_fwd(q, k, v, q_ids, kv_ids, q_lengths, kv_lengths, static)[0]


def _attention_fwd(q, k, v, q_ids, kv_ids, q_lengths, kv_lengths, static: _Static):
    out, lse = forward(
        q, k, v, q_ids, kv_ids, q_lengths, kv_lengths,
        scale=static.scale, masking=static.masking, config=static.config, interpret=static.interpret,
        one_loop=static.one_loop,
    )
    return (out, lse), (q, k, v, q_ids, kv_ids, q_lengths, kv_lengths, out, lse)


def _attention_bwd(static: _Static, residuals, cotangents):
    q, k, v, q_ids, kv_ids, q_lengths, kv_lengths, out, lse = residuals
    dout, _ = cotangents  # the logsumexp is returned under stop_gradient: its cotangent is zero
    dq, dk, dv = backward(
        q, k, v, q_ids, kv_ids, q_lengths, kv_lengths, out, lse, dout,
        scale=static.scale, masking=static.masking, config=static.config, interpret=static.interpret,
        one_loop=static.one_loop,
    )
    return dq, dk, dv, None, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


@functools.partial(jax.jit, static_argnums=(7, 8))
def _attention_jit(q, k, v, q_ids, kv_ids, q_lengths, kv_lengths, static: _Static, return_lse: bool):
    out, lse2 = _attention(q, k, v, q_ids, kv_ids, q_lengths, kv_lengths, static)
    if not return_lse:
        return out
    # base-2 logsumexp [b, h, q] -> natural log [b, q, h]; rows that see no key hold LSE_EMPTY -> -inf
    lse = jnp.where(lse2 >= LSE_EMPTY, -jnp.inf, lse2 / LOG2E).transpose(0, 2, 1)
    return out, jax.lax.stop_gradient(lse)


def flash_attention(
    q, k, v, *, causal: bool = False, segment_ids=None, sm_scale: float | None = None, window=None,
    softcap: float | None = None, q_lengths=None, kv_lengths=None, return_lse: bool = False,
    config: Config | None = None, interpret: bool = False, device_kind: str | None = None,
):
    """Flash attention on the GPU (Triton lowering of Pallas), or on the CPU with `interpret=True`.

    q [batch, q_len, heads, head_dim]; k, v [batch, kv_len, kv_heads, head_dim] with kv_heads dividing heads.
    `segment_ids`: one int array [batch, seq] or a pair (q_ids, kv_ids); a query sees a key only in its segment.
    Causal is top-left (query i sees key j iff j <= i). `window`: an int w or (left, right) (either side None: no
    bound): query i sees keys i - left .. i + right; key blocks out of it are skipped. `softcap`: scores s become
    softcap * tanh(s / softcap) before the mask. `q_lengths`, `kv_lengths`: int [batch] (run-time values allowed):
    keys at or past kv_lengths[b] are never seen, query rows at or past q_lengths[b] output zeros. A query that
    sees no key gets zeros. Differentiable in q, k and v; works under jit and vmap. Output: like q; with
    `return_lse`, (out, lse) where lse is the natural log-sum-exp of the visible scores, float32 [b, q_len, heads],
    -inf for a row that sees no key, without gradient.
    `device_kind` (e.g. 'NVIDIA H100 80GB HBM3') is the GPU the default config and the shared-memory checks are
    for; give it when compiling for a target that is not `jax.devices()[0]` (deviceless compiles).
    """
    call = prepare(q, k, v, causal=causal, segment_ids=segment_ids, sm_scale=sm_scale, window=window,
                   softcap=softcap, q_lengths=q_lengths, kv_lengths=kv_lengths, return_lse=return_lse,
                   interpret=interpret, device_kind=device_kind, platform="gpu")
    problem, kind = call.problem, call.device_kind
    config = checked_config(config, Config, invalid_reasons, problem, kind, "kernels.gpu.Config")
    masking = Masking(band=call.band, softcap=problem.softcap, lengths=problem.lengths)
    static = _Static(scale=call.scale, masking=masking, config=config, interpret=call.interpret,
                     one_loop=is_hopper(kind))
    return _attention_jit(call.q, call.k, call.v, call.q_ids, call.kv_ids, call.q_lengths, call.kv_lengths, static,
                          call.return_lse)
