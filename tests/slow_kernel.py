"""A kernel module for tests whose "kernel" is compiled XLA made slow on purpose (the reference attention, run
REPEATS times in a loop that XLA cannot fold), so that jax.nn's XLA attention is clearly faster in a final re-timing
run on a CPU with the kernel compiled (interpret=False): how a search's stored best comes to name "xla" without a
GPU. The toy kernel's config and space; results equal the reference's."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels import attention_reference
from tests.toy_kernel import Config, invalid_reasons, search_space  # noqa: F401  (the kernel protocol's names)

NAME = "slow_flash_attention"
VERSION = "slow-1"
REPEATS = 12


def flash_attention(q, k, v, *, causal=False, segment_ids=None, sm_scale=None, config=None, interpret=False,
                    **features):
    def step(_index, out):  # each step reads the last output (times zero), so no step can be dropped or merged
        return attention_reference(q + 0 * out, k, v, causal=causal, segment_ids=segment_ids, sm_scale=sm_scale,
                                   **features)

    return jax.lax.fori_loop(0, REPEATS, step, jnp.zeros_like(q))
