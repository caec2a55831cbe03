"""The TPU flash-attention kernel against the einsum reference, run on the CPU in TPU interpret mode.

Every case draws fresh random inputs from its own seed and compares the output and the gradients of
sum(out * random cotangent) with the reference. Interpret-mode compiles cost seconds each, so the cases are few and
chosen to cover: causal x segment ids (unaligned boundaries, rows that see no key) x GQA/MQA x odd lengths x
q_len != kv_len x dtypes, the mask-free path, several kv major and minor blocks, and the acceptance shape.
"""
from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import Problem, attention_mask, attention_reference, tolerance
from kernels.tpu import NAME, VERSION, Config, flash_attention, invalid_reasons, search_space


def _segments(key, batch: int, length: int, documents: int) -> jax.Array:
    """Sorted ids in [0, documents): segment boundaries at random positions, not aligned to any block."""
    return jnp.sort(jax.random.randint(key, (batch, length), 0, documents), axis=1).astype(jnp.int32)


def _inputs(seed: int, *, batch, q_len, kv_len, heads, kv_heads, head_dim, dtype, segments):
    """Random q, k, v, cotangent and segment ids (None, one array, or a pair whose q side has an unseen id)."""
    keys = jax.random.split(jax.random.key(seed), 6)
    q = jax.random.normal(keys[0], (batch, q_len, heads, head_dim), jnp.float32).astype(dtype)
    k = jax.random.normal(keys[1], (batch, kv_len, kv_heads, head_dim), jnp.float32).astype(dtype)
    v = jax.random.normal(keys[2], (batch, kv_len, kv_heads, head_dim), jnp.float32).astype(dtype)
    g = jax.random.normal(keys[3], (batch, q_len, heads, head_dim), jnp.float32).astype(dtype)
    if segments == "one":
        ids = _segments(keys[4], batch, q_len, 3)
    elif segments == "pair":  # q ids reach one id more than kv ids: those rows see no key
        ids = (_segments(keys[4], batch, q_len, 4), _segments(keys[5], batch, kv_len, 3))
    else:
        ids = None
    return q, k, v, g, ids


def _out_and_grads(fn, q, k, v, g, ids, **kwargs):
    """(out, (dq, dk, dv)) of fn, jitted; gradients are those of sum(out * g)."""

    def run(q, k, v, g, ids):
        out, vjp = jax.vjp(lambda q_, k_, v_: fn(q_, k_, v_, segment_ids=ids, **kwargs), q, k, v)
        return out, vjp(g)

    return jax.jit(run)(q, k, v, g, ids)


def _assert_close(name: str, got, want, dtype, *, grad: bool) -> None:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.all(np.isfinite(got)), f"{name} has NaN or infinity"
    atol, rtol = tolerance(dtype, grad=grad)
    np.testing.assert_allclose(got, want, atol=atol, rtol=rtol, err_msg=name)


def _check(seed: int, *, dtype, causal: bool, segments, config=None, grads: bool = True, **shape):
    q, k, v, g, ids = _inputs(seed, dtype=dtype, segments=segments, **shape)
    if grads:
        out, dqkv = _out_and_grads(flash_attention, q, k, v, g, ids, causal=causal, config=config, interpret=True)
        want, want_dqkv = _out_and_grads(attention_reference, q, k, v, g, ids, causal=causal)
    else:
        run = jax.jit(lambda q, k, v, ids: flash_attention(q, k, v, causal=causal, segment_ids=ids, config=config,
                                                           interpret=True))
        out = run(q, k, v, ids)
        want = jax.jit(lambda q, k, v, ids: attention_reference(q, k, v, causal=causal, segment_ids=ids))(q, k, v, ids)
    assert out.shape == q.shape and out.dtype == q.dtype
    _assert_close("out", out, want, dtype, grad=False)
    if grads:
        for name, got, ref, x in zip(("dq", "dk", "dv"), dqkv, want_dqkv, (q, k, v)):
            assert got.shape == x.shape and got.dtype == x.dtype
            _assert_close(name, got, ref, dtype, grad=True)

    # Rows that see no key: exactly zero output, finite zero dq.
    q_ids, kv_ids = (ids if isinstance(ids, tuple) else (ids, ids)) if ids is not None else (None, None)
    mask = attention_mask(q.shape[1], k.shape[1], causal=causal, q_ids=q_ids, kv_ids=kv_ids)
    blind = ~np.asarray(mask).any(axis=-1)[:, 0]  # [batch or 1, q_len]
    blind = np.broadcast_to(blind, q.shape[:2])
    if segments == "pair":
        assert blind.any(), "the case should have rows that see no key"
    if blind.any():
        assert np.all(np.asarray(out, np.float32)[blind] == 0.0)
        if grads:
            assert np.all(np.asarray(dqkv[0], np.float32)[blind] == 0.0)


