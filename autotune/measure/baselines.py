"""What tuned kernels are compared with: XLA's and cuDNN's attention, and JAX's own Pallas kernel.

Each baseline is built as a jitted function with the candidates' signature (q, k, v, q_ids, kv_ids, q_lengths,
kv_lengths[, d_out]) so the same timing code and the same input buffers serve all of them.
"""
from __future__ import annotations

from typing import Callable

import jax.numpy as jnp

from autotune.measure.kernel_call import abstract_args, jitted_call
from kernels.xla_attention import BASELINES, baseline_refusal, xla_attention
from kernels import Problem


def dot_product_attention_forward(problem: Problem, implementation: str = "xla") -> Callable:
    """`jax.nn.dot_product_attention` with the given implementation ("xla" or "cudnn") as an unjitted
    `forward(q, k, v, q_ids, kv_ids, q_lengths, kv_lengths)`; the ids and lengths are used only where the problem has
    them. A soft cap, which jax.nn lacks, is written out in XLA (kernels.xla_attention)."""
    def forward(q, k, v, q_ids, kv_ids, q_lengths, kv_lengths):
        mask = (q_ids[:, :, None] == kv_ids[:, None, :])[:, None] if problem.segments else None
        q_lens, kv_lens = (q_lengths, kv_lengths) if problem.lengths else (None, None)
        return xla_attention(q, k, v, None, mask, scale=1.0 / problem.head_dim ** 0.5, is_causal=problem.causal,
                             q_lens=q_lens, kv_lens=kv_lens, window=problem.window, cap=problem.softcap,
                             implementation=implementation, return_residual=False)

    return forward


def dot_product_attention_call(problem: Problem, implementation: str = "xla") -> Callable:
    """`dot_product_attention_forward` jitted with the candidates' signature (forward, or forward and backward)."""
    return jitted_call(dot_product_attention_forward(problem, implementation), problem)


def compiled_baselines(problem: Problem, platform: str) -> dict[str, Callable]:
    """jax.nn's implementations that can run the problem here, compiled with the candidates' signature, by name
    ("xla", "cudnn"): what the final re-timing runs beside the top kernel configs. One that cannot run the problem
    (`baseline_refusal`) or that its compiler refuses (cuDNN's own limits on head_dim, say) is left out."""
    compiled = {}
    for name in BASELINES:
        if baseline_refusal(name, problem, platform):
            continue
        try:
            compiled[name] = dot_product_attention_call(problem, name).lower(*abstract_args(problem)).compile()
        except Exception:  # noqa: BLE001 - a baseline the compiler refuses does not compete
            continue
    return compiled


def pallas_mha_call(problem: Problem, *, interpret: bool) -> Callable | None:
    """JAX's own Pallas GPU `mha` at its default block sizes, or None where it cannot run the problem.

    It has no GQA (k and v are repeated to the query heads), one segment-id array for both sides (so it needs
    q_len == kv_len), and refuses lengths that are not multiples of its blocks.
    """
    try:
        from jax.experimental.pallas.ops.gpu import attention as jax_attention
    except ImportError:
        return None
    if (problem.segments and problem.q_len != problem.kv_len) or problem.window is not None \
            or problem.softcap is not None or problem.lengths:
        return None
    block = 128
    if problem.q_len % min(block, problem.q_len) or problem.kv_len % min(block, problem.kv_len):
        return None
    scale = 1.0 / problem.head_dim ** 0.5

    def forward(q, k, v, q_ids, kv_ids, q_lengths, kv_lengths):
        groups = problem.groups
        k_full = jnp.repeat(k, groups, axis=2) if groups > 1 else k
        v_full = jnp.repeat(v, groups, axis=2) if groups > 1 else v
        sizes = jax_attention.BlockSizes(
            block_q=min(block, problem.q_len), block_k=min(block, problem.kv_len),
            block_q_dkv=min(32, problem.q_len), block_kv_dkv=min(32, problem.kv_len),
            block_q_dq=min(32, problem.q_len), block_kv_dq=min(32, problem.kv_len),
        )
        return jax_attention.mha(q, k_full, v_full, q_ids, sm_scale=scale, causal=problem.causal,
                                 block_sizes=sizes, interpret=interpret)

    return jitted_call(forward, problem)
