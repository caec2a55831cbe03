"""The einsum reference every kernel and every tuning candidate is checked against.

Plain XLA in float32: scores by einsum, a boolean mask, a softmax that gives zeros (not NaN) to a query row that
sees no key. It materialises [batch, heads, q_len, kv_len], so callers at long sequences check a slice of it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.masking import Band, visible
from kernels.problem import check_inputs, check_lengths, resolve_scale


def attention_mask(q_len: int, kv_len: int, *, causal: bool, q_ids=None, kv_ids=None, q_offset: int = 0,
                   window=None, q_lengths=None, kv_lengths=None):
    """Boolean [batch or 1, 1, q_len, kv_len] mask of which key each query sees (top-left causal; a window
    (left, right) keeps keys i-left..i+right; lengths [batch] hide keys and query rows at or past them)."""
    mask = jnp.ones((1, 1, q_len, kv_len), dtype=bool)
    rows = q_offset + jnp.arange(q_len)[:, None]
    cols = jnp.arange(kv_len)[None, :]
    per_row = (lambda lengths: None if lengths is None else lengths[:, None, None, None])  # noqa: E731
    rule = visible(rows, cols, Band.of(causal=causal, window=window), q_len=per_row(q_lengths),
                   kv_len=per_row(kv_lengths))
    if rule is not None:
        mask = mask & rule
    if q_ids is not None:
        mask = mask & (q_ids[:, None, :, None] == kv_ids[:, None, None, :])
    return mask


def attention_reference(
    q, k, v, *, causal: bool = False, segment_ids=None, sm_scale: float | None = None, q_offset: int = 0,
    window=None, softcap: float | None = None, q_lengths=None, kv_lengths=None, return_lse: bool = False,
):
    """Attention by einsum in float32; output [batch, q_len, heads, head_dim] in q's dtype.

    `q_offset` says that q holds rows q_offset.. of a longer query sequence (for checking long problems in
    chunks): causal masking, the window and q_lengths then use those absolute positions. With pairs of segment ids,
    pass the chunk's q ids. `softcap` caps the scaled scores (cap * tanh(s / cap)) before masking. With
    `return_lse` also the natural-log log-sum-exp of the visible scores, float32 [batch, q_len, heads] (-inf for a
    row that sees no key).
    """
    problem, q_ids, kv_ids = check_inputs(q, k, v, segment_ids, causal=causal, window=window, softcap=softcap,
                                          lengths=q_lengths is not None or kv_lengths is not None)
    q_lengths = check_lengths(q_lengths, "q_lengths", problem.batch, q_offset + problem.q_len)
    kv_lengths = check_lengths(kv_lengths, "kv_lengths", problem.batch, problem.kv_len)
    scale = resolve_scale(sm_scale, problem.head_dim)
    groups = problem.groups
    qf = q.astype(jnp.float32)
    kf = jnp.repeat(k.astype(jnp.float32), groups, axis=2)
    vf = jnp.repeat(v.astype(jnp.float32), groups, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", qf, kf, precision=jax.lax.Precision.HIGHEST) * scale
    if problem.softcap is not None:
        scores = problem.softcap * jnp.tanh(scores / problem.softcap)
    mask = attention_mask(problem.q_len, problem.kv_len, causal=causal, q_ids=q_ids, kv_ids=kv_ids,
                          q_offset=q_offset, window=problem.window, q_lengths=q_lengths, kv_lengths=kv_lengths)
    scores = jnp.where(mask, scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    weights = jnp.where(mask, jnp.exp(scores - row_max), 0.0)
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    probs = weights / jnp.where(denom == 0.0, 1.0, denom)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, vf, precision=jax.lax.Precision.HIGHEST).astype(q.dtype)
    if not return_lse:
        return out
    lse = jnp.where(denom > 0.0, row_max + jnp.log(jnp.where(denom > 0.0, denom, 1.0)), -jnp.inf)
    return out, lse[..., 0].transpose(0, 2, 1)


# Largest acceptable |kernel - reference| as (atol, rtol) per input dtype. float32 leaves room for TF32 dots on
# GPU; the half types for their 8- and 11-bit mantissas. Gradients accumulate over a whole sequence: twice as loose.
_TOLERANCES = {"float32": (5e-3, 5e-3), "float16": (1e-2, 1e-2), "bfloat16": (4e-2, 4e-2)}


def tolerance(dtype, *, grad: bool = False) -> tuple[float, float]:
    """(atol, rtol) for comparing a kernel's output (or gradient) in `dtype` with the reference."""
    atol, rtol = _TOLERANCES[jnp.dtype(dtype).name]
    return (2 * atol, 2 * rtol) if grad else (atol, rtol)