CASES = {
    # several q blocks, kv major blocks of 2 minor blocks, kv > q (causal leaves some keys unseen), block_b 2
    "f32-causal-segpair-gqa-blocks": dict(
        dtype=jnp.float32, causal=True, segments="pair", config=Config(2, 64, 256, 128, 128, 256, 128),
        batch=2, q_len=200, kv_len=300, heads=2, kv_heads=1, head_dim=32),
    "bf16-causal-mqa-qlong": dict(
        dtype=jnp.bfloat16, causal=True, segments=None,
        batch=1, q_len=136, kv_len=72, heads=3, kv_heads=1, head_dim=64),
    "bf16-segpair-gqa-qshort": dict(
        dtype=jnp.bfloat16, causal=False, segments="pair", config=Config(1, 40, 128, 128, 40, 128, 128),
        batch=1, q_len=40, kv_len=260, heads=2, kv_heads=1, head_dim=32),
    "f16-causal-segpair-gqa-forward": dict(
        dtype=jnp.float16, causal=True, segments="pair", grads=False,
        batch=1, q_len=130, kv_len=130, heads=4, kv_heads=2, head_dim=32),
    # no padding, no causal, no segments: the kernels' mask-free path; plain multi-head
    "f32-plain-aligned-mha": dict(
        dtype=jnp.float32, causal=False, segments=None, config=Config(1, 128, 256, 128, 128, 128, 128),
        batch=1, q_len=128, kv_len=256, heads=2, kv_heads=2, head_dim=64),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case):
    _check(sum(map(ord, case)), **CASES[case])


@pytest.mark.parametrize("dtype, config", [
    (jnp.float32, None),  # the default config
    (jnp.bfloat16, Config(2, 304, 384, 128, 304, 384, 128)),  # batch blocks, one kv tile walked in 3 steps
])
def test_acceptance_case(dtype, config):
    _check(7, dtype=dtype, causal=True, segments="one", config=config,
           batch=2, q_len=300, kv_len=300, heads=8, kv_heads=2, head_dim=72)


def test_vmap_forward_and_grad():
    keys = jax.random.split(jax.random.key(11), 4)
    q = jax.random.normal(keys[0], (2, 1, 70, 2, 32))
    k = jax.random.normal(keys[1], (2, 1, 90, 1, 32))
    v = jax.random.normal(keys[2], (2, 1, 90, 1, 32))
    g = jax.random.normal(keys[3], q.shape)

    def batched(fn):
        def run(q, k, v):
            out, vjp = jax.vjp(jax.vmap(lambda a, b, c: fn(a, b, c, causal=True, sm_scale=0.3)), q, k, v)
            return out, vjp(g)
        return run

    out, grads = jax.jit(batched(lambda *a, **kw: flash_attention(*a, **kw, interpret=True)))(q, k, v)
    want, want_grads = jax.jit(batched(attention_reference))(q, k, v)
    _assert_close("out", out, want, jnp.float32, grad=False)
    for name, got, ref in zip(("dq", "dk", "dv"), grads, want_grads):
        _assert_close(name, got, ref, jnp.float32, grad=True)


# ----------------------------------------------------------------------------------------------- configs

def test_surface():
    assert NAME == "flash_attention_tpu"
    assert isinstance(VERSION, str) and len(VERSION) == 12


def test_config_json_round_trip_and_hashable():
    config = Config(2, 64, 256, 128, 128, 256, 128)
    assert Config.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert {config: 1}[Config(**config.to_dict())] == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.block_q = 8


