"""The TPU kernels on the caller's layout (issue 22, part 1): which problems read [b, s, h, d] in place, that the
in-place paths (one head per tile, pairs of heads) match the reference in interpret mode with every feature, and
that the compiled v5e programs hold no copy of q, k, v, o or their gradients around the kernels.
"""
from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import attention_reference, tolerance
from kernels.tpu import Config, flash_attention
from kernels.tpu.layout import Layout, layout_mode
from tests.compile_script import run_compile_script

@pytest.mark.parametrize("heads, kv_heads, head_dim, mode", [
    (8, 2, 128, "heads"), (8, 8, 256, "heads"), (3, 1, 384, "heads"), (1, 1, 72, "heads"),
    (8, 2, 64, "pairs"), (4, 4, 64, "pairs"), (8, 4, 64, "pairs"),
    (6, 2, 64, "transposed"),  # groups of 3: the pair's two heads can need kv heads of two tiles
    (6, 3, 64, "transposed"),  # an odd number of kv heads: no whole kv pairs
    (3, 3, 64, "transposed"),  # an odd number of heads
    (4, 1, 64, "transposed"),  # one kv head: a 64-lane kv array
    (8, 2, 32, "transposed"), (4, 2, 96, "transposed"),
])
def test_layout_mode(heads, kv_heads, head_dim, mode):
    assert layout_mode(heads, kv_heads, head_dim) == mode


@pytest.mark.parametrize("mode, head_dim", [("heads", 128), ("pairs", 64), ("transposed", 40)])
def test_layout_round_trip_and_row_sums(mode, head_dim):
    """Into the kernels' array and back is the identity (padding dropped); the delta sums each head's lanes."""
    layout = Layout(mode, head_dim)
    key_a, key_b = jax.random.split(jax.random.key(head_dim))
    a = jax.random.normal(key_a, (2, 37, 4, head_dim), jnp.float32)
    b = jax.random.normal(key_b, a.shape, jnp.float32)
    x = layout.to_kernel(a, 48, jnp.float32)
    assert layout.dims(x) == (2, 4, 48)
    np.testing.assert_array_equal(layout.from_kernel(x, 37, jnp.float32), a)
    resized = layout.resize(x, 37, 64)
    assert layout.dims(resized) == (2, 4, 64)
    np.testing.assert_array_equal(layout.from_kernel(resized, 37, jnp.float32), a)
    sums = layout.row_sums(x, layout.to_kernel(b, 48, jnp.float32))
    want = jnp.swapaxes(jnp.sum(a * b, axis=-1), 1, 2)
    np.testing.assert_allclose(sums[:, :, :37], want, rtol=1e-5, atol=1e-5)


def _run(fn, q, k, v, g, ids, q_lengths, kv_lengths, **kwargs):
    def go(q, k, v, g):
        def f(q_, k_, v_):
            return fn(q_, k_, v_, segment_ids=ids, q_lengths=q_lengths, kv_lengths=kv_lengths, return_lse=True,
                      **kwargs)

        (out, lse), pull = jax.vjp(f, q, k, v)
        return (out, lse, *pull((g, jnp.zeros_like(lse))))

    return jax.jit(go)(q, k, v, g)


