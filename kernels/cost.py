"""What each attention kernel costs, told to XLA through `pallas_call(cost_estimate=...)`.

XLA cannot look inside a custom call: without an estimate its scheduler and `cost_analysis()` see a kernel as free.
The counts are the usual ones (two flops per multiply-add over the visible query/key pairs of the band (causal and
window), one exp per visible score, one more tanh with a soft cap; each operand and result read or written once).
Run-time lengths are data, so they are not counted.
"""
from __future__ import annotations

from jax.experimental import pallas as pl

from kernels.masking import Band


def estimate(*, batch: int, heads: int, q_len: int, kv_len: int, head_dim: int, band: Band, matmuls: int,
             exps: int, nbytes: int, softcap: float | None = None) -> pl.CostEstimate:
    """`matmuls` [pairs x head_dim] products per visible pair (2 forward, 3 dq, 4 dk/dv), `exps` exps per pair."""
    pairs = batch * heads * band.pairs(q_len, kv_len)
    transcendentals = exps + (1 if softcap is not None else 0)
    return pl.CostEstimate(flops=int(2 * matmuls * pairs * head_dim), transcendentals=int(transcendentals * pairs),
                           bytes_accessed=int(nbytes))