@pytest.mark.parametrize("data, word", [
    ({"block_z": 1}, "block_z"),
    ({"block_b": 1}, "missing"),
    ({"block_q": True}, "block_q"),
    ({"block_k": 128.0}, "block_k"),
    ({"block_k_major": 0}, "block_k_major"),
])
def test_config_from_dict_errors(data, word):
    base = Config(1, 128, 128, 128, 128, 128, 128).to_dict()
    if word == "missing":
        base.pop("bwd_block_k")
        word = "bwd_block_k"
    else:
        base.update(data)
    with pytest.raises(ValueError, match=word):
        Config.from_dict(base)


PROBLEMS = [
    Problem(2, 300, 300, 8, 2, 72, "float32", causal=True, segments=True, backward=True),
    Problem(1, 40, 72, 4, 1, 64, "bfloat16"),
    Problem(4, 4096, 4096, 32, 8, 128, "bfloat16", causal=True, backward=True),
    Problem(1, 2048, 8192, 8, 8, 256, "float32", segments=True, backward=True),
    Problem(1, 5, 1000, 2, 2, 16, "float16", backward=True),
]


@pytest.mark.parametrize("problem", PROBLEMS, ids=str)
def test_default_is_valid_and_in_search_space(problem):
    config = Config.default(problem)
    assert invalid_reasons(config, problem) == []
    space = search_space(problem)
    fields = [f.name for f in dataclasses.fields(Config)]
    expected = fields if problem.backward else [f for f in fields if not f.startswith("bwd_")]
    assert sorted(space) == sorted(expected)
    for name, values in space.items():
        assert values and all(type(x) is int and x > 0 for x in values)
        assert getattr(config, name) in values, name
    size = np.prod([len(v) for v in space.values()])
    assert size <= 20000


def test_invalid_reasons():
    problem = Problem(2, 300, 300, 4, 2, 64, "float32", causal=True, segments=True, backward=True)
    ok = Config(1, 128, 256, 128, 128, 256, 128)
    assert invalid_reasons(ok, problem) == []
    assert invalid_reasons(dataclasses.replace(ok, block_q=304, block_k_major=384, block_k=384), problem) == []

    def reasons(**changes):
        return " | ".join(invalid_reasons(dataclasses.replace(ok, **changes), problem))

    assert "block_k (100)" in reasons(block_k=100, block_k_major=200)
    assert "must divide block_k_major" in reasons(block_k=256, block_k_major=384)
    assert "block_b (3) must divide the batch" in reasons(block_b=3)
    assert "block_q (12)" in reasons(block_q=12)
    assert "exceeds" in reasons(block_q=1024)
    assert "bwd_block_q (64)" in reasons(bwd_block_q=64)  # dk/dv lays query rows along lanes
    big = invalid_reasons(Config(1, 1024, 2048, 512, 128, 128, 128), Problem(1, 4096, 4096, 2, 2, 512, "float32"))
    assert any("VMEM" in reason for reason in big)
    # blocks that are not lane multiples are fine when one block spans the whole (short) sequence
    short = Problem(1, 40, 72, 2, 2, 32, "float32", backward=True)
    assert invalid_reasons(Config(1, 40, 72, 72, 40, 72, 72), short) == []
    # backward blocks only matter for a backward problem
    assert invalid_reasons(dataclasses.replace(ok, bwd_block_q=64), problem.replace(backward=False)) == []
    with pytest.raises(TypeError, match="config"):
        invalid_reasons(ok.to_dict(), problem)


# ----------------------------------------------------------------------------------------------- bad input

def _qkv(batch=1, q_len=16, kv_len=16, heads=2, kv_heads=2, head_dim=8, dtype=jnp.float32):
    q = jnp.ones((batch, q_len, heads, head_dim), dtype)
    k = jnp.ones((batch, kv_len, kv_heads, head_dim), dtype)
    return q, k, k


