"""Compile points for the GPU model's validation: JAX's mha at tokamax's measured winners, and a big XLA matmul.

Each point is compiled deviceless for the GPU (one process, one compile at a time: the CPUs are shared), its SASS
parsed, and stored as JSON lines with everything the model needs to predict it again (the parsed kernels and the
block arithmetic's inputs), so fitting the model's constants never recompiles. Used by
`benchmarks/predicted_vs_measured_gpu.py`.
"""
from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")

import functools  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import zipfile  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import SingleDeviceSharding  # noqa: E402

from autotune.compile.model.gpu_sass import dump_kernels, kernel_to_dict  # noqa: E402
from autotune.compile.worker import device_for  # noqa: E402
from autotune.compile.targets import get_target  # noqa: E402

WHEEL = "/work/tokamax-wheel/tokamax-0.0.17-py3-none-any.whl"
TABLES = {
    "h100": "tokamax/data/autotuning/nvidia_h100_80gb_hbm3/pallas_triton_flash_attention.json",
    "a100": "tokamax/data/autotuning/nvidia_a100-sxm4-40gb/pallas_triton_flash_attention.json",
    "h100_mosaic": "tokamax/data/autotuning/nvidia_h100_80gb_hbm3/pallas_mosaic_gpu_flash_attention.json",
}
ARCH = {"h100": "sm_90a", "a100": "sm_80"}
_SHAPE = re.compile(r"(\w+)\[([\d,]+)\]")


def table(name: str, wheel: str = WHEEL) -> list[dict]:
    """The table's keys with a winner: shape, dtype, causal, residuals, whether mha can express it, the config and
    the measured milliseconds (median of the 5 samples tokamax stored)."""
    with zipfile.ZipFile(wheel) as z:
        data = json.loads(z.read(TABLES[name]))
    rows = []
    for index, (key, value) in enumerate(data.items()):
        if not value:
            continue
        spec = json.loads(key)
        config_text, result = next(iter(value.items()))
        q_dtype, q_shape = _SHAPE.match(spec["q"]).groups()
        k_shape = _SHAPE.match(spec["k"]).groups()[1]
        mask = spec.get("mask") or {}
        why_not = []
        if spec.get("bias") is not None:
            why_not.append("bias")
        if mask.get("bool_mask") is not None:
            why_not.append("boolean mask")
        if q_shape != k_shape:
            why_not.append("q and k shapes differ")
        if spec.get("logits_soft_cap") is not None or spec.get("dropout_rate"):
            why_not.append("soft cap / dropout")
        times = sorted(result["evaluation_times_ms"])
        rows.append({
            "table": name, "index": index, "shape": [int(x) for x in q_shape.split(",")], "dtype": q_dtype,
            "causal": bool(mask.get("causal_mask")), "residuals": bool(spec.get("return_residuals")),
            "scale": spec.get("logits_scale") or 1.0, "config": json.loads(config_text),
            "measured_ms": times[len(times) // 2], "mha_cannot": ", ".join(why_not),
        })
    return rows


def _dtype(name: str):
    return {"bf16": jnp.bfloat16, "f16": jnp.float16, "f32": jnp.float32}[name]


def compile_mha(target: str, shape: list[int], dtype: str, causal: bool, residuals: bool, scale: float,
                block_q: int, block_k: int, num_warps: int, num_stages: int) -> dict:
    """Compile JAX 0.10.2's mha forward deviceless; the parsed kernels, or the compiler's error."""
    from jax.experimental.pallas.ops.gpu.attention import BlockSizes, mha

    device = device_for(get_target(target))
    spec = jax.ShapeDtypeStruct(tuple(shape), _dtype(dtype), sharding=SingleDeviceSharding(device))
    fn = functools.partial(mha, segment_ids=None, sm_scale=scale, causal=causal,
                           block_sizes=BlockSizes(block_q=block_q, block_k=block_k), num_warps=num_warps,
                           num_stages=num_stages, return_residuals=residuals)
    return _compile(target, fn, (spec, spec, spec))


def compile_matmul(target: str, n: int, tiles: str) -> dict:
    """A bf16 n x n x n XLA matmul, forced onto XLA's Triton GEMM with one fixed tiling (deviceless: no autotuning;
    cuBLAS would leave no PTX to read)."""
    device = device_for(get_target(target))
    spec = jax.ShapeDtypeStruct((n, n), jnp.bfloat16, sharding=SingleDeviceSharding(device))
    options = {"xla_gpu_cublas_fallback": False, "xla_gpu_triton_gemm_any": True,
               "xla_gpu_override_gemm_autotuner": tiles}
    return _compile(target, lambda x, y: x @ y, (spec, spec), options)


def _compile(target: str, fn, specs: tuple, options: dict | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="gpu-model-") as dump:
        start = time.perf_counter()
        try:
            jax.jit(fn).lower(*specs).compile(compiler_options={"xla_dump_to": dump, **(options or {})})
        except Exception as exc:  # noqa: BLE001 - a refused config is a result too
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300],
                    "compile_s": time.perf_counter() - start}
        compiled = time.perf_counter() - start
        kernels = dump_kernels(dump, ARCH[target])
        return {"ok": True, "compile_s": compiled, "sass_s": time.perf_counter() - start - compiled,
                "kernels": [kernel_to_dict(k) for k in kernels]}


def done_ids(path: str) -> set[str]:
    if not os.path.exists(path):
        return set()
    with open(path) as f:
        return {json.loads(line)["id"] for line in f if line.strip()}


def append(path: str, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
