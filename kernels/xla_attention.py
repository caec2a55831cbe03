"""jax.nn.dot_product_attention, and the same steps written out in XLA when a soft cap is asked (jax.nn has none).

The fallback of `autotune.dot_product_attention`, the baselines the search's final re-timing runs beside the tuned
kernel (jax.nn's XLA and cuDNN implementations), and what each of them can run (`baseline_refusal`), so the search
and the runtime agree on it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.masking import MASK_VALUE
from kernels.problem import Problem

BASELINES = ("xla", "cudnn")  # jax.nn's implementations (db.IMPLEMENTATIONS adds the kernel's; a test keeps them equal)
CUDNN_DTYPES = ("float16", "bfloat16")


def baseline_refusal(implementation: str, problem: Problem, platform: str) -> str:
    """Why `jax.nn.dot_product_attention(implementation=...)` cannot run this problem on this platform ('' when it
    can): XLA runs everything (a soft cap is written out in XLA); cuDNN needs a GPU, half precision, no soft cap, no
    segment ids, and a window only to the left unless causal."""
    if implementation == "xla":
        return ""
    if implementation != "cudnn":
        raise ValueError(f"implementation must be one of {BASELINES}, got {implementation!r}")
    if platform != "gpu":
        return "cuDNN runs on NVIDIA GPUs only"
    if problem.dtype not in CUDNN_DTYPES:
        return f"cuDNN's fused attention takes {' and '.join(CUDNN_DTYPES)}, not {problem.dtype}"
    if problem.softcap is not None:
        return "jax.nn has no soft cap, and cuDNN's attention cannot add one"
    if problem.segments:
        return "cuDNN's attention takes no segment ids"
    if problem.window is not None and problem.window[1] != 0 and not problem.causal:
        return "cuDNN's attention takes a window to the right only with causal masking"
    return ""


def xla_attention(query, key, value, bias, mask, *, scale, is_causal, q_lens, kv_lens, window, cap,
                  implementation, return_residual):
    """jax.nn.dot_product_attention itself; with a soft cap (which jax.nn lacks) the same steps written out. A
    window side of None (no bound, which jax.nn cannot say) becomes the whole sequence."""
    if window is not None:
        window = tuple(max(query.shape[1], key.shape[1]) if side is None else side for side in window)
    if cap is None:
        return jax.nn.dot_product_attention(
            query, key, value, bias, mask, scale=scale, is_causal=is_causal, query_seq_lengths=q_lens,
            key_value_seq_lengths=kv_lens, local_window_size=window, implementation=implementation,
            return_residual=return_residual)
    batch, q_len, heads, head_dim = query.shape
    kv_len, kv_heads = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    qg = query.reshape(batch, q_len, kv_heads, groups, head_dim)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, key, preferred_element_type=jnp.float32)
    logits = logits.reshape(batch, heads, q_len, kv_len) * scale
    logits = cap * jnp.tanh(logits / cap)
    if bias is not None:
        logits = logits + jnp.asarray(bias).astype(jnp.float32)
    keep = jnp.ones((1, 1, q_len, kv_len), bool)
    rows, cols = jnp.arange(q_len)[:, None], jnp.arange(kv_len)[None, :]
    if mask is not None:
        keep = keep & mask
    if is_causal:
        keep = keep & (cols <= rows)
    if window is not None:
        keep = keep & (cols >= rows - window[0]) & (cols <= rows + window[1])
    if q_lens is not None:
        keep = keep & (jnp.arange(q_len)[None, None, :, None] < q_lens[:, None, None, None])
    if kv_lens is not None:
        keep = keep & (jnp.arange(kv_len)[None, None, None, :] < kv_lens[:, None, None, None])
    logits = jnp.where(keep, logits, MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
    probs = probs.reshape(batch, kv_heads, groups, q_len, kv_len)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, value).reshape(query.shape)
    if q_lens is not None:
        out = out * (jnp.arange(q_len)[None, :] < q_lens[:, None])[:, :, None, None].astype(out.dtype)
    if not return_residual:
        return out
    lse = jax.nn.logsumexp(logits, axis=-1).astype(key.dtype).transpose(0, 2, 1)
    return out, jax.lax.stop_gradient(lse)
