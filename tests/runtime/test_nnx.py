"""Flax NNX on the tuned kernel: nnx.MultiHeadAttention with autotune.nnx.attention_fn against its default attention,
outputs and gradients; what only NNX's own attention does runs it, with a warning."""
from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import autotune
from autotune.device import current_device
from db import Store
from kernels import tolerance

nnx = pytest.importorskip("flax.nnx", reason="Flax is not installed: pip install -e '.[flax]'")


@pytest.fixture(autouse=True)
def runtime_on(tmp_path):
    path = tmp_path / "results.db"
    Store(path).close()
    autotune.reload()
    with autotune.using(db=str(path), on_miss="heuristic"):
        yield path
    autotune.reload()


def attention_layer(attention_fn=None):
    extra = {} if attention_fn is None else {"attention_fn": attention_fn}
    return nnx.MultiHeadAttention(num_heads=2, in_features=24, qkv_features=32, decode=False,
                                  rngs=nnx.Rngs(0), **extra)  # same seed: the same parameters


@pytest.mark.slow
def test_multi_head_attention_with_the_tuned_kernel_matches_the_default(runtime_on):
    x = jax.random.normal(jax.random.key(1), (2, 19, 24))
    dout = jax.random.normal(jax.random.key(2), (2, 19, 24))
    default, tuned = attention_layer(), attention_layer(autotune.nnx.attention_fn)

    def loss(layer, x):
        return jnp.sum(layer(x, is_causal=True) * dout)

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = tuned(x, is_causal=True)
        got_grads = nnx.grad(loss, argnums=(0, 1))(tuned, x)
    want = default(x, is_causal=True)
    want_grads = nnx.grad(loss, argnums=(0, 1))(default, x)
    assert not [w for w in record if "not the tuned kernel" in str(w.message)]
    interpret = current_device().interpret  # exact float32 on a CPU; the kernels' tolerances on a GPU or TPU
    atol, rtol = (2e-5, 2e-5) if interpret else tolerance(x.dtype)
    np.testing.assert_allclose(got, want, atol=atol, rtol=rtol)
    atol, rtol = (1e-4, 1e-4) if interpret else tolerance(x.dtype, grad=True)
    for path, g, w in zip(jax.tree_util.tree_flatten_with_path(got_grads)[0], jax.tree.leaves(got_grads),
                          jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(g, w, atol=atol, rtol=rtol, err_msg=jax.tree_util.keystr(path[0]))
    store = Store(runtime_on)
    try:  # the kernel ran: the runtime looked up (and counted a miss for) the layer's attention problem
        assert {(key.batch, key.q_len, key.heads, key.head_dim, key.causal) for key, _ in store.misses()} == \
            {(2, 19, 2, 16, True)}
    finally:
        store.close()


def test_dropout_on_the_weights_runs_nnx_own_attention_with_a_warning():
    x = jax.random.normal(jax.random.key(3), (1, 8, 24))
    layer = nnx.MultiHeadAttention(num_heads=2, in_features=24, qkv_features=32, decode=False, dropout_rate=0.5,
                                   attention_fn=autotune.nnx.attention_fn, rngs=nnx.Rngs(0, dropout=1))
    with pytest.warns(RuntimeWarning, match="dropout on the attention weights"):
        out = layer(x, deterministic=False)
    assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))
