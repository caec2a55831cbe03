"""The memory checks against the examples the compilers refused (issue 23): each is rejected, naming its limit, or
fits; figures from deviceless compiles (XLA:GPU + Triton + ptxas for sm_90a/sm_80; XLA:TPU + Mosaic, libtpu 0.0.42).
These run anywhere, in milliseconds; tests/test_memory_compiles.py compiles near-limit configs for real."""
from __future__ import annotations

import pytest

from autotune.compile.figures import scoped_use, tpu_kernels
from kernels import Problem
from kernels.gpu import Config as GpuConfig
from kernels.gpu import invalid_reasons as gpu_reasons
from kernels.gpu import memory_estimate as gpu_memory_estimate
from kernels.gpu.config import dkv_smem_bytes, forward_smem_bytes
from kernels.tpu import Config as TpuConfig
from kernels.tpu.config import forward_vmem_bytes, vmem_limit, vmem_parts

H100, A100 = "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"
D256_F32 = Problem(batch=2, q_len=2048, kv_len=2048, heads=4, kv_heads=4, head_dim=256, dtype="float32", causal=True)


def test_h100_d256_float32_forward_64x64_two_stages_is_rejected_and_not_the_default():
    # the compiler asks 262144 B of 232448 for it; it was the default config of this problem
    assert forward_smem_bytes(64, 64, 2, D256_F32, H100) >= 262144
    config = GpuConfig.default(D256_F32, device_kind=H100)
    assert (config.block_q, config.block_k, config.num_stages) != (64, 64, 2)
    assert gpu_reasons(config, D256_F32, device_kind=H100) == []
    bad = GpuConfig(64, 64, 8, 2, 32, 32, 8, 2)
    assert any("227 KiB limit" in r for r in gpu_reasons(bad, D256_F32, device_kind=H100))


def test_h100_float32_dkv_three_stages_keeps_three_buffers():
    problem = D256_F32.replace(head_dim=128, backward=True)
    assert dkv_smem_bytes(64, 64, 3, problem, H100) >= 280 * 1024
    assert dkv_smem_bytes(64, 64, 4, problem, H100) >= 294912  # refused at 294912 B
    assert dkv_smem_bytes(64, 64, 2, problem, H100) >= 213504  # compiles at 213504 B


@pytest.mark.parametrize("kind, problem, blocks, warps, stages, role, compiled", [
    # one or two warps: no wgmma on Hopper, dots laid out as on Ampere (rejected at 273 KiB when staged for wgmma)
    (H100, D256_F32.replace(head_dim=128, dtype="bfloat16"), (64, 128), 2, 4, "forward", 229376),
    # float32 backward on mma: one dk/dv buffer at any depth, one of k and v per dq stage
    (H100, D256_F32.replace(head_dim=64, kv_heads=2, segments=True, backward=True), (128, 64), 2, 4, "dq", 131840),
    (H100, D256_F32.replace(head_dim=64, kv_heads=2, segments=True, backward=True), (128, 64), 1, 4, "dkv", 102912),
    (A100, D256_F32.replace(head_dim=64, kv_heads=2, segments=True, backward=True), (128, 64), 4, 3, "dkv", 101376),
    (A100, D256_F32.replace(head_dim=128, kv_heads=2, segments=True, backward=True), (32, 64), 1, 3, "dq", 131584),
])
def test_gpu_estimate_covers_what_compiled_and_accepts_it(kind, problem, blocks, warps, stages, role, compiled):
    fields = dict(block_q=blocks[0], block_k=blocks[1], num_warps=warps, num_stages=stages)
    if role != "forward":
        fields = {"block_q": 64, "block_k": 64, "num_warps": 4, "num_stages": 1,
                  **{f"bwd_{name}": value for name, value in fields.items()}}
    else:
        fields.update(bwd_block_q=32, bwd_block_k=32, bwd_num_warps=4, bwd_num_stages=1)
    config = GpuConfig(**fields)
    estimate = gpu_memory_estimate(config, problem, device_kind=kind)[role]
    assert compiled <= estimate <= 1.1 * compiled, estimate
    assert gpu_reasons(config, problem, device_kind=kind) == []


def test_a100_d256_block_q_128_counts_the_probability_tile():
    bf16 = D256_F32.replace(dtype="bfloat16")
    assert forward_smem_bytes(128, 64, 3, bf16, A100) >= 212992  # refused at 212992 B
    assert forward_smem_bytes(128, 16, 2, D256_F32, A100) > 166912  # over the limit in the compiler too


