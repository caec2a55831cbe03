"""Flax NNX on the tuned kernels: `nnx.MultiHeadAttention(..., attention_fn=autotune.nnx.attention_fn)`.

`attention_fn` takes what NNX passes its attention function (the arguments of `nnx.dot_product_attention`) and runs
`autotune.dot_product_attention`: the tuned kernel for causal and unmasked attention, XLA with one warning for a
mask or a bias. What only NNX's own function does (dropout on the attention weights, sowing them into the module)
runs it, with one warning per shape: those need the weights the flash kernels never build.
"""
from __future__ import annotations

import math

import jax.numpy as jnp

from autotune.runtime.attention import dot_product_attention
from autotune.runtime.notices import warn_once

try:
    from flax import nnx as _nnx
    from flax.nnx.nn import dtypes as _nnx_dtypes
except ImportError as exc:  # flax is an optional extra
    raise ImportError("autotune.nnx needs Flax: pip install -e '.[flax]' (or pip install flax)") from exc


def attention_fn(query, key, value, bias=None, mask=None, broadcast_dropout: bool = True, dropout_rng=None,
                 dropout_rate: float = 0.0, deterministic: bool = False, dtype=None, precision=None, module=None,
                 promote_dtype=None, is_causal: bool = False):
    """A drop-in for `flax.nnx.dot_product_attention`: [batch..., seq, heads, head_dim] in, the same shape out."""
    promote = promote_dtype or _nnx_dtypes.promote_dtype
    query, key, value = promote((query, key, value), dtype=dtype)
    dropout = dropout_rate > 0.0 and not deterministic
    if dropout or module is not None:
        why = "dropout on the attention weights" if dropout else "sow_weights=True (the weights are asked for)"
        warn_once(("nnx", why, query.shape, key.shape),
                  f"autotune.nnx.attention_fn runs nnx.dot_product_attention, not the tuned kernel, for query "
                  f"{tuple(query.shape)}: {why}")
        return _nnx.dot_product_attention(
            query, key, value, bias, mask, broadcast_dropout=broadcast_dropout, dropout_rng=dropout_rng,
            dropout_rate=dropout_rate, deterministic=deterministic, dtype=dtype, precision=precision,
            module=module, promote_dtype=promote, is_causal=is_causal)
    shape = query.shape
    if query.ndim > 4:  # several batch axes: one, as the kernels (and jax.nn) take them

        def flat(x):
            return None if x is None else jnp.reshape(x, (math.prod(x.shape[:-3]), *x.shape[-3:]))

        query, key, value, bias, mask = flat(query), flat(key), flat(value), flat(bias), flat(mask)
    if mask is not None:
        mask = jnp.asarray(mask).astype(jnp.bool_)
    out = dot_product_attention(query, key, value, bias, mask, is_causal=bool(is_causal))
    return jnp.reshape(out, shape)
