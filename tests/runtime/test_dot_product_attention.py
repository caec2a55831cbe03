"""autotune.dot_product_attention against jax.nn.dot_product_attention itself: both kernels in interpret mode on the
CPU (forward and gradients), the XLA fallbacks with their one warning, bad input refused before compiling, and the
example transformer block (examples/), which checks itself against its XLA version."""
from __future__ import annotations

import runpy
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import autotune
from autotune.runtime import attention as attention_api
from autotune.device import current_device
from db import Store
from kernels import tolerance

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "transformer_block.py"
INTERPRET = current_device().interpret  # on a CPU: exact float32; on a GPU or TPU the kernels' own tolerances
KERNEL_NAMES = {"gpu": "flash_attention_gpu", "tpu": "flash_attention_tpu"}


@pytest.fixture(scope="module")
def empty_db(tmp_path_factory):
    """An empty results database: every kernel call is a miss (heuristic config) and is counted there."""
    path = tmp_path_factory.mktemp("dpa") / "results.db"
    Store(path).close()
    return path


@pytest.fixture(autouse=True)
def runtime_on(empty_db):
    autotune.reload()  # each test sees its own first warnings
    with autotune.using(db=str(empty_db), on_miss="heuristic"):
        yield
    autotune.reload()


def normal(seed: int, *shapes, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    return [jax.random.normal(key, shape, dtype) for key, shape in zip(keys, shapes)]


def missed_keys(db) -> list[dict]:
    store = Store(db)
    try:
        return [key.to_dict() for key, _count in store.misses()]
    finally:
        store.close()


def fallback_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "runs XLA, not the tuned kernel" in str(w.message)]


CASES = {
    # Odd lengths (37 queries, 45 keys), GQA (4 heads over 2), causal, a scale, padding lengths: a row with 30 valid
    # queries and 20 valid keys, and one with every query valid and no valid key (jax.nn: mean of all values).
    "causal+lengths": dict(is_causal=True, scale=0.3, query_seq_lengths=np.array([30, 37], np.int32),
                           key_value_seq_lengths=np.array([20, 0], np.int32)),
    # A two-sided window with lengths and the residual: rows past the last valid key see nothing (jax.nn: mean);
    # a length past the sequence (99) means all of it, as jax.nn reads it.
    "window+lengths+residual": dict(local_window_size=(5, 3), query_seq_lengths=np.array([99, 25], np.int32),
                                    key_value_seq_lengths=np.array([45, 17], np.int32), return_residual=True),
}


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["gpu", "tpu"])
@pytest.mark.parametrize("case", list(CASES))
def test_the_kernel_matches_jax_nn_forward_and_gradients(kernel, case, empty_db):
    if current_device().platform not in ("cpu-interpret", kernel):
        pytest.skip(f"the {kernel} kernel runs on its platform or in interpret mode on a CPU")
    q, k, v, dout = normal(1, (2, 37, 4, 16), (2, 45, 2, 16), (2, 45, 2, 16), (2, 37, 4, 16))
    args = {name: jnp.asarray(x) if isinstance(x, np.ndarray) else x for name, x in CASES[case].items()}
    residual = args.get("return_residual", False)

    def output(attention, **extra):
        return lambda q, k, v: attention(q, k, v, **args, **extra)

    def loss(attention, **extra):
        return lambda q, k, v: jnp.sum(jax.tree.leaves(output(attention, **extra)(q, k, v))[0] * dout)

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = jax.jit(output(autotune.dot_product_attention, implementation=kernel))(q, k, v)
        got_grads = jax.jit(jax.grad(loss(autotune.dot_product_attention, implementation=kernel),
                                     argnums=(0, 1, 2)))(q, k, v)
    want = output(jax.nn.dot_product_attention)(q, k, v)
    want_grads = jax.grad(loss(jax.nn.dot_product_attention), argnums=(0, 1, 2))(q, k, v)
    assert not fallback_warnings(record)
    if residual:
        (got, got_lse), (want, want_lse) = got, want
        assert got_lse.shape == want_lse.shape == (2, 37, 4) and got_lse.dtype == want_lse.dtype
        np.testing.assert_allclose(got_lse, want_lse, atol=1e-4, rtol=1e-5)
    atol, rtol = (2e-5, 2e-5) if INTERPRET else tolerance(q.dtype)
    np.testing.assert_allclose(got, want, atol=atol, rtol=rtol)
    if "query_seq_lengths" in args:
        assert float(jnp.abs(got[0, int(args["query_seq_lengths"][0]):]).max(initial=0.0)) == 0.0  # zeros, as jax.nn
    atol, rtol = (5e-5, 5e-5) if INTERPRET else tolerance(q.dtype, grad=True)
    for name, g, w in zip("qkv", got_grads, want_grads):
        np.testing.assert_allclose(g, w, atol=atol, rtol=rtol, err_msg=f"d{name}")
    ran = [key for key in missed_keys(empty_db) if key["kernel"] == KERNEL_NAMES[kernel]]
    window = args.get("local_window_size")
    window = None if window is None else (window, window) if isinstance(window, int) else window
    assert {(key["q_len"], key["kv_len"], key["heads"], key["kv_heads"], key["lengths"],
             key["window_left"], key["window_right"]) for key in ran} >= \
        {(37, 45, 4, 2, "query_seq_lengths" in args, *(window or (None, None)))}, ran  # looked up for this kernel