def test_v5p_capacity_is_what_the_compiler_reports():
    assert vmem_limit("TPU v5") == 67045949  # "Used 64.83M of 63.94M vmem"


def test_tpu_forward_counts_the_lse_block_only_with_a_backward():
    # the forward writes the logsumexp only for the backward: v4 compiled this forward-only config in 5107712 B,
    # less than its blocks and scratch with a double-buffered lse block (5767168 B), more than without (4718592 B)
    problem = D256_F32.replace(batch=4, head_dim=128, dtype="bfloat16")
    config = TpuConfig(4, 256, 512, 128, 256, 256, 256)
    forward_only = vmem_parts("forward", config, problem).fixed
    with_backward = vmem_parts("forward", config, problem.replace(backward=True)).fixed
    assert with_backward - forward_only == 2 * 4 * 256 * 128 * 4  # [block_b, block_q, 128] float32, twice
    assert forward_only < 5107712 < with_backward
    assert forward_vmem_bytes(config, problem, "TPU v4") >= 5107712


@pytest.mark.parametrize("configs,use", [
    ('{"memory_space":"1","offset":"0","size":"19963904"}', 19963904),
    ('{"memory_space":"1","offset":"33554432","size":"53518336"}', 19963904),
])
def test_tpu_figure_is_the_use_within_the_scoped_region(configs, use):
    assert scoped_use(configs) == use
    line = (f'  %flash_attention_tpu_fwd.1 = f32[2] custom-call(), custom_call_target="tpu_custom_call", '
            f'backend_config={{"used_scoped_memory_configs":[{configs}],"retry_config":{{}}}}')
    [kernel] = tpu_kernels(line)
    assert kernel.memory_bytes == use


def test_tpu_return_lse_forward_is_checked_with_its_lse_block():
    """A forward that returns its log-sum-exp writes the lse block: a config whose forward fits only without it is
    refused for `return_lse` with the forward's VMEM named, before anything is traced, and accepted without."""
    import jax
    import jax.numpy as jnp

    import itertools

    from kernels.tpu import flash_attention, search_space
    from kernels.tpu.config import invalid_reasons

    problem = Problem(batch=4, q_len=4096, kv_len=4096, heads=2, kv_heads=2, head_dim=128, dtype="float32")
    limit, space = vmem_limit("TPU v4"), search_space(problem)
    fitting = [c for c in (TpuConfig(bb, bq, bkm, bk, 128, 128, 128) for bb, bq, bkm, bk in itertools.product(
                   space["block_b"], space["block_q"], space["block_k_major"], space["block_k"]) if bkm % bk == 0)
               if forward_vmem_bytes(c, problem, "TPU v4") <= limit
               < forward_vmem_bytes(c, problem.replace(backward=True), "TPU v4")]
    assert fitting, "some config should fit only without the lse block"
    config = fitting[0]
    assert invalid_reasons(config, problem, device_kind="TPU v4") == []
    [reason] = invalid_reasons(config, problem, device_kind="TPU v4", return_lse=True)
    assert reason.startswith("forward needs about")
    q = jax.random.normal(jax.random.key(3), (4, 4096, 2, 128), jnp.float32)
    with pytest.raises(ValueError, match="forward needs about"):
        flash_attention(q, q, q, return_lse=True, config=config, device_kind="TPU v4", interpret=True)


def test_tpu_figures_name_operands_prefetched_into_vmem_and_a_root_kernel():
    """XLA may prefetch a kernel's operands whole into spare VMEM (S(1)); the figure then counts them, so their
    bytes are recorded beside it. A kernel that is the program's ROOT is found too."""
    text = ('  %q = f32[2,512,512]{2,1,0:T(8,128)S(1)} copy-done(%c)\n'
            '  %k = bf16[2,8,128]{2,1,0:T(8,128)(2,1)} parameter(1)\n'
            '  ROOT %transpose_jvp_flash_attention_tpu_dq__.1 = f32[2,512,512]{2,1,0:T(8,128)} custom-call(%q, '
            '/*index=1*/%k), custom_call_target="tpu_custom_call", backend_config={"used_scoped_memory_configs":'
            '[{"memory_space":"1","offset":"0","size":"10457088"}]}\n')
    [kernel] = tpu_kernels(text)
    assert (kernel.role, kernel.memory_bytes, kernel.operands_in_vmem) == ("dq", 10457088, 2 * 512 * 512 * 4)
