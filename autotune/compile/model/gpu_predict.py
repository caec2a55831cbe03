"""Entry point for the compile worker: a GPU compile's XLA dump -> one predicted time for the whole call.

Every kernel the compile launches (ours: forward, or for a backward problem dq and dk/dv; XLA's own small
fusions around them) is predicted from its SASS and they add up. Our kernels' trip counts come from their block
arithmetic (`gpu_blocks.ours`); a kernel we do not know runs its loops once per program.
"""
from __future__ import annotations

from typing import Any

from autotune.compile.model.gpu_blocks import ours, role_of
from autotune.compile.model.gpu_hardware import HARDWARE, get_hardware
from autotune.compile.model.gpu_model import combine, predict_kernel
from autotune.compile.model.gpu_sass import dump_kernels, tools_missing
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
    predictions = []
    ours_found = False
    for kernel in dump_kernels(dump_dir, hw.arch):
        role = role_of(kernel.name)
        work = None
        if role is not None:
            ours_found = True
            work = ours(problem, *_blocks(config, role), role, kind)
        predictions.append(predict_kernel(hw, kernel, work))
    return combine(predictions) if ours_found else None
