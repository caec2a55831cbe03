"""What each attention kernel costs, told to XLA through `pallas_call(cost_estimate=...)`.

XLA cannot look inside a custom call: without an estimate its scheduler and `cost_analysis()` see a kernel as free.
The counts are the usual ones (two flops per multiply-add over the visible query/key pairs, one exp per visible
score; each operand and result read or written once), exact for causal masks of any q/kv length ratio.
"""
from __future__ import annotations

from jax.experimental import pallas as pl


def visible_pairs(q_len: int, kv_len: int, causal: bool) -> int:
    """Query/key pairs a head computes: all of them, or those with key <= query under top-left causal."""
    if not causal:
        return q_len * kv_len
    if q_len <= kv_len:
        return q_len * (q_len + 1) // 2
    return kv_len * (kv_len + 1) // 2 + (q_len - kv_len) * kv_len


def estimate(*, batch: int, heads: int, q_len: int, kv_len: int, head_dim: int, causal: bool, matmuls: int,
             exps: int, nbytes: int) -> pl.CostEstimate:
    """`matmuls` [pairs x head_dim] products per visible pair (2 forward, 3 dq, 4 dk/dv), `exps` exps per pair."""
    pairs = batch * heads * visible_pairs(q_len, kv_len, causal)
    return pl.CostEstimate(flops=int(2 * matmuls * pairs * head_dim), transcendentals=int(exps * pairs),
                           bytes_accessed=int(nbytes))
