"""Which implementation of attention runs a key: our tuned kernel, or one of `jax.nn.dot_product_attention`'s own.

Users switch from `jax.nn.dot_product_attention` to ours; that must never cost them speed. So the final re-timing of
a search runs XLA's attention (and cuDNN's on a GPU) interleaved with the top kernel configs, and a baseline wins
the key when it is clearly faster: by more than a noise margin. The search stores the winner; the runtime runs it
when the call's features allow (`baseline_refusal`). One module says both, so the search and the runtime agree.
"""
from __future__ import annotations

from collections.abc import Mapping

from db import IMPLEMENTATIONS, KERNEL_IMPLEMENTATION
from kernels import Problem

KERNEL = KERNEL_IMPLEMENTATION  # "pallas": the tuned kernel
BASELINES = tuple(name for name in IMPLEMENTATIONS if name != KERNEL)  # jax.nn's implementations: "xla", "cudnn"
DEFAULT_MARGIN = 0.03  # a baseline must be more than 3% faster than the best kernel config to win
CUDNN_DTYPES = ("float16", "bfloat16")


def check_margin(margin, name: str = "baseline_margin") -> float:
    """The noise margin as a fraction from 0 (any faster baseline wins) up to, not including, 1."""
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin < 1:
        raise ValueError(f"{name} must be a fraction from 0 to below 1 (0.03 = 3%), got {margin!r}")
    return float(margin)


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

