"""The validity models (shared memory on GPUs, VMEM on TPUs) against figures the real compilers reported.

The figures below come from deviceless compiles (XLA:GPU + Triton + ptxas 12.9 for sm_90a and sm_80; XLA:TPU +
Mosaic, libtpu 0.0.42); tests/compile/test_compile_targets.py checks the same models against live compiles where the
compilers are installed. These run anywhere, in milliseconds.
"""
from __future__ import annotations

import dataclasses

import pytest

from kernels import Problem
from kernels.gpu import Config as GpuConfig
from kernels.gpu import invalid_reasons as gpu_invalid_reasons
from kernels.gpu.config import dkv_smem_bytes, forward_smem_bytes, smem_limit
from kernels.tpu import Config as TpuConfig
from kernels.tpu import invalid_reasons as tpu_invalid_reasons
from kernels.tpu.config import default_scoped_vmem, forward_vmem_bytes, tpu_generation, vmem_limit

H100, A100 = "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"
SMALL_GPUS = ("NVIDIA A100-SXM4-80GB", "NVIDIA L4", "NVIDIA GeForce RTX 4090")
D128 = Problem(batch=1, q_len=1024, kv_len=1024, heads=4, kv_heads=4, head_dim=128, dtype="bfloat16", causal=True,
               backward=True)
GPU_OK = GpuConfig(block_q=64, block_k=64, num_warps=4, num_stages=2,
                   bwd_block_q=32, bwd_block_k=32, bwd_num_warps=4, bwd_num_stages=2)


def test_hopper_dkv_estimate_covers_what_the_compiler_needs():
    # defect 1: backward 128x64, 3 stages needs 247808 B of 232448 on H100; 64x64, 2 stages needs 107520 B.
    over = dataclasses.replace(GPU_OK, bwd_block_q=128, bwd_block_k=64, bwd_num_warps=8, bwd_num_stages=3)
    reasons = gpu_invalid_reasons(over, D128, device_kind=H100)
    assert any("backward" in r and "shared memory" in r for r in reasons), reasons
    assert dkv_smem_bytes(128, 64, 3, D128, H100) >= 247808
    assert dkv_smem_bytes(64, 64, 2, D128, H100) >= 107520


def test_ampere_forward_estimate_is_not_hopper_sized():
    # defect 2: forward 128x128, 8 warps, 3 stages uses 160 KiB on A100 (limit 163 KiB): it must be accepted.
    config = dataclasses.replace(GPU_OK, block_q=128, block_k=128, num_warps=8, num_stages=3)
    problem = D128.replace(backward=False)
    assert gpu_invalid_reasons(config, problem, device_kind=A100) == []
    assert 163840 <= forward_smem_bytes(128, 128, 3, problem, A100) <= smem_limit(A100)


def test_limits_per_gpu():
    assert smem_limit(H100) == 232448 and smem_limit(A100) == 166912
    assert smem_limit("NVIDIA L4") == smem_limit("NVIDIA GeForce RTX 4090") == 101376
    assert smem_limit("Some Future GPU") == 101376  # unknown: the smallest current figure


@pytest.mark.parametrize("kind", SMALL_GPUS + (H100,))
@pytest.mark.parametrize("head_dim,dtype", [(128, "float32"), (256, "bfloat16"), (72, "float16")])
def test_gpu_default_config_is_valid_on_each_gpu(kind, head_dim, dtype):
    # defect 5: the default must fit the device it is made for.
    problem = Problem(batch=2, q_len=2048, kv_len=2048, heads=8, kv_heads=2, head_dim=head_dim, dtype=dtype,
                      causal=True, backward=True)
    config = GpuConfig.default(problem, device_kind=kind)
    assert gpu_invalid_reasons(config, problem, device_kind=kind) == []


def test_tpu_generations_and_limits():
    # defect 4: v5p applies 16 MiB by default (not 32); TPU7x is a 32 MiB-default, 64 MiB chip (not 16).
    kinds = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5": "v5p", "TPU v6 lite": "v6e", "TPU7x": "7x"}
    assert {kind: tpu_generation(kind) for kind in kinds} == kinds
    assert default_scoped_vmem("TPU v5") == 16 << 20 and default_scoped_vmem("TPU7x") == 32 << 20
    assert default_scoped_vmem("TPU v6 lite") == 32 << 20 and default_scoped_vmem("TPU v5 lite") == 16 << 20
    assert vmem_limit("TPU v4") == 16 << 20 and vmem_limit("TPU v5") == 67045949  # "Used 64.83M of 63.94M"
    assert vmem_limit("TPU7x") == 64 << 20 and vmem_limit("TPU v5 lite") == 128 << 20
    assert vmem_limit(None) == 16 << 20  # unknown device: the smallest chip's


@pytest.mark.parametrize("blocks", [(1, 1024, 1024, 512), (2, 512, 1024, 512), (1, 1024, 2048, 512)])
def test_tpu_big_blocks_are_accepted_where_they_compile(blocks):
    # defect 4: configs like these were estimated at 12-20 MiB and rejected on v5e (16 MiB assumed); v5e compiles
    # them (the kernels raise the scoped limit; v5e has 128 MiB), using 3-11 MiB by the compiler's own report.
    problem = Problem(batch=2, q_len=2048, kv_len=2048, heads=8, kv_heads=8, head_dim=128, dtype="bfloat16",
                      causal=True)
    bb, bq, bkm, bk = blocks
    config = TpuConfig(block_b=bb, block_q=bq, block_k_major=bkm, block_k=bk, bwd_block_q=256,
                       bwd_block_k_major=256, bwd_block_k=256)
    assert tpu_invalid_reasons(config, problem, device_kind="TPU v5 lite") == []
    assert forward_vmem_bytes(config, problem, "TPU v5 lite") < 18 << 20  # with its lse block (1.1 MiB)


@pytest.mark.parametrize("kind", ["TPU v4", "TPU v5 lite", "TPU v5", "TPU v6 lite", "TPU7x", None])
def test_tpu_default_takes_the_device_kind_and_is_valid(kind):
    # defect 5 on TPU: Config.default(problem, *, device_kind) like the GPU kernel's.
    problem = Problem(batch=2, q_len=4096, kv_len=4096, heads=8, kv_heads=2, head_dim=256, dtype="float32",
                      causal=True, segments=True, backward=True)
    config = TpuConfig.default(problem, device_kind=kind)
    assert tpu_invalid_reasons(config, problem, device_kind=kind) == []
