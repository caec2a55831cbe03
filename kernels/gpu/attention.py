"""The public entry point: validation, then a custom_vjp whose forward and backward are the Pallas kernels.

Everything that can be wrong with the arguments is reported here, before anything is traced into a kernel.
Nothing is padded: ragged sequence tails and a head_dim that is not a power of two are masked inside each kernel,
so the forward and the backward can use different block sizes and no pass copies its operands in HBM.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import jax

from kernels.gpu.backward import backward
from kernels.gpu.common import wgmma_device
from kernels.gpu.config import Config, invalid_reasons
from kernels.gpu.forward import forward
from kernels.problem import check_inputs, resolve_scale


@dataclass(frozen=True)
class _Static:
    """Hashable static arguments of one attention call (jit and custom_vjp key on them)."""

    scale: float
    causal: bool
    config: Config
    interpret: bool
    one_loop: bool = True  # Hopper: one masked loop over key blocks (see kernels.gpu.common.kv_blocks)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(q, k, v, q_ids, kv_ids, static: _Static):
    out, _ = _attention_fwd(q, k, v, q_ids, kv_ids, static)
    return out


def _attention_fwd(q, k, v, q_ids, kv_ids, static: _Static):
    out, lse = forward(
        q, k, v, q_ids, kv_ids,
        scale=static.scale, causal=static.causal, config=static.config, interpret=static.interpret,
        one_loop=static.one_loop,
    )
    return out, (q, k, v, q_ids, kv_ids, out, lse)


def _attention_bwd(static: _Static, residuals, dout):
    q, k, v, q_ids, kv_ids, out, lse = residuals
    dq, dk, dv = backward(
        q, k, v, q_ids, kv_ids, out, lse, dout,
        scale=static.scale, causal=static.causal, config=static.config, interpret=static.interpret,
        one_loop=static.one_loop,
    )
    return dq, dk, dv, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)
_attention_jit = jax.jit(_attention, static_argnums=(5,))


def _device_kind(device_kind: str | None, interpret: bool) -> str | None:
    """The GPU the kernel is compiled for: the caller's (a compile target or the real device), else the default
    device when compiling, None in interpret mode (validated as Hopper)."""
    if device_kind is not None:
        if not isinstance(device_kind, str):
            raise TypeError(f"device_kind must be a str or None, got {type(device_kind).__name__}")
        return device_kind
    if interpret:
        return None
    return jax.devices()[0].device_kind


def flash_attention(
    q, k, v, *, causal: bool = False, segment_ids=None, sm_scale: float | None = None,
    config: Config | None = None, interpret: bool = False, device_kind: str | None = None,
):
    """Flash attention on the GPU (Triton lowering of Pallas), or on the CPU with `interpret=True`.

    q [batch, q_len, heads, head_dim]; k, v [batch, kv_len, kv_heads, head_dim] with kv_heads dividing heads.
    `segment_ids`: one int array [batch, seq] or a pair (q_ids, kv_ids); a query sees a key only in its segment.
    Causal is top-left (query i sees key j iff j <= i). A query that sees no key gets zeros. Differentiable in
    q, k and v; works under jit and vmap. Output: like q.
    `device_kind` (e.g. 'NVIDIA H100 80GB HBM3') is the GPU the default config and the shared-memory checks are
    for; give it when compiling for a target that is not `jax.devices()[0]` (deviceless compiles).
    """
    problem, q_ids, kv_ids = check_inputs(q, k, v, segment_ids, causal=causal)
    scale = resolve_scale(sm_scale, problem.head_dim)
    kind = _device_kind(device_kind, interpret)
    if config is None:
        config = Config.default(problem, device_kind=kind)
    elif not isinstance(config, Config):
        raise TypeError(f"config must be a kernels.gpu.Config or None, got {type(config).__name__}")
    reasons = invalid_reasons(config, problem, device_kind=kind)
    if reasons:
        raise ValueError(f"config {config.to_dict()} cannot run {problem}: " + "; ".join(reasons))
    static = _Static(scale=scale, causal=bool(causal), config=config, interpret=bool(interpret),
                     one_loop=wgmma_device(kind))
    return _attention_jit(q, k, v, q_ids, kv_ids, static)