CASES = {
    # one head per tile, GQA 4/2, causal, segment ids, two batch rows per block, padding
    "heads-d128-gqa-causal-segments": dict(shape=(2, 200, 264, 4, 2, 128), dtype=jnp.float32, causal=True,
                                           segments=True, window=None, softcap=None, lengths=None,
                                           config=Config(2, 64, 128, 128, 128, 128, 128)),
    # pairs with groups of 1: each head of a pair against its own kv head; window, soft cap, runtime lengths
    "pairs-mha-window-softcap-lengths": dict(shape=(2, 136, 256, 4, 4, 64), dtype=jnp.float32, causal=False,
                                             segments=False, window=(50, 20), softcap=5.0,
                                             lengths=([100, 136], [256, 37]),
                                             config=Config(1, 64, 256, 128, 128, 128, 128)),
    # pairs with groups of 4 (GQA 8/2): both heads of a pair share one kv head, at either lane half
    "pairs-gqa4-causal-segments-bf16": dict(shape=(1, 256, 256, 8, 2, 64), dtype=jnp.bfloat16, causal=True,
                                            segments=True, window=None, softcap=None, lengths=None,
                                            config=Config(1, 128, 128, 128, 128, 128, 128)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_in_place_paths_match_the_reference(case):
    c = CASES[case]
    batch, q_len, kv_len, heads, kv_heads, d = c["shape"]
    assert layout_mode(heads, kv_heads, d) == case.split("-")[0]
    keys = jax.random.split(jax.random.key(sum(map(ord, case))), 6)
    q = jax.random.normal(keys[0], (batch, q_len, heads, d), jnp.float32).astype(c["dtype"])
    k = jax.random.normal(keys[1], (batch, kv_len, kv_heads, d), jnp.float32).astype(c["dtype"])
    v = jax.random.normal(keys[2], (batch, kv_len, kv_heads, d), jnp.float32).astype(c["dtype"])
    g = jax.random.normal(keys[3], q.shape, jnp.float32).astype(c["dtype"])
    ids = None
    if c["segments"]:
        ids = (jnp.sort(jax.random.randint(keys[4], (batch, q_len), 0, 3), axis=1),
               jnp.sort(jax.random.randint(keys[5], (batch, kv_len), 0, 3), axis=1))
    lengths = [None, None] if c["lengths"] is None else [jnp.asarray(x, jnp.int32) for x in c["lengths"]]
    common = dict(causal=c["causal"], window=c["window"], softcap=c["softcap"])
    got = _run(flash_attention, q, k, v, g, ids, *lengths, config=c["config"], interpret=True, **common)
    want = _run(attention_reference, q, k, v, g, ids, *lengths, **common)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        if name == "lse":
            assert np.array_equal(np.isneginf(a), np.isneginf(b))
            a, b = a[np.isfinite(b)], b[np.isfinite(b)]
        assert np.all(np.isfinite(a)), name
        atol, rtol = tolerance(c["dtype"], grad=name not in ("out", "lse"))
        np.testing.assert_allclose(a, b, atol=atol, rtol=rtol, err_msg=name)


LAYOUT_SCRIPT = r"""
    import json, re
    import jax, jax.numpy as jnp
    from jax.experimental import topologies
    from jax.sharding import SingleDeviceSharding
    from kernels import tpu
    dev = topologies.get_topology_desc("v5e:1x1", platform="tpu", chips_per_host_bounds=(1, 1, 1)).devices[0]
    sh = SingleDeviceSharding(dev)
    b, s, h, hk = 2, 1024, 8, 2
    op = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*\S+\s+([\w\-]+)\(")
    out = {}
    for d in (64, 128, 256):
        split = lambda x, d=d: x.reshape(b, s, x.shape[2] // d, d)
        def attend(q, k, v, d=d, split=split):
            out = tpu.flash_attention(split(q), split(k), split(v), causal=True, device_kind=dev.device_kind)
            return out.reshape(b, s, h * d)
        def grads(q, k, v, do):
            return jax.vjp(attend, q, k, v)[1](do)
        x = lambda heads: jax.ShapeDtypeStruct((b, s, heads * d), jnp.bfloat16, sharding=sh)
        for name, fn, args in (("fwd", attend, (x(h), x(hk), x(hk))), ("bwd", grads, (x(h), x(hk), x(hk), x(h)))):
            text = jax.jit(fn).lower(*args).compile().as_text()
            entry = text[text.index("\nENTRY"):]
            entry = entry[:entry.index("\n}")]
            ops = []
            for line in entry.splitlines()[1:]:
                m = op.match(line)
                if 'custom_call_target="tpu_custom_call"' in line:
                    ops.append(["kernel", ""])
                elif m:
                    shape = line.split("=", 1)[1].split()[0]
                    ops.append([m.group(2), shape])
            out[f"{name}{d}"] = ops
    print(json.dumps(out))
"""


@pytest.mark.slow
def test_compiled_programs_hold_no_layout_copies():
    """q, k, v arrive as a projection leaves them ([b, s, h * d], reshaped to [b, s, h, d] by the caller) and the
    output and gradients are reshaped back: at head_dim 64, 128 and 256 the forward and gradient programs hold
    the kernels and no copy, transpose or reshape of an operand-sized array; the backward's delta is one fused
    dot that reads dO and O where they lie."""
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed (pip install -e '.[compilers]')")
    programs = run_compile_script(LAYOUT_SCRIPT, {"ALLOW_MULTIPLE_LIBTPU_LOAD": "1"})
    for name, ops in programs.items():
        kernels = [shape for opcode, shape in ops if opcode == "kernel"]
        assert len(kernels) == (1 if name.startswith("fwd") else 3), (name, ops)
        moves = [(opcode, shape) for opcode, shape in ops if opcode in ("copy", "transpose", "reshape")]
        assert moves == [], (name, moves)
