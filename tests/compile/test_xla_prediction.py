"""XLA's predicted attention beside the kernel's predicted configs (autotune/compile/xla_prediction.py): it is the
predicted winner only when faster by more than the margin under the same model, and then the runtime runs jax.nn's
XLA attention. Predictions are written through the db API for this CPU's own device kind, as `search --target`
writes them for a target's (tests/compile/test_predicted_search.py covers the real compile on v5e)."""
from __future__ import annotations

import random

import jax
import jax.numpy as jnp
import pytest

import autotune
from autotune.compile.model.prediction import GPU_MODEL_VERSION, Prediction
from autotune.compile.results import compile_key
from autotune.compile.xla_prediction import stored_xla_prediction, xla_key, xla_wins
from autotune.device import current_device
from autotune.options import DEFAULT_MARGIN
from autotune.space import Space
from db import Store
from kernels import Problem, gpu

PROBLEM = Problem(batch=1, q_len=40, kv_len=40, heads=2, kv_heads=1, head_dim=16, causal=True)


def prediction(seconds: float, version: str = GPU_MODEL_VERSION) -> dict:
    return {"seconds": seconds, "roofline_seconds": seconds * random.uniform(0.1, 0.9), "bound": "compute",
            "parts": {"issue": seconds * 0.5}, "model_version": version}


@pytest.fixture(autouse=True)
def fresh_runtime():
    autotune.reload()
    yield
    autotune.reload()


def test_xla_wins_only_when_faster_by_more_than_the_margin_under_the_same_model():
    kernel = Prediction.from_dict(prediction(random.uniform(1e-4, 1e-2)))
    clearly = Prediction.from_dict(prediction(kernel.seconds / (1 + DEFAULT_MARGIN) * 0.99))
    close = Prediction.from_dict(prediction(kernel.seconds / (1 + DEFAULT_MARGIN) * 1.01))
    other_model = Prediction.from_dict(prediction(kernel.seconds / 10, "gpu-0"))
    assert xla_wins(clearly, kernel) and not xla_wins(close, kernel)
    assert not xla_wins(other_model, kernel) and not xla_wins(None, kernel)


def store_kernel_and_xla(store: Store, kernel_s: float, xla_s: float) -> dict:
    """The kernel's predicted configs for this CPU's kind (the fastest at `kernel_s`) and XLA's at `xla_s`."""
    device = current_device()
    key = compile_key(gpu.NAME, gpu.VERSION, "gpu", device.device_kind, device.jax_version, PROBLEM)
    space = Space(gpu, PROBLEM, None)
    configs = random.sample([c for c in space.valid_configs() if c != space.default], 3)
    for config, seconds in zip(configs, (kernel_s, kernel_s * 1.5, kernel_s * 2)):
        store.add_trial(key, config=config.to_dict(), status="compiled", compile_s=1.0,
                        figures={"target": "cpu-test", "kernels": [], "prediction": prediction(seconds)})
    store.add_trial(xla_key(key), config={}, status="compiled", compile_s=1.0,
                    figures={"target": "cpu-test", "kernels": [], "prediction": prediction(xla_s)})
    assert stored_xla_prediction(store, key).seconds == xla_s
    return {"best": configs[0].to_dict(), "key": key}


def inputs():
    keys = jax.random.split(jax.random.key(random.randrange(2 ** 31)), 3)
    q = jax.random.normal(keys[0], (PROBLEM.batch, PROBLEM.q_len, PROBLEM.heads, PROBLEM.head_dim))
    k = jax.random.normal(keys[1], (PROBLEM.batch, PROBLEM.kv_len, PROBLEM.kv_heads, PROBLEM.head_dim))
    v = jax.random.normal(keys[2], (PROBLEM.batch, PROBLEM.kv_len, PROBLEM.kv_heads, PROBLEM.head_dim))
    return q, k, v


def test_a_predicted_xla_winner_runs_jax_nn_and_the_kernel_stays_one_call_away(tmp_path):
    db = tmp_path / "results.db"
    kernel_s = random.uniform(1e-4, 1e-2)
    with Store(db) as store:
        stored = store_kernel_and_xla(store, kernel_s, kernel_s / 2)
    q, k, v = inputs()
    with autotune.using(db=str(db)):
        found = autotune.lookup(q.shape, k.shape, q.dtype, causal=True)
        assert (found.source, found.implementation) == ("predicted", "xla"), found
        assert found.config.to_dict() == stored["best"] and "XLA attention is predicted faster" in found.detail
        out = autotune.dot_product_attention(q, k, v, is_causal=True)
        want = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
        assert bool(jnp.array_equal(out, want))  # jax.nn's own XLA path, not the kernel
        with pytest.warns(RuntimeWarning, match="using that predicted config"):  # the kernel says it once
            kernel_out = autotune.dot_product_attention(q, k, v, is_causal=True, implementation="pallas")
        assert not bool(jnp.array_equal(kernel_out, want)) and bool(jnp.allclose(kernel_out, want, atol=2e-5))


def test_a_predicted_xla_within_the_margin_leaves_the_kernel_the_predicted_winner(tmp_path):
    db = tmp_path / "results.db"
    kernel_s = random.uniform(1e-4, 1e-2)
    with Store(db) as store:
        stored = store_kernel_and_xla(store, kernel_s, kernel_s / (1 + DEFAULT_MARGIN) * 1.005)
    q, k, v = inputs()
    with autotune.using(db=str(db)):
        found = autotune.lookup(q.shape, k.shape, q.dtype, causal=True)
        assert (found.source, found.implementation) == ("predicted", "pallas"), found
        assert found.config.to_dict() == stored["best"] and found.prediction.seconds == kernel_s
