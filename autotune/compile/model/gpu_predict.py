"""Entry point for the compile worker: a GPU compile's XLA dump -> one predicted time for the whole call.

Each of our kernels the compile launches (forward, or for a backward problem also dq and dk/dv) is predicted from its
SASS and they add up; XLA's own small fusions around them count as a launch each. Our kernels' trip counts come from
their block arithmetic (`gpu_blocks.ours`).
"""
from __future__ import annotations

from typing import Any

from autotune.compile.model.gpu_blocks import ours, role_of
from autotune.compile.model.gpu_hardware import FITTED, HARDWARE, get_hardware
from autotune.compile.model.gpu_model import combine, predict_kernel
from autotune.compile.model.gpu_sass import dump_kernels, launches, tools_missing
from autotune.compile.model.prediction import Prediction
from kernels import Problem

# the catalogue's targets (autotune.compile.targets) and the product each one stands for
TARGET_HARDWARE = {"h100": "h100", "a100": "a100", "h200": "h200", "h100_pcie": "h100_pcie"}


def _blocks(config: Any, role: str) -> tuple[int, int]:
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    if role == "forward":
        return data["block_q"], data["block_k"]
    return data["bwd_block_q"], data["bwd_block_k"]


def predict_gpu_compile(dump_dir: str, target_name: str, problem: Problem, config: Any,
                        device_kind: str | None = None) -> Prediction | None:
    """Predicted seconds of one call (forward, or forward + backward for a backward problem) of our GPU kernel
    compiled into `dump_dir` (XLA's `xla_dump_to`) for `target_name`; None when the target is not a GPU we model,
    the SASS tools are missing, or the dump holds none of our kernels."""
    name = TARGET_HARDWARE.get(target_name)
    if name is None or name not in HARDWARE or tools_missing():
        return None
    hw = get_hardware(name)
    kind = device_kind or ("NVIDIA H100 80GB HBM3" if hw.arch == "sm_90a" else "NVIDIA A100-SXM4-80GB")
    # XLA's own small kernels around ours (casts, the backward's row sums) are not disassembled: ptxas and
    # cuobjdump on each would double what predicting costs; they count as one launch each
    predictions = [predict_kernel(hw, k, ours(problem, *_blocks(config, role_of(k.name)), role_of(k.name), kind))
                   for k in dump_kernels(dump_dir, hw.arch, keep=lambda name: role_of(name) is not None)]
    if not predictions:
        return None
    others = len(launches(dump_dir)) - len(predictions)
    total = combine(predictions)
    if others > 0:
        extra = others * FITTED.launch_seconds
        total = Prediction(seconds=total.seconds + extra, roofline_seconds=total.roofline_seconds, bound=total.bound,
                           parts={**total.parts, "other_kernels_launch": extra}, model_version=total.model_version)
    return total
