"""kernels.entry.prepare, the one entry sequence of both kernels and the runtime, and the limits it enforces: a soft
cap or a softmax scale the kernels cannot compute right is refused with one line naming the argument and the limit
(on every path, before anything is looked up, traced or compiled), and values at the limits compute right."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import autotune
from autotune.runtime import tuned_call
from db import records
from kernels import attention_reference, gpu, tpu
from kernels.entry import prepare, unchecked_configs
from kernels.problem import Problem
from kernels.masking import Band
from kernels.problem import MAX_SCALE, MAX_SOFTCAP


def arrays(rng, batch=2, q_len=24, kv_len=40, heads=4, kv_heads=2, head_dim=16):
    return (jnp.asarray(rng.standard_normal((batch, q_len, heads, head_dim), np.float32)),
            jnp.asarray(rng.standard_normal((batch, kv_len, kv_heads, head_dim), np.float32)),
            jnp.asarray(rng.standard_normal((batch, kv_len, kv_heads, head_dim), np.float32)))


def test_prepare_checks_once_and_returns_what_a_kernel_needs():
    rng = np.random.default_rng()
    q, k, v = arrays(rng)
    q_ids = rng.integers(0, 3, (2, 24)).astype(np.int64)
    kv_ids = rng.integers(0, 3, (2, 40)).astype(np.int16)
    call = prepare(q, k, v, causal=True, segment_ids=(q_ids, kv_ids), window=7, softcap=30,
                   kv_lengths=np.array([5, 40]), interpret=True, platform="gpu")
    assert call.problem.causal and call.problem.segments and call.problem.lengths and call.problem.softcap == 30.0
    assert call.band == Band(left=7, right=0) == call.problem.band
    assert call.scale == pytest.approx(0.25) and call.device_kind is None and call.interpret and not call.return_lse
    assert call.q_ids.dtype == call.kv_ids.dtype == jnp.int32
    assert np.array_equal(np.asarray(call.q_ids), q_ids) and np.array_equal(np.asarray(call.kv_ids), kv_ids)
    assert call.q_lengths.tolist() == [24, 24] and call.kv_lengths.tolist() == [5, 40]  # the missing one: all
    given = prepare(q, k, v, sm_scale=np.float32(0.5), device_kind="TPU v5 lite", platform="tpu")
    assert given.device_kind == "TPU v5 lite" and given.scale == 0.5 and given.q_lengths is None


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(interpret=1), TypeError, "interpret must be a bool"),
    (dict(return_lse="yes"), TypeError, "return_lse must be a bool"),
    (dict(device_kind=3), TypeError, "device_kind must be a str"),
    (dict(sm_scale=1e30), ValueError, r"sm_scale must be at most 10000 in magnitude"),
    (dict(sm_scale=-2e4), ValueError, r"sm_scale must be at most 10000 in magnitude"),
    (dict(softcap=1e39), ValueError, r"softcap must be at most 2\*\*100"),
    (dict(softcap=3e38), ValueError, r"softcap must be at most 2\*\*100"),
])
@pytest.mark.parametrize("kernel", [gpu, tpu], ids=["gpu", "tpu"])
def test_both_kernels_refuse_the_same_bad_arguments_in_one_line(kernel, kwargs, error, message):
    q, k, v = arrays(np.random.default_rng())
    with pytest.raises(error, match=message):
        kernel.flash_attention(q, k, v, **{"interpret": True, **kwargs})


@pytest.mark.parametrize("kwargs, message", [
    (dict(scale=1e30), r"^scale must be at most 10000 in magnitude"),
    (dict(logits_soft_cap=1e39), r"^logits_soft_cap must be at most 2\*\*100"),
])
def test_dot_product_attention_refuses_them_before_any_lookup(kwargs, message, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("looked up a config for an unrunnable call")

    for name in ("find", "use", "peek_tuned"):  # every way the runtime looks a config up
        monkeypatch.setattr(tuned_call, name, must_not_run)
    q, k, v = arrays(np.random.default_rng())
    with pytest.raises(ValueError, match=message):
        autotune.dot_product_attention(q, k, v, **kwargs)
    with pytest.raises(ValueError, match=message.replace("^scale", "^sm_scale").replace("^logits_soft_cap",
                                                                                          "^softcap")):
        autotune.flash_attention(q, k, v, **{{"scale": "sm_scale", "logits_soft_cap": "softcap"}[name]: value
                                             for name, value in kwargs.items()})


@pytest.mark.parametrize("kernel", [gpu, tpu], ids=["gpu", "tpu"])
def test_the_largest_cap_and_scales_compute_right(kernel):
    rng = np.random.default_rng()
    q, k, v = arrays(rng)
    capped = kernel.flash_attention(q, k, v, sm_scale=0.01, softcap=MAX_SOFTCAP, interpret=True)
    np.testing.assert_allclose(np.asarray(capped), np.asarray(attention_reference(q, k, v, sm_scale=0.01)),
                               atol=2e-6, rtol=2e-6)  # a cap that large changes no score
    for scale in (MAX_SCALE, -MAX_SCALE):
        got = kernel.flash_attention(q, k, v, sm_scale=scale, causal=True, interpret=True)
        want = attention_reference(q, k, v, sm_scale=scale, causal=True)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=1e-4)


def test_the_database_refuses_the_caps_the_kernels_refuse():
    assert records.MAX_SOFTCAP == MAX_SOFTCAP


@pytest.mark.parametrize("kernel", [gpu, tpu], ids=["gpu", "tpu"])
def test_a_config_the_checks_reject_passes_only_within_unchecked_configs(kernel):
    # what the compile targets use, so the compiler judges what the checks reject (no patching of the kernels)
    import jax

    length = 256 if kernel is gpu else 1024
    q, k, v = arrays(np.random.default_rng(), q_len=length, kv_len=length, head_dim=256)
    problem = Problem(batch=2, q_len=length, kv_len=length, heads=4, kv_heads=2, head_dim=256)
    kind = "NVIDIA A100-SXM4-80GB" if kernel is gpu else "TPU v4"
    fields = kernel.Config.default(problem, device_kind=kind).to_dict()
    big = {"block_q": 256, "block_k": 256, "num_stages": 4} if kernel is gpu else \
        {"block_b": 2, "block_q": 1024, "block_k_major": 1024, "block_k": 1024}
    config = kernel.Config.from_dict({**fields, **big})
    assert kernel.invalid_reasons(config, problem, device_kind=kind)  # over the device's memory
    with pytest.raises(ValueError, match="config cannot run this problem"):
        kernel.flash_attention(q, k, v, config=config, device_kind=kind, interpret=True)
    with unchecked_configs():
        out = jax.eval_shape(lambda q, k, v: kernel.flash_attention(q, k, v, config=config, device_kind=kind,
                                                                      interpret=True), q, k, v)
    assert out.shape == q.shape
    with pytest.raises(ValueError, match="config cannot run this problem"):  # the switch does not outlive it
        kernel.flash_attention(q, k, v, config=config, device_kind=kind, interpret=True)


def test_heads_that_kv_heads_does_not_divide_are_refused_in_one_wording_everywhere():
    q, k, v = arrays(np.random.default_rng(), heads=3, kv_heads=2)
    wording = "kv_heads must divide heads, got heads=3 and kv_heads=2"
    with pytest.raises(ValueError, match=wording):
        Problem(batch=1, q_len=8, kv_len=8, heads=3, kv_heads=2, head_dim=16)
    with pytest.raises(ValueError, match=wording):
        prepare(q, k, v)
    with pytest.raises(ValueError, match=wording):
        autotune.dot_product_attention(q, k, v)
