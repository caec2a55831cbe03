"""autotune.dot_product_attention under jax.jit on a mesh: per-device kernels inside shard_map, the config looked up for
the per-device shape, a clear error for a sharded sequence axis. On 4 host CPU devices (interpret mode), and compiled
by the real compilers without the hardware for a v5e:2x2 TPU topology and for two H100s. Each runs in a child
process: the device count and the compilers' plugins are fixed when jax starts."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from autotune.compile.pool import WORKER_ENV, compilers_missing

ROOT = Path(__file__).resolve().parents[2]

HOST_DEVICES = textwrap.dedent("""
    import json, sys, warnings
    import autotune
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P, AxisType
    from autotune.runtime.sharding import sharded_as
    from db import Store

    warnings.simplefilter("ignore", RuntimeWarning)
    db = sys.argv[1]
    Store(db).close()
    autotune.configure(db=db, on_miss="heuristic")
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (4, 24, 4, 16))
    k, v = (jax.random.normal(key, (4, 29, 2, 16)) for key in keys[1:3])
    dout = jax.random.normal(keys[3], q.shape)
    lengths = jnp.array([24, 17, 9, 24], jnp.int32)
    args = dict(is_causal=True, key_value_seq_lengths=lengths)
    result = {}

    def loss(attention):
        return lambda q, k, v, lengths: jnp.sum(attention(q, k, v, is_causal=True, key_value_seq_lengths=lengths)
                                               * dout)

    want = jax.nn.dot_product_attention(q, k, v, **args)
    want_grads = jax.grad(loss(jax.nn.dot_product_attention), argnums=(0, 1, 2))(q, k, v, lengths)
    mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    spec = NamedSharding(mesh, P("data", None, "model", None))
    qs, ks, vs = (jax.device_put(x, spec) for x in (q, k, v))
    ls = jax.device_put(lengths, NamedSharding(mesh, P("data")))
    out = jax.jit(lambda q, k, v, l: autotune.dot_product_attention(q, k, v, is_causal=True,
                                                                   key_value_seq_lengths=l))(qs, ks, vs, ls)
    grads = jax.jit(jax.grad(loss(autotune.dot_product_attention), argnums=(0, 1, 2)))(qs, ks, vs, ls)
    result["explicit_out"] = float(jnp.abs(out - want).max())
    result["explicit_grads"] = [float(jnp.abs(g - w).max()) for g, w in zip(grads, want_grads)]
    result["out_spec"] = str(out.sharding.spec)

    # a sliding window with the log-sum-exp residual: two outputs per device, the residual sharded like the query
    windowed = dict(local_window_size=(6, 2), query_seq_lengths=lengths, return_residual=True)
    w_out, w_lse = jax.jit(lambda q, k, v: autotune.dot_product_attention(q, k, v, **windowed))(qs, ks, vs)
    want_out, want_lse = jax.nn.dot_product_attention(q, k, v, **windowed)
    result["window_out"] = float(jnp.abs(w_out - want_out).max())
    result["window_lse"] = float(jnp.abs(w_lse - want_lse).max())
    result["lse_spec"] = str(w_lse.sharding.spec)

    auto = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))  # Auto axes: declared with sharded_as
    auto_spec = NamedSharding(auto, P("data", None, "model", None))
    qa, ka, va = (jax.device_put(x, auto_spec) for x in (q, k, v))
    with sharded_as(auto, P("data", None, "model", None)):
        f = jax.jit(lambda q, k, v: autotune.dot_product_attention(q, k, v, is_causal=True))
        result["auto_lowered_shard_map"] = "shard_map" in str(f.trace(qa, ka, va).jaxpr)
        result["auto_out"] = float(jnp.abs(f(qa, ka, va) - jax.nn.dot_product_attention(q, k, v, is_causal=True)).max())

    errors = {}
    seq = jax.device_put(q, NamedSharding(mesh, P("data", "model", None, None)))
    kseq = jax.device_put(k, NamedSharding(mesh, P("data", None, None, None)))
    vseq = jax.device_put(v, NamedSharding(mesh, P("data", None, None, None)))
    for name, call in {
        "sequence": lambda: jax.jit(autotune.dot_product_attention)(seq, kseq, vseq),
        "kv_heads": lambda: autotune.dot_product_attention(qa, ka[:, :, :1], va[:, :, :1]),
    }.items():
        try:
            if name == "kv_heads":
                with sharded_as(auto, P("data", None, "model", None)):
                    jax.jit(call)()
            else:
                call()
            errors[name] = None
        except ValueError as exc:
            errors[name] = str(exc)
    result["errors"] = errors
    store = Store(db)
    result["keys"] = sorted({(key.batch, key.q_len, key.kv_len, key.heads, key.kv_heads, key.lengths,
                              key.window_left, key.window_right) for key, _ in store.misses()},
                            key=lambda key: [-1 if x is None else x for x in key])
    store.close()
    print(json.dumps(result))
