"""What the lowered and compiled programs around the kernels look like (issue: kernel efficiency).

- GPU: the lowered program for a ragged, head_dim-72, GQA problem has no pad or slice around the kernels (ragged
  tails are masked in the kernels) and no reduction over the query-head group (dK/dV are summed in the kernel).
- GPU, deviceless H100 compile: the compiled gradient program's temporary memory is below one float32 dK buffer
  per query head (what the group reduction in XLA used to need).
- TPU, deviceless v5e compile: `cost_analysis()` reports the kernels' flops (each pallas_call has a cost
  estimate), and the VMEM limit the kernels are compiled with follows the config.

Compiles run in a subprocess (environment for the CUDA plugin and libtpu, no global state left in this process).
"""
from __future__ import annotations

import importlib.util
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import Problem
from kernels.masking import Band
from kernels.gpu import flash_attention as gpu_attention
from kernels.tpu.config import (
    LIMIT_HEADROOM, Config as TpuConfig, backward_vmem_bytes, default_scoped_vmem, forward_vmem_bytes, vmem_limit,
    vmem_limit_bytes,
)
from tests.compile_script import run_compile_script

INSTALL_HINT = "pip install -e '.[compilers]'"
# The acceptance case of the issue: batch 1, q = kv = 300, 8 heads over 2 kv heads, head_dim 72, bf16, causal.
B, L, H, HK, D = 1, 300, 8, 2, 72


def _specs(dtype=jnp.bfloat16):
    q = jax.ShapeDtypeStruct((B, L, H, D), dtype)
    k = jax.ShapeDtypeStruct((B, L, HK, D), dtype)
    return q, k, k


def _lowered_cuda(fn, *specs) -> str:
    try:
        return jax.jit(fn).trace(*specs).lower(lowering_platforms=("cuda",)).as_text()
    except NotImplementedError as exc:  # no Triton lowering for cuda in this jaxlib
        pytest.skip(f"cannot lower for cuda here ({exc}); {INSTALL_HINT}")


def _forward(q, k, v):
    return gpu_attention(q, k, v, causal=True, device_kind="NVIDIA H100 80GB HBM3")


def _gradients(q, k, v, do):
    out, pull = jax.vjp(_forward, q, k, v)
    return pull(do)


def test_gpu_forward_lowering_has_no_pad_or_slice():
    text = _lowered_cuda(_forward, *_specs())
    assert text.count("__gpu$xla.gpu.triton") == 1
    assert "stablehlo.pad" not in text
    assert "stablehlo.slice" not in text


def test_gpu_gradient_lowering_has_no_pad_slice_or_group_reduction():
    q, k, v = _specs()
    text = _lowered_cuda(_gradients, q, k, v, q)
    assert text.count("__gpu$xla.gpu.triton") == 3  # forward, dq, dk/dv
    assert "stablehlo.pad" not in text
    assert "stablehlo.slice" not in text
    groups = H // HK
    assert f"{B}x{L}x{HK}x{groups}x{D}" not in text  # the per-query-head dK/dV the group sum in XLA needed
    # the one reduction left is delta = rowsum(o * do) over head_dim, into [b, q_len, heads]
    assert text.count("stablehlo.reduce") == 1
    assert f"tensor<{B}x{L}x{H}xf32>" in text


def test_causal_accepts_python_and_numpy_bools_and_refuses_others():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((1, 16, 1, 16)), jnp.float32)
    a = gpu_attention(q, q, q, causal=np.bool_(True), interpret=True)
    b = gpu_attention(q, q, q, causal=True, interpret=True)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(TypeError, match="causal must be a bool"):
        gpu_attention(q, q, q, causal=1, interpret=True)


def test_vmem_limit_follows_the_config_within_the_device_limit():
    problem = Problem(batch=1, q_len=4096, kv_len=4096, heads=8, kv_heads=8, head_dim=128, dtype="bfloat16",
                      backward=True)
    configs = [TpuConfig(1, 128, 128, 128, 128, 128, 128), TpuConfig(1, 1024, 2048, 2048, 512, 1024, 1024),
               TpuConfig(8, 4096, 4096, 4096, 4096, 4096, 4096)]
    raised = 0
    for kind in (None, "TPU v5 lite", "TPU v6 lite"):
        for config in configs:
            need = max(forward_vmem_bytes(config, problem, kind), backward_vmem_bytes(config, problem, kind))
            got = vmem_limit_bytes(config, problem, device_kind=kind)
            if LIMIT_HEADROOM * need <= default_scoped_vmem(kind):
                assert got is None  # the compiler's default fits: nothing reserved beyond it
            else:  # the config's own need with its headroom, within the device's limit
                assert got == min(LIMIT_HEADROOM * need, vmem_limit(kind))
                raised += 1
    assert vmem_limit_bytes(configs[0], problem, device_kind="TPU v6 lite") is None
    assert raised >= 3


