"""The runtime runs the key's stored winner (issue 27): where jax.nn's XLA attention won the final re-timing,
`autotune.dot_product_attention` runs it (identical results, no Pallas call, no miss counted, the verbose line says
so), `implementation="pallas"` still forces the kernel, `autotune.flash_attention` stays the kernel, and a winner
that cannot run here (cuDNN off a GPU) keeps the kernel."""
from __future__ import annotations

import random
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import autotune
from autotune.device import current_device
from autotune.keys import make_key
from autotune.kernel_protocol import kernel_for_platform, load_kernel
from db import Store
from kernels import Problem

SHAPE = dict(batch=1, q_len=48, kv_len=48, heads=4, kv_heads=2, head_dim=16)


def inputs(seed: int):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (1, 48, 4, 16))
    k, v = (jax.random.normal(key, (1, 48, 2, 16)) for key in keys[1:])
    return q, k, v


def store_winner(path, implementation: str, **problem_fields) -> Problem:
    """Store a best for this device's key of the problem whose winner is `implementation`, as a search on a GPU or
    TPU would (the kernel's default config beside it, the kernel slower)."""
    problem = Problem(**SHAPE, **problem_fields)
    kernel = load_kernel(kernel_for_platform(current_device().platform))
    baseline = random.uniform(1e-4, 1e-3)
    times = {"pallas": baseline * random.uniform(1.2, 2.0), implementation: baseline}
    with Store(path) as store:
        store.put_best(make_key(kernel, problem, current_device()), config=kernel.Config.default(problem).to_dict(),
                       time_s=baseline, default_time_s=times["pallas"], trials=4, implementation=implementation,
                       times=times)
    return problem


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "results.db"
    autotune.reload()
    with autotune.using(db=str(path), on_miss="heuristic"):
        yield path
    autotune.reload()


def pallas_calls(function, *args) -> int:
    return str(jax.make_jaxpr(function)(*args)).count("pallas_call")


def test_a_key_won_by_xla_runs_jax_nn_xla_path_with_identical_results(db, capfd) -> None:
    store_winner(db, "xla", causal=True)
    q, k, v = inputs(random.randrange(1 << 30))
    attend = jax.jit(lambda q, k, v: autotune.dot_product_attention(q, k, v, is_causal=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn: the key is tuned and its winner runs
        with autotune.using(verbose=True):
            out = attend(q, k, v)
    want = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla"))(
        q, k, v)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(want))
    assert pallas_calls(lambda q, k, v: autotune.dot_product_attention(q, k, v, is_causal=True), q, k, v) == 0
    log = capfd.readouterr().err
    assert "-> implementation=xla (tuned: xla won the final re-timing: xla " in log and "test_winner_dispatch.py" in log
    found = autotune.lookup(q.shape, k.shape, q.dtype, causal=True)
    assert (found.source, found.implementation) == ("tuned", "xla")


def test_pallas_forces_the_kernel_and_flash_attention_stays_the_kernel(db, capfd) -> None:
    store_winner(db, "xla", causal=True)
    q, k, v = inputs(random.randrange(1 << 30))
    forced = lambda q, k, v: autotune.dot_product_attention(q, k, v, is_causal=True, implementation="pallas")
    with autotune.using(verbose=True):
        assert pallas_calls(forced, q, k, v) == 1
    assert "; this call runs the kernel (flash_attention, or implementation='pallas')" in capfd.readouterr().err
    assert pallas_calls(lambda q, k, v: autotune.flash_attention(q, k, v, causal=True), q, k, v) == 1
    want = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    np.testing.assert_allclose(np.asarray(jax.jit(forced)(q, k, v)), np.asarray(want), atol=1e-5)


def test_a_baseline_winner_counts_no_miss_even_under_grad(db) -> None:
    store_winner(db, "xla", causal=True)
    q, k, v = inputs(random.randrange(1 << 30))
    loss = lambda q, k, v: autotune.dot_product_attention(q, k, v, is_causal=True).sum()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the kernel's "forward tuned, backward not" warning must not come
        grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    want = jax.jit(jax.grad(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True).sum(),
                            argnums=(0, 1, 2)))(q, k, v)
    for got, expected in zip(grads, want):
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-6, atol=1e-6)
    with Store(db) as store:
        assert store.miss_records() == []


def test_a_winner_that_cannot_run_here_keeps_the_kernel(db) -> None:
    if current_device().platform == "gpu":
        pytest.skip("cuDNN can run on a GPU")
    store_winner(db, "cudnn", causal=True, dtype="bfloat16")
    q, k, v = (x.astype(jnp.bfloat16) for x in inputs(random.randrange(1 << 30)))
    found = autotune.lookup(q.shape, k.shape, q.dtype, causal=True)
    assert (found.source, found.implementation) == ("tuned", "pallas")
    assert "cudnn won the final re-timing" in found.detail and "cuDNN runs on NVIDIA GPUs only" in found.detail
    assert pallas_calls(lambda q, k, v: autotune.dot_product_attention(q, k, v, is_causal=True), q, k, v) == 1
