"""Which implementation wins a key's final re-timing: the tuned kernel, or one of jax.nn's own attentions.

Users switch from `jax.nn.dot_product_attention` to ours; that must never cost them speed. So the final re-timing
runs XLA's attention (and cuDNN's on a GPU) interleaved with the top kernel configs, and a baseline wins the key when
it is clearly faster: by more than a noise margin (`SearchOptions.baseline_margin`, 3% by default). The store keeps
the winner with every time; the runtime runs it where the call allows (`kernels.xla_attention.baseline_refusal`).
"""
from __future__ import annotations

from collections.abc import Mapping

from autotune.options import DEFAULT_MARGIN, check_margin
from db import KERNEL_IMPLEMENTATION as KERNEL


def choose_winner(times: Mapping[str, float], *, margin: float = DEFAULT_MARGIN, interpret: bool = False) -> str:
    """The implementation that won a final re-timing, from every one's time (the kernel's under "pallas"): the
    fastest baseline when it beats the kernel by more than `margin`, else the kernel. On the CPU interpret platform
    the kernel always wins: interpret-mode times say nothing about compiled speed, so they are never compared with
    compiled XLA."""
    margin = check_margin(margin)
    if KERNEL not in times:
        raise ValueError(f"times must hold the kernel's time ({KERNEL!r}), got {sorted(times)}")
    baselines = {name: time for name, time in times.items() if name != KERNEL}
    if interpret or not baselines:
        return KERNEL
    fastest = min(baselines, key=baselines.__getitem__)
    return fastest if baselines[fastest] * (1 + margin) < times[KERNEL] else KERNEL
