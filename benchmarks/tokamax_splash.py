"""tokamax 0.0.17's shipped TPU flash-attention winners, and JAX 0.10.2's splash attention built to stand in for
tokamax's kernel at a winner's block sizes (for benchmarks/predicted_vs_measured_tpu.py). Reads the JSON tables from
the wheel's zip; builds functions and shapes, compiles nothing."""
from __future__ import annotations

import json
import statistics
import zipfile

import jax
import jax.numpy as jnp

from autotune.compile.model.tpu_model import KernelWork
from autotune.compile.model.tpu_predict import tile_fraction

WHEEL = "/work/tokamax-wheel/tokamax-0.0.17-py3-none-any.whl"
TABLES = {"v5p": "tpu_v5", "v6e": "tpu_v6_lite", "tpu7x": "tpu7x"}


def table(target: str) -> list[tuple[dict, dict, float]]:
    """(arg spec, winner config, measured median ms) of each key with a winner."""
    with zipfile.ZipFile(WHEEL) as wheel:
        raw = json.loads(wheel.read(f"tokamax/data/autotuning/{TABLES[target]}/pallas_mosaic_tpu_flash_attention.json"))
    rows = []
    for key, value in raw.items():
        if not value:
            continue
        config_text, record = next(iter(value.items()))
        times = record.get("evaluation_times_ms") or []
        if times:
            rows.append((json.loads(key), json.loads(config_text), float(statistics.median(times))))
    return rows


def shape_of(text: str) -> tuple[str, tuple[int, ...]]:
    dtype, dims = text.split("[")
    return dtype, tuple(int(x) for x in dims.rstrip("]").split(","))


def splash_case(spec: dict, config: dict):
    """(fn, shapes, work, description) compiling JAX's splash attention like tokamax's kernel for one key."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    dtype, (b, t, h, d) = shape_of(spec["q"])
    _, (_, tk, hk, _) = shape_of(spec["k"])
    _, (_, _, _, dv) = shape_of(spec["v"])
    causal_spec = (spec.get("mask") or {}).get("causal_mask")
    causal = causal_spec is not None
    window = causal_spec.get("window_size") if causal else None
    bq, bkv = min(config["block_q"], t), min(config["block_kv"], tk)
    bkc = min(config.get("block_kv_compute") or bkv, bkv)
    layouts = {name: sk.QKVLayout(config.get(name, 1)) for name in ("q_layout", "k_layout", "v_layout")}
    blocks = sk.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkc, **layouts)
    group = h // hk
    if causal and window:
        one = sm.LocalMask((t, tk), (window, 0), offset=0)
    elif causal:
        one = sm.CausalMask((t, tk))
    else:
        one = sm.FullMask((t, tk))
    kernel = sk.make_splash_mqa_single_device(sm.MultiHeadMask([one] * group), block_sizes=blocks)

    def fn(q, k, v):  # [b, t, h, d] like tokamax; per batch and kv head an MQA call over the group's q heads
        q = q.reshape(b, t, hk, group, d).transpose(0, 2, 3, 1, 4)
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        o = jax.vmap(jax.vmap(kernel))(q, k, v)  # [b, hk, group, t, dv]
        return o.transpose(0, 3, 1, 2, 4).reshape(b, t, h, dv)

    jdt = jnp.bfloat16 if dtype == "bf16" else jnp.float32
    shapes = [((b, t, h, d), jdt), ((b, tk, hk, d), jdt), ((b, tk, hk, dv), jdt)]
    frac = tile_fraction(t, tk, bq, bkv, causal=causal, window=(window, 0) if window else None)
    flops = 2.0 * b * h * (d + dv) * t * tk * (0.5 if causal and not window else 1.0)
    nbytes = 2 * (b * t * h * (d + dv) + b * tk * hk * (d + dv))
    work = KernelWork(flops=flops, hbm_bytes=nbytes, compute_fraction=frac, splits_over_cores=True)
    text = f"b{b} t{t}/{tk} h{h}/{hk} d{d}/{dv} {'causal' if causal else 'full'}{f' w{window}' if window else ''}"
    return fn, shapes, work, text, f"q{bq} kv{bkv} c{bkc} L{config.get('q_layout', 1)}{config.get('k_layout', 1)}"


def block_space(t: int, tk: int) -> list[dict]:
    """A block-size space like tokamax's for splash: powers of two from 128 to 2048, compute chunk dividing kv."""
    sizes = [128, 256, 512, 1024, 2048]
    space = []
    for bq in sizes:
        for bkv in sizes:
            for bkc in sizes:
                if bq <= max(t, 128) and bkv <= max(tk, 128) and bkc <= bkv and bkv % bkc == 0:
                    space.append({"block_q": bq, "block_kv": bkv, "block_kv_compute": bkc})
    return space