""")

TPU_TOPOLOGY = textwrap.dedent("""
    import json, sys, warnings
    import autotune
    import jax, jax.numpy as jnp, numpy as np
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P, AxisType
    from db import Store

    warnings.simplefilter("ignore", RuntimeWarning)
    db = sys.argv[1]
    Store(db).close()
    autotune.configure(db=db, on_miss="heuristic")
    devices = np.array(topologies.get_topology_desc("v5e:2x2", platform="tpu").devices).reshape(2, 2)
    mesh = Mesh(devices, ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    sharding = NamedSharding(mesh, P("data", None, "model", None))
    q = jax.ShapeDtypeStruct((4, 256, 8, 128), jnp.bfloat16, sharding=sharding)
    kv = jax.ShapeDtypeStruct((4, 256, 4, 128), jnp.bfloat16, sharding=sharding)
    attend = lambda q, k, v: autotune.dot_product_attention(q, k, v, is_causal=True)
    forward = jax.jit(attend).lower(q, kv, kv).compile().as_text()
    loss = lambda q, k, v: attend(q, k, v).astype(jnp.float32).sum()
    backward = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv).compile().as_text()
    calls = [line for line in forward.splitlines() if 'custom_call_target="tpu_custom_call"' in line]
    store = Store(db)
    keys = [key.to_dict() for key, _ in store.misses()]
    store.close()
    print(json.dumps({"device_kind": devices.flat[0].device_kind, "forward_calls": calls,
                      "backward_calls": backward.count('custom_call_target="tpu_custom_call"'), "keys": keys}))
""")

GPU_PAIR = textwrap.dedent("""
    import json, sys, warnings
    import autotune
    import jax, jax.numpy as jnp, numpy as np
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P, AxisType
    from autotune.compile.targets import get_target, gpu_target_config
    from db import Store

    warnings.simplefilter("ignore", RuntimeWarning)
    db = sys.argv[1]
    Store(db).close()
    autotune.configure(db=db, on_miss="heuristic")
    topology = topologies.get_topology_desc(platform="cuda", topology_name="", topology="1x1x2",
                                            target_config=gpu_target_config(get_target("h100")))
    mesh = Mesh(np.array(topology.devices).reshape(2, 1), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    x = jax.ShapeDtypeStruct((4, 256, 4, 64), jnp.bfloat16, sharding=NamedSharding(mesh, P("data", None, "model")))
    text = jax.jit(lambda q, k, v: autotune.dot_product_attention(q, k, v, is_causal=True)).lower(x, x, x)
    calls = [line for line in text.compile().as_text().splitlines() if '"__gpu$xla.gpu.triton"' in line]
    store = Store(db)
    keys = [key.to_dict() for key, _ in store.misses()]
    store.close()
    print(json.dumps({"device_kind": topology.devices[0].device_kind, "calls": calls, "keys": keys}))
""")


def run_child(script: str, db: Path, env: dict[str, str]) -> dict:
    done = subprocess.run([sys.executable, "-c", script, str(db)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=540)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_mesh_of_host_devices_runs_the_kernel_per_device(tmp_path):
    result = run_child(HOST_DEVICES, tmp_path / "results.db",
                       {"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"})
    assert result["explicit_out"] < 2e-5
    assert max(result["explicit_grads"]) < 5e-5, result["explicit_grads"]
    assert result["out_spec"] == "P('data', None, 'model', None)"  # the output stays sharded like the query
    assert result["auto_lowered_shard_map"] and result["auto_out"] < 2e-5
    assert result["window_out"] < 2e-5 and result["window_lse"] < 1e-4
    assert result["lse_spec"] == "P('data', None, 'model')"
    # looked up for the per-device shape: batch 4 / 2, heads 4 / 2, kv heads 2 / 2
    assert [tuple(key) for key in result["keys"]] == [(2, 24, 29, 2, 1, False, None, None),
                                                      (2, 24, 29, 2, 1, True, None, None),
                                                      (2, 24, 29, 2, 1, True, 6, 2)]
    sequence, kv_heads = result["errors"]["sequence"], result["errors"]["kv_heads"]
    assert sequence and "sequence axis of query is sharded over mesh axis 'model'" in sequence
    assert "Shard only the batch and head axes" in sequence
    assert kv_heads and "kv heads of key and value (1) cannot be split evenly over mesh axis 'model' of size 2" \
        in kv_heads


@pytest.mark.slow
@pytest.mark.skipif(compilers_missing("tpu") is not None, reason=f"{compilers_missing('tpu')}")
def test_a_v5e_2x2_topology_compiles_mosaic_kernels_per_chip(tmp_path):
    result = run_child(TPU_TOPOLOGY, tmp_path / "results.db", dict(WORKER_ENV))
    assert result["device_kind"] == "TPU v5 lite"
    assert len(result["forward_calls"]) == 1
    # the Mosaic kernel sees one chip's share: batch 4 / 2 and heads 8 / 2, in the caller's layout viewed as
    # [batch, seq, heads * head_dim] (kernels.tpu.layout)
    assert "bf16[2,256,512]" in result["forward_calls"][0]
    assert result["backward_calls"] >= 3  # forward (saving the log-sum-exp), dq and dk/dv kernels
    # the forward's miss, and the backward's once jax.grad traces it (an untuned --backward key)
    assert sorted((key["platform"], key["device_kind"], key["kernel"], key["batch"], key["heads"], key["kv_heads"],
                   key.get("backward", False)) for key in result["keys"]) == [
        ("tpu", "TPU v5 lite", "flash_attention_tpu", 2, 4, 2, False),
        ("tpu", "TPU v5 lite", "flash_attention_tpu", 2, 4, 2, True)]


@pytest.mark.slow
@pytest.mark.skipif(compilers_missing("gpu") is not None, reason=f"{compilers_missing('gpu')}")
def test_two_h100s_compile_triton_kernels_per_gpu(tmp_path):
    result = run_child(GPU_PAIR, tmp_path / "results.db", dict(WORKER_ENV))
    assert result["device_kind"] == "NVIDIA H100 80GB HBM3"
    assert len(result["calls"]) == 1 and "bf16[2,256,4,64]" in result["calls"][0]  # one GPU's half of the batch
    keys = [(key["platform"], key["device_kind"], key["kernel"], key["batch"], key["heads"]) for key in result["keys"]]
    assert keys == [("gpu", "NVIDIA H100 80GB HBM3", "flash_attention_gpu", 2, 4)]