def _gpu_compilers_missing() -> str | None:
    if tuple(int(p) for p in jax.__version__.split(".")[:2]) >= (0, 11):
        return f"deviceless GPU compiles are set up for jax 0.10.x, not {jax.__version__}"
    if importlib.util.find_spec("jax_cuda12_plugin") is None:
        return f"the CUDA 12 plugin for jax is not installed ({INSTALL_HINT})"
    if shutil.which("ptxas") is None and importlib.util.find_spec("nvidia") is None:
        return f"ptxas is not available ({INSTALL_HINT})"
    return None


H100_TARGET = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "targets", "h100.txtpb")


@pytest.mark.slow
def test_gpu_gradient_temp_memory_below_one_per_head_buffer():
    missing = _gpu_compilers_missing()
    if missing:
        pytest.skip(missing)
    if not os.path.exists(H100_TARGET):
        pytest.skip(f"no H100 target description at {H100_TARGET}")
    figures = run_compile_script(f"""
        import json
        import jax, jax.numpy as jnp
        from jax.experimental import topologies
        from jax.sharding import SingleDeviceSharding
        from kernels.gpu import flash_attention
        text = open({H100_TARGET!r}).read()
        dev = topologies.get_topology_desc(platform="cuda", topology_name="", target_config=text,
                                           topology="1x1x1").devices[0]
        sh = SingleDeviceSharding(dev)
        q = jax.ShapeDtypeStruct((1, 1024, 8, 64), jnp.bfloat16, sharding=sh)
        k = jax.ShapeDtypeStruct((1, 1024, 2, 64), jnp.bfloat16, sharding=sh)
        def grads(q, k, v, do):
            f = lambda q, k, v: flash_attention(q, k, v, causal=True, device_kind=dev.device_kind)
            return jax.vjp(f, q, k, v)[1](do)
        compiled = jax.jit(grads).lower(q, k, k, q).compile()
        print(json.dumps({{"temp": compiled.memory_analysis().temp_size_in_bytes}}))
    """, {"JAX_SKIP_CUDA_CONSTRAINTS_CHECK": "1"})
    per_head_dk = 1 * 1024 * 8 * 64 * 4  # one float32 dK over all query heads
    assert 0 < figures["temp"] < per_head_dk


@pytest.mark.slow
def test_tpu_compiled_program_reports_kernel_flops():
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip(f"libtpu is not installed ({INSTALL_HINT})")
    b, n, h, hk, d = 1, 512, 4, 2, 128
    figures = run_compile_script(f"""
        import json, re
        import jax, jax.numpy as jnp
        from jax.experimental import topologies
        from jax.sharding import SingleDeviceSharding
        from kernels.tpu import flash_attention
        dev = topologies.get_topology_desc("v5e:1x1", platform="tpu", chips_per_host_bounds=(1, 1, 1)).devices[0]
        sh = SingleDeviceSharding(dev)
        q = jax.ShapeDtypeStruct(({b}, {n}, {h}, {d}), jnp.bfloat16, sharding=sh)
        k = jax.ShapeDtypeStruct(({b}, {n}, {hk}, {d}), jnp.bfloat16, sharding=sh)
        f = lambda q, k, v: flash_attention(q, k, v, causal=True, device_kind=dev.device_kind)
        def grads(q, k, v, do):
            return jax.vjp(f, q, k, v)[1](do)
        out = {{"kind": dev.device_kind}}
        for name, fn, args in (("fwd", f, (q, k, k)), ("bwd", grads, (q, k, k, q))):
            lowered = jax.jit(fn).lower(*args)
            out[name + "_vmem"] = sorted(set(re.findall(r"scoped_memory_configs.{{0,80}}size.{{0,8}}: (\\d+)",
                                                        lowered.as_text())))
            cost = lowered.compile().cost_analysis()
            cost = cost[0] if isinstance(cost, list) else cost
            out[name] = float(cost.get("flops", 0.0))
        print(json.dumps(out))
    """, {"ALLOW_MULTIPLE_LIBTPU_LOAD": "1"})
    problem = Problem(batch=b, q_len=n, kv_len=n, heads=h, kv_heads=hk, head_dim=d, dtype="bfloat16", causal=True,
                      backward=True)
    limit = vmem_limit_bytes(TpuConfig.default(problem, device_kind=figures["kind"]), problem,
                             device_kind=figures["kind"])
    want = [] if limit is None else [str(limit)]  # the compiler's default, or the config's own need
    assert figures["fwd_vmem"] == figures["bwd_vmem"] == want
    unit = 2 * b * h * Band.of(causal=True).pairs(n, n) * d  # one [pairs x head_dim] matmul
    assert 2 * unit <= figures["fwd"] < 2.1 * unit  # forward: q k^T and p v
    assert 9 * unit <= figures["bwd"] < 9.3 * unit  # forward 2, dq 3 (s, dp, dq), dk/dv 4 (s, dv, dp, dk)