@pytest.mark.parametrize("change, error, word", [
    (lambda q, k, v: dict(q=q[0]), ValueError, "q must have 4"),
    (lambda q, k, v: dict(k=k.astype(jnp.int32)), TypeError, "k must be a floating"),
    (lambda q, k, v: dict(v=v.astype(jnp.bfloat16)), TypeError, "share one dtype"),
    (lambda q, k, v: dict(k=k[:, :, :1].repeat(3, 2), v=v[:, :, :1].repeat(3, 2)), ValueError, "kv_heads must divide heads"),
    (lambda q, k, v: dict(v=v[:, :8]), ValueError, "k and v must have the same shape"),
    (lambda q, k, v: dict(q=np.zeros((1, 16, 2, 8), np.float64)), TypeError, "q must be a floating"),
    (lambda q, k, v: dict(segment_ids=jnp.zeros((1, 15), jnp.int32)), ValueError, "segment_ids"),
    (lambda q, k, v: dict(segment_ids=jnp.zeros((1, 16), jnp.float32)), TypeError, "segment_ids"),
    (lambda q, k, v: dict(segment_ids=[jnp.zeros((1, 16), jnp.int32)]), ValueError, "segment_ids"),
    (lambda q, k, v: dict(sm_scale=float("nan")), ValueError, "sm_scale"),
    (lambda q, k, v: dict(causal="yes"), TypeError, "causal"),
    (lambda q, k, v: dict(interpret=1), TypeError, "interpret"),
    (lambda q, k, v: dict(config={"block_q": 8}), TypeError, "config"),
    (lambda q, k, v: dict(config=Config(1, 16, 128, 100, 16, 16, 16)), ValueError, "config cannot run.*block_k"),
    (lambda q, k, v: dict(config=Config(3, 16, 16, 16, 16, 16, 16)), ValueError, "block_b"),
])
def test_bad_input_raises(change, error, word):
    q, k, v = _qkv()
    args = {"q": q, "k": k, "v": v, "interpret": True}
    args.update(change(q, k, v))
    with pytest.raises(error, match=word):
        flash_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


def test_bad_backward_config_raises_under_grad():
    q, k, v = _qkv(q_len=300, kv_len=300)
    config = Config(1, 304, 384, 128, 64, 128, 128)  # fine forward; bwd_block_q 64 is not a lane multiple

    def loss(q):
        return flash_attention(q, k, v, config=config, interpret=True).sum()

    with pytest.raises(ValueError, match="bwd_block_q"):
        jax.grad(loss)(q)


# ----------------------------------------------------------------------------------------------- flags and modes

def test_forward_and_grad_under_x64():
    """jax_enable_x64 makes Python ints int64: the kernels' index arithmetic must stay int32."""
    q, k, v, g, ids = _inputs(11, batch=1, q_len=72, kv_len=72, heads=2, kv_heads=1, head_dim=16,
                              dtype=jnp.float32, segments="one")
    with jax.enable_x64(True):
        out, grads = _out_and_grads(flash_attention, q, k, v, g, ids, causal=True, interpret=True)
    want_out, want_grads = _out_and_grads(attention_reference, q, k, v, g, ids, causal=True)
    _assert_close("out", out, want_out, jnp.float32, grad=False)
    for name, got, want in zip(("dq", "dk", "dv"), grads, want_grads):
        _assert_close(name, got, want, jnp.float32, grad=True)


def test_causal_accepts_numpy_bool():
    q, k, v, _, _ = _inputs(12, batch=1, q_len=64, kv_len=64, heads=2, kv_heads=1, head_dim=16,
                            dtype=jnp.float32, segments=None)
    got = flash_attention(q, k, v, causal=np.bool_(True), interpret=True)
    _assert_close("out", got, attention_reference(q, k, v, causal=True), jnp.float32, grad=False)


def test_device_kind_sets_the_default_config_and_checks():
    """The device kind given (a compile target) is what the default config and the VMEM checks are for."""
    q, k, v = _qkv(q_len=64, kv_len=64)
    with pytest.raises(TypeError, match="device_kind"):
        flash_attention(q, k, v, interpret=True, device_kind=5)
    out = flash_attention(q, k, v, interpret=True, device_kind="TPU v5 lite")
    assert out.shape == q.shape and bool(jnp.all(jnp.isfinite(out)))