@pytest.mark.slow
def test_default_implementation_runs_the_platform_kernel_unbatched_and_in_bfloat16(empty_db):
    """No batch axis (jax.nn accepts [seq, heads, head_dim]), more queries than keys, not causal, bfloat16."""
    q, k, v = normal(2, (45, 2, 32), (19, 2, 32), (19, 2, 32), dtype=jnp.bfloat16)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = autotune.dot_product_attention(q, k, v)
    want = jax.nn.dot_product_attention(q, k, v)
    assert got.shape == want.shape == (45, 2, 32) and got.dtype == jnp.bfloat16
    assert not fallback_warnings(record)
    atol, rtol = tolerance(jnp.bfloat16)
    np.testing.assert_allclose(got.astype(jnp.float32), want.astype(jnp.float32), atol=atol, rtol=rtol)
    assert any(key["q_len"] == 45 and key["kv_len"] == 19 and key["batch"] == 1 for key in missed_keys(empty_db))


def test_arguments_the_kernels_lack_run_jax_nn_with_one_warning_per_shape_and_a_miss_with_the_reason(empty_db):
    q, k, v = normal(3, (2, 24, 4, 16), (2, 24, 2, 16), (2, 24, 2, 16))
    bias, = normal(4, (1, 4, 24, 24))
    mask = jax.random.bernoulli(jax.random.key(5), 0.7, (2, 1, 24, 24))
    cases = {"bias": dict(bias=bias), "mask": dict(mask=mask, local_window_size=(5, 0))}
    for reason, extra in cases.items():
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            got = [autotune.dot_product_attention(q, k, v, is_causal=True, **extra) for _ in range(2)]
        want = jax.nn.dot_product_attention(q, k, v, is_causal=True, **extra)
        for g in got:
            np.testing.assert_array_equal(g, want)
        messages = fallback_warnings(record)
        assert len(messages) == 1 and reason in messages[0], (reason, messages)
        assert all(w.filename == __file__ for w in record if "runs XLA" in str(w.message))
    store = Store(empty_db)
    try:
        reasons = {(r.key.q_len, r.key.window_left, r.key.window_right): (r.reason, r.fallbacks)
                   for r in store.miss_records() if r.reason}
    finally:
        store.close()
    assert reasons[(24, None, None)][0].startswith("bias is given")
    assert reasons[(24, 5, 0)][0].startswith("mask is given")
    assert reasons[(24, 5, 0)][1] == 1  # counted once per shape and reason, not per call


