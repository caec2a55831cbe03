"""kernels.devices, the one place for device facts: every reader (the GPU kernel's loop choice and memory model, the
TPU model, the compile targets, the runtime's platform) answers from it, so they agree at the edges too."""
from __future__ import annotations

import pytest

from autotune.compile import targets
from autotune.device import DeviceInfo
from kernels import devices
from kernels.gpu import config as gpu_config
from kernels.tpu import config as tpu_config


@pytest.mark.parametrize("kind, hopper", [
    (None, True), ("cpu", True), ("TFRT_CPU_0", True),  # interpret mode: the largest current GPU
    ("NVIDIA H100 80GB HBM3", True), ("NVIDIA H200", True), ("NVIDIA GH200 480GB", True),
    ("NVIDIA A100-SXM4-80GB", False), ("NVIDIA L4", False),
])
def test_hopper_and_its_shared_memory_agree(kind, hopper):
    assert devices.is_hopper(kind) is hopper
    assert (devices.smem_limit(kind) == 232448) is hopper


def test_the_models_and_targets_read_the_one_definition():
    assert gpu_config.smem_limit is devices.smem_limit and gpu_config.is_hopper is devices.is_hopper
    assert tpu_config.vmem_limit is devices.vmem_limit and tpu_config.tpu_generation is devices.tpu_generation
    assert targets.smem_limit is devices.smem_limit and targets.vmem_limit is devices.vmem_limit


@pytest.mark.parametrize("jax_platform, ours", [("gpu", "gpu"), ("cuda", "gpu"), ("rocm", "gpu"), ("tpu", "tpu"),
                                                ("cpu", devices.INTERPRET), ("METAL", devices.INTERPRET)])
def test_platforms(jax_platform, ours):
    assert devices.platform_of(jax_platform) == ours
    assert DeviceInfo(ours, "x", "0", "h").interpret is (ours == devices.INTERPRET)
