"""The TPU kernel's sliding window, soft cap, padding lengths and log-sum-exp (issue 13), in TPU interpret mode.

Each case draws fresh random inputs and compares the output, the lse and the gradients of sum(out * random
cotangent) with `attention_reference`. The work falling with the window is checked on the kernels' grids (the kv
reduction axis holds only the blocks a window can touch); one deviceless compile checks that Mosaic accepts the
kernels with every feature on.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import Problem, attention_reference, tolerance
from kernels.tpu import Config, flash_attention, invalid_reasons, search_space


def _inputs(seed: int, batch, q_len, kv_len, heads, kv_heads, head_dim):
    keys = jax.random.split(jax.random.key(seed), 6)
    q = jax.random.normal(keys[0], (batch, q_len, heads, head_dim), jnp.float32)
    k = jax.random.normal(keys[1], (batch, kv_len, kv_heads, head_dim), jnp.float32)
    v = jax.random.normal(keys[2], (batch, kv_len, kv_heads, head_dim), jnp.float32)
    g = jax.random.normal(keys[3], q.shape, jnp.float32)
    ids = (jnp.sort(jax.random.randint(keys[4], (batch, q_len), 0, 3), axis=1),
           jnp.sort(jax.random.randint(keys[5], (batch, kv_len), 0, 3), axis=1))
    return q, k, v, g, ids


def _run(fn, q, k, v, g, q_lengths, kv_lengths, **kwargs):
    """(out, lse, dq, dk, dv) of fn under one jit; lengths enter as traced arguments (runtime data)."""

    def go(q, k, v, g, q_lengths, kv_lengths):
        def f(q_, k_, v_):
            return fn(q_, k_, v_, q_lengths=q_lengths, kv_lengths=kv_lengths, return_lse=True, **kwargs)

        (out, lse), pull = jax.vjp(f, q, k, v)
        return (out, lse, *pull((g, jnp.zeros_like(lse))))

    return jax.jit(go)(q, k, v, g, q_lengths, kv_lengths)


def _close(name, got, want, grad: bool) -> None:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.all(np.isfinite(got)), f"{name} has NaN or infinity"
    atol, rtol = tolerance(jnp.float32, grad=grad)
    np.testing.assert_allclose(got, want, atol=atol, rtol=rtol, err_msg=name)


CASES = {
    # two-sided window, GQA, odd lengths, q_len != kv_len, segment id pairs, several q and kv blocks
    "window-two-sided-gqa-segments": dict(
        shape=(1, 200, 328, 4, 2, 40), window=(37, 21), causal=False, segments=True, softcap=None, lengths=None,
        config=Config(1, 64, 128, 128, 128, 128, 128)),
    # left-only window with causal and soft-capping, two batch rows per block, minor blocks in a major one
    "window-left-causal-softcap-blocks": dict(
        shape=(2, 300, 300, 2, 1, 32), window=(50, None), causal=True, segments=False, softcap=4.0, lengths=None,
        config=Config(2, 64, 256, 128, 128, 256, 128)),
    # runtime lengths (one row empty, one kv row shorter than a block) with a right-only window and a cap
    "lengths-window-right-softcap": dict(
        shape=(3, 136, 264, 2, 2, 24), window=(None, 30), causal=False, segments=False, softcap=2.5,
        lengths=([0, 75, 136], [264, 13, 200]), config=Config(1, 64, 128, 128, 128, 128, 128)),
    # everything at once, default config
    "all-features-default-config": dict(
        shape=(2, 130, 130, 4, 2, 16), window=20, causal=True, segments=True, softcap=10.0,
        lengths=([97, 130], [130, 61]), config=None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case):
    c = CASES[case]
    q, k, v, g, ids = _inputs(sum(map(ord, case)), *c["shape"])
    q_lengths = kv_lengths = None
    if c["lengths"] is not None:
        q_lengths, kv_lengths = (jnp.asarray(x, jnp.int32) for x in c["lengths"])
    common = dict(causal=c["causal"], window=c["window"], softcap=c["softcap"],
                  segment_ids=ids if c["segments"] else None)
    got = _run(flash_attention, q, k, v, g, q_lengths, kv_lengths, config=c["config"], interpret=True, **common)
    want = _run(attention_reference, q, k, v, g, q_lengths, kv_lengths, **common)
    _close("out", got[0], want[0], grad=False)
    lse, want_lse = np.asarray(got[1]), np.asarray(want[1])
    assert lse.dtype == np.float32 and lse.shape == (q.shape[0], q.shape[1], q.shape[2])
    assert np.array_equal(np.isneginf(lse), np.isneginf(want_lse)), "rows that see no key have lse -inf"
    seen = np.isfinite(want_lse)
    np.testing.assert_allclose(lse[seen], want_lse[seen], atol=1e-4, rtol=1e-4, err_msg="lse")
    for name, a, b in zip(("dq", "dk", "dv"), got[2:], want[2:]):
        _close(name, a, b, grad=True)
    if c["lengths"] is not None:  # rows past q_lengths: zeros; keys past kv_lengths: zero dk, dv
        for row, (ql, kl) in enumerate(zip(*c["lengths"])):
            assert np.all(np.asarray(got[0])[row, ql:] == 0) and np.all(np.asarray(got[2])[row, ql:] == 0)
            assert np.all(np.asarray(got[3])[row, kl:] == 0) and np.all(np.asarray(got[4])[row, kl:] == 0)


def test_lse_carries_no_gradient():
    q, k, v, _, _ = _inputs(3, 1, 64, 64, 2, 2, 16)
    grad = jax.grad(lambda q: flash_attention(q, k, v, window=8, return_lse=True, interpret=True)[1].sum())(q)
    assert np.all(np.asarray(grad) == 0)


def _grids(fn, *args) -> dict[str, tuple[int, ...]]:
    """The grid of every pallas_call in fn's jaxpr, by kernel name."""
    grids = {}

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                name = str(eqn.params["name"])
                grids[name.split("_tpu_")[-1]] = tuple(eqn.params["grid_mapping"].grid)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return grids