@pytest.mark.slow
def test_soft_capping_and_the_residual_run_the_kernel_and_follow_their_formula():
    q, k, v = normal(6, (1, 20, 2, 16), (1, 20, 2, 16), (1, 20, 2, 16))
    q = q * 8  # scores large enough for the cap to matter
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got, lse = autotune.dot_product_attention(q, k, v, is_causal=True, logits_soft_cap=5.0, return_residual=True)
    assert not fallback_warnings(record)
    scores = np.einsum("bqhd,bkhd->bhqk", np.asarray(q, np.float64), np.asarray(k, np.float64)) / 4.0
    scores = 5.0 * np.tanh(scores / 5.0)
    scores = np.where(np.tril(np.ones((20, 20), bool)), scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    want = np.einsum("bhqk,bkhd->bqhd", weights / weights.sum(-1, keepdims=True), np.asarray(v, np.float64))
    atol = 2e-5 if INTERPRET else 1e-2
    np.testing.assert_allclose(got, want, atol=atol, rtol=atol)
    want_lse = np.log(np.exp(scores).sum(-1)).transpose(0, 2, 1)
    np.testing.assert_allclose(lse, want_lse, atol=atol, rtol=atol)
    assert float(jnp.abs(got - jax.nn.dot_product_attention(q, k, v, is_causal=True)).max()) > 1e-2
    xla, xla_lse = autotune.dot_product_attention(q, k, v, is_causal=True, logits_soft_cap=5.0, return_residual=True,
                                                  implementation="xla")
    np.testing.assert_allclose(xla, want, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(xla_lse, want_lse, atol=1e-5, rtol=1e-5)


def test_implementation_xla_is_jax_nn_and_named_kernels_refuse_what_they_cannot_run():
    q, k, v = normal(7, (2, 24, 2, 16), (2, 24, 2, 16), (2, 24, 2, 16))
    got = autotune.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    np.testing.assert_array_equal(got, jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla"))
    for implementation in attention_api.KERNEL_IMPLEMENTATIONS:
        with pytest.raises(ValueError, match=r"implementation='\w+' cannot run this call: bias"):
            autotune.dot_product_attention(q, k, v, jnp.zeros((1, 2, 24, 24)), implementation=implementation)


BAD = [
    (dict(local_window_size=-1), "local_window_size must not be negative"),
    (dict(local_window_size=(2, 3, 4)), "local_window_size must be an int or a pair"),
    (dict(local_window_size=1.5), "local_window_size must be an int or a pair"),
    (dict(local_window_size=True), "local_window_size must be an int or a pair"),
    (dict(query_seq_lengths=np.array([3.0, 4.0])), "query_seq_lengths must be an integer array"),
    (dict(query_seq_lengths=np.array([3, 4, 5], np.int32)), r"query_seq_lengths must have shape \(2,\)"),
    (dict(key_value_seq_lengths=np.array([3, -1], np.int32)), "key_value_seq_lengths must not be negative"),
    (dict(key_value_seq_lengths=7), "key_value_seq_lengths must be an integer array"),
    (dict(logits_soft_cap=0.0), "logits_soft_cap must be a positive finite number"),
    (dict(logits_soft_cap=-30.0), "logits_soft_cap must be a positive finite number"),
    (dict(logits_soft_cap="50"), "logits_soft_cap must be a positive finite number"),
    (dict(implementation="triton"), "implementation must be one of"),
    (dict(scale=float("nan")), "scale must be a finite number"),
    (dict(is_causal="yes"), "is_causal must be a bool"),
    (dict(mask=np.ones((1, 1, 8, 8), np.float32)), "mask must be a boolean array"),
]


@pytest.mark.parametrize("extra,message", BAD, ids=[next(iter(extra)) + str(i) for i, (extra, _) in enumerate(BAD)])
def test_bad_input_is_a_value_error_naming_the_argument_before_anything_compiles(extra, message, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("reached a kernel or XLA with bad input")

    monkeypatch.setattr(attention_api, "tuned_flash_attention", must_not_run)
    monkeypatch.setattr(jax.nn, "dot_product_attention", must_not_run)
    q, k, v = normal(8, (2, 8, 2, 16), (2, 8, 2, 16), (2, 8, 2, 16))
    with pytest.raises(ValueError, match=message):
        autotune.dot_product_attention(q, k, v, **extra)


@pytest.mark.slow
def test_the_transformer_block_example_matches_xla():
    diffs = runpy.run_path(str(EXAMPLE))["main"]()  # fails itself when a difference is too large
    assert set(diffs) >= {"output", "grad x", "grad wq", "grad wk", "grad wv"}
    assert max(diffs.values()) < (1e-3 if INTERPRET else 2e-2)
