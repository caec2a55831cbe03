"""A small pre-norm transformer block written with einsum projections and [batch, seq, heads, head_dim] attention,
switched from `jax.nn.dot_product_attention` to the tuned kernels by one name, `autotune.dot_product_attention`.

Run it (on a CPU the kernel runs in Pallas interpret mode; a few seconds):

    python3 examples/transformer_block.py

It checks that the block's outputs and gradients (with respect to every parameter and the input) match the XLA
version and prints the largest differences, relative to the largest entry.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

import autotune

MODEL, HEADS, KV_HEADS, HEAD_DIM, HIDDEN = 64, 4, 2, 16, 128  # grouped-query attention: 2 query heads per kv head


def init(rng: jax.Array) -> dict[str, jax.Array]:
    """Random parameters (fan-in scaled) of one block."""
    shapes = {"wq": (MODEL, HEADS, HEAD_DIM), "wk": (MODEL, KV_HEADS, HEAD_DIM), "wv": (MODEL, KV_HEADS, HEAD_DIM),
              "wo": (HEADS, HEAD_DIM, MODEL), "w_up": (MODEL, HIDDEN), "w_down": (HIDDEN, MODEL)}
    keys = jax.random.split(rng, len(shapes))
    params = {name: jax.random.normal(k, shape) / jnp.sqrt(shape[0] * (shape[1] if name == "wo" else 1))
              for k, (name, shape) in zip(keys, shapes.items())}
    params.update(norm1=jnp.ones((MODEL,)), norm2=jnp.ones((MODEL,)))
    return params


def rms_norm(x: jax.Array, scale: jax.Array) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * scale


def block(params: dict[str, jax.Array], x: jax.Array, lengths: jax.Array, attention=jax.nn.dot_product_attention):
    """x [batch, seq, model] -> [batch, seq, model]; causal self-attention over each row's first `lengths` tokens."""
    h = rms_norm(x, params["norm1"])
    q = jnp.einsum("btd,dnh->btnh", h, params["wq"])
    k = jnp.einsum("btd,dkh->btkh", h, params["wk"])
    v = jnp.einsum("btd,dkh->btkh", h, params["wv"])
    o = attention(q, k, v, is_causal=True, query_seq_lengths=lengths, key_value_seq_lengths=lengths)
    x = x + jnp.einsum("btnh,nhd->btd", o, params["wo"])
    h = rms_norm(x, params["norm2"])
    return x + jnp.einsum("btf,fd->btd", jax.nn.gelu(jnp.einsum("btd,df->btf", h, params["w_up"])), params["w_down"])


def loss(params, x, lengths, attention):
    return jnp.mean(block(params, x, lengths, attention) ** 2)


def main() -> dict[str, float]:
    """Run the block both ways; return the relative output and gradient differences (and fail if they are large)."""
    params = init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (2, 40, MODEL))
    lengths = jnp.array([40, 29], jnp.int32)  # the second row is padded after 29 tokens

    forward = jax.jit(block, static_argnums=3)
    gradients = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=3)
    want_out, want_grads = forward(params, x, lengths, jax.nn.dot_product_attention), gradients(
        params, x, lengths, jax.nn.dot_product_attention)
    attention = autotune.dot_product_attention  # the one-line switch (was: jax.nn.dot_product_attention)
    got_out, got_grads = forward(params, x, lengths, attention), gradients(params, x, lengths, attention)
    pairs = {"output": (got_out, want_out), "grad x": (got_grads[1], want_grads[1])}
    pairs.update({f"grad {name}": (got_grads[0][name], want_grads[0][name]) for name in sorted(params)})
    limit = 1e-3 if jax.default_backend() == "cpu" else 2e-2  # float32 dots may run as TF32 on a GPU
    diffs = {}
    for name, (got, want) in pairs.items():  # relative to the largest entry: gradients of a mean are small
        diffs[name] = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
        print(f"{name:>12}: max |tuned - xla| / max |xla| = {diffs[name]:.1e}")
        assert diffs[name] < limit, f"{name} differs from the XLA version by {diffs[name]} (relative)"
    print("tuned block matches the XLA block")
    return diffs


if __name__ == "__main__":
    autotune.configure(on_miss="heuristic")
    main()