def test_work_falls_with_the_window():
    """4096 tokens, 128-token blocks: causal attention walks all 32 kv blocks (32 q blocks for dk/dv); a
    window of 100 to the left walks at most 2, and so the grids (the steps taken) shrink 16-fold."""
    q = jax.ShapeDtypeStruct((1, 4096, 2, 64), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, 4096, 1, 64), jnp.bfloat16)
    config = Config(1, 128, 128, 128, 128, 128, 128)

    def grads(**kwargs):
        def run(q, k, v):
            out, pull = jax.vjp(lambda *a: flash_attention(*a, causal=True, config=config, interpret=True,
                                                           **kwargs), q, k, v)
            return pull(out)
        return _grids(run, q, k, k)

    full, windowed = grads(), grads(window=(100, None))
    assert full == {"fwd": (1, 2, 32, 32), "dq": (1, 2, 32, 32), "dkv": (1, 1, 32, 2 * 32)}
    assert windowed == {"fwd": (1, 2, 32, 2), "dq": (1, 2, 32, 2), "dkv": (1, 1, 32, 2 * 2)}
    # a two-sided window of 64 tokens with 512-token kv blocks: a q block of 128 rows touches at most 2
    two_sided = _grids(lambda q, k, v: flash_attention(q, k, v, window=64, interpret=True,
                                                       config=Config(1, 128, 512, 128, 128, 512, 128)), q, k, k)
    assert two_sided == {"fwd": (1, 2, 32, 2)}


@pytest.mark.parametrize("change, error, word", [
    (dict(window=-1), ValueError, "window"),
    (dict(window=(3, 2, 1)), ValueError, "window"),
    (dict(softcap=0.0), ValueError, "softcap"),
    (dict(softcap="big"), ValueError, "softcap"),
    (dict(q_lengths=jnp.zeros((2,), jnp.int32)), ValueError, "q_lengths"),
    (dict(kv_lengths=jnp.zeros((1,), jnp.float32)), ValueError, "kv_lengths"),
    (dict(kv_lengths=[17]), ValueError, "kv_lengths"),
    (dict(return_lse="yes"), TypeError, "return_lse"),
])
def test_bad_feature_arguments_raise(change, error, word):
    q = jnp.ones((1, 16, 2, 8), jnp.float32)
    with pytest.raises(error, match=word):
        flash_attention(q, q, q, interpret=True, **change)


@pytest.mark.slow
def test_mosaic_compiles_every_feature_forward_and_backward():
    """Deviceless v5e compile of the forward and the gradients with window, soft cap and runtime lengths."""
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed (pip install -e '.[compilers]')")
    script = textwrap.dedent("""
        import jax, jax.numpy as jnp
        from jax.experimental import topologies
        from jax.sharding import SingleDeviceSharding
        from kernels.tpu import Config, flash_attention
        dev = topologies.get_topology_desc("v5e:1x1", platform="tpu", chips_per_host_bounds=(1, 1, 1)).devices[0]
        sh = SingleDeviceSharding(dev)
        q = jax.ShapeDtypeStruct((2, 1000, 4, 128), jnp.bfloat16, sharding=sh)
        k = jax.ShapeDtypeStruct((2, 1000, 2, 128), jnp.bfloat16, sharding=sh)
        n = jax.ShapeDtypeStruct((2,), jnp.int32, sharding=sh)
        config = Config(2, 256, 256, 128, 256, 256, 128)
        def f(q, k, v, ql, kl):
            return flash_attention(q, k, v, causal=True, window=(200, 0), softcap=30.0, q_lengths=ql, kv_lengths=kl,
                                   config=config, device_kind=dev.device_kind)
        def grads(q, k, v, ql, kl, do):
            return jax.vjp(lambda *a: f(*a, ql, kl), q, k, v)[1](do)
        jax.jit(f).lower(q, k, k, n, n).compile()
        jax.jit(grads).lower(q, k, k, n, n, q).compile()
        print("compiled")
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]


def test_default_and_search_space_follow_a_narrow_window():
    """A 128-token causal window on 4096 tokens: default blocks of 256 (not 512) and no candidate above 512;
    plain problems and wide windows keep the full-attention default and space."""
    plain = Problem(1, 4096, 4096, 8, 8, 128, "bfloat16", causal=True, backward=True)
    narrow = plain.replace(window_left=128, window_right=None)
    wide = plain.replace(window_left=2000, window_right=None)
    config, space = Config.default(narrow), search_space(narrow)
    assert invalid_reasons(config, narrow) == []
    assert max(config.block_q, config.block_k_major, config.bwd_block_q, config.bwd_block_k_major) == 256
    assert all(getattr(config, name) in values for name, values in space.items())
    assert max(max(values) for name, values in space.items() if name != "block_b") == 512
    assert Config.default(wide) == Config.default(plain) and search_space(wide) == search_space(plain)
    assert max(search_space(plain)["block_k_major"]) == 2048
