"""Tests of the GPU flash-attention kernel (kernels.gpu) in interpret mode on the CPU, against the einsum reference.

Each kernel case costs a trace and a compile (about a second in interpret mode), so the sweep is a hand-picked set
that covers causal x segment ids x GQA/MQA x ragged lengths x q_len != kv_len x dtypes, each forward and gradient.
Tests marked `gpu` run the compiled Triton kernels and are skipped without a GPU.
"""
from __future__ import annotations

import functools
import json
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import Problem, attention_reference, tolerance
from kernels.gpu import NAME, VERSION, Config, flash_attention, invalid_reasons, search_space

# Small blocks: several q and kv blocks per sequence, with a ragged tail at the lengths used below.
SMALL = Config(block_q=16, block_k=32, num_warps=2, num_stages=1,
               bwd_block_q=32, bwd_block_k=16, bwd_num_warps=2, bwd_num_stages=1)
MIXED = Config(block_q=32, block_k=16, num_warps=4, num_stages=2,
               bwd_block_q=16, bwd_block_k=64, bwd_num_warps=4, bwd_num_stages=3)
ABSENT_ID = 99  # a q segment id that no kv position has: those query rows see no key

on_gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (compiled Triton kernels)")


def make_case(seed, batch, q_len, kv_len, heads, kv_heads, head_dim, dtype, *, segments):
    """Fresh random q, k, v, cotangent and (optionally) segment ids with unaligned boundaries and empty rows."""
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape, dtype=np.float32)).astype(dtype)

    q = normal(batch, q_len, heads, head_dim)
    k = normal(batch, kv_len, kv_heads, head_dim)
    v = normal(batch, kv_len, kv_heads, head_dim)
    cot = normal(batch, q_len, heads, head_dim)
    ids = empty = None
    if segments:
        # Sorted random ids in {0, 1, 2}: segment boundaries fall anywhere, not on block edges.
        q_ids = np.sort(rng.integers(0, 3, (batch, q_len)), axis=1).astype(np.int32)
        kv_ids = np.sort(rng.integers(0, 3, (batch, kv_len)), axis=1).astype(np.int32)
        start = int(rng.integers(0, q_len - 5))
        q_ids[:, start:start + 5] = ABSENT_ID
        empty = slice(start, start + 5)
        ids = (jnp.asarray(q_ids), jnp.asarray(kv_ids))
    return q, k, v, cot, ids, empty


def assert_close(actual, expected, dtype, *, grad, what):
    actual = np.asarray(jnp.asarray(actual, jnp.float32))
    expected = np.asarray(jnp.asarray(expected, jnp.float32))
    assert np.all(np.isfinite(actual)), f"{what}: non-finite values"
    atol, rtol = tolerance(dtype, grad=grad)
    np.testing.assert_allclose(actual, expected, atol=atol, rtol=rtol, err_msg=what)


def reference_with_grads(reference, q, k, v, cot):
    """Reference output and its q, k, v cotangents, in one jit (one compile, not one per op)."""
    @jax.jit
    def run(q, k, v, cot):
        out, vjp = jax.vjp(reference, q, k, v)
        return out, vjp(cot)
    return run(q, k, v, cot)


def check_against_reference(q, k, v, cot, ids, *, causal, config, sm_scale=None, empty=None, device_kind=None):
    """Forward and gradients of sum(out * cot) of the kernel equal the reference's within tolerance."""
    def kernel(q, k, v):
        return flash_attention(q, k, v, causal=causal, segment_ids=ids, sm_scale=sm_scale,
                               config=config, interpret=True, device_kind=device_kind)

    def reference(q, k, v):
        return attention_reference(q, k, v, causal=causal, segment_ids=ids, sm_scale=sm_scale)

    out, vjp = jax.vjp(kernel, q, k, v)
    grads = vjp(cot)
    ref_out, ref_grads = reference_with_grads(reference, q, k, v, cot)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, ref_out, q.dtype, grad=False, what="output")
    for name, g, ref_g, x in zip(("dq", "dk", "dv"), grads, ref_grads, (q, k, v)):
        assert g.shape == x.shape and g.dtype == x.dtype, name
        assert_close(g, ref_g, q.dtype, grad=True, what=name)
    if empty is not None:
        # Rows that see no key: exactly zero output and zero dq, never NaN.
        assert np.all(np.asarray(out[:, empty], np.float32) == 0.0)
        assert np.all(np.asarray(grads[0][:, empty], np.float32) == 0.0)


# (id, batch, q_len, kv_len, heads, kv_heads, head_dim, dtype, causal, segments, config, sm_scale)
SWEEP = [
    ("f32-causal-seg-gqa", 2, 37, 37, 4, 2, 16, "float32", True, True, SMALL, None),
    ("f32-causal-qlong-mqa-d24", 1, 100, 37, 4, 1, 24, "float32", True, False, SMALL, None),
    ("f32-causal-kvlong-seg", 1, 37, 100, 2, 2, 32, "float32", True, True, MIXED, None),
    ("f32-full-seg-gqa3-negscale", 2, 100, 37, 6, 3, 40, "float32", False, True, SMALL, -0.3),  # factor <= 0: no fold
    ("bf16-causal-seg-gqa", 1, 100, 100, 4, 2, 32, "bfloat16", True, True, SMALL, None),
    ("bf16-full-mqa-kvlong", 1, 37, 100, 4, 1, 48, "bfloat16", False, False, MIXED, None),
    ("f16-causal-seg-qlong", 1, 100, 37, 2, 1, 16, "float16", True, True, SMALL, None),
    ("f16-full-seg-gqa-d8", 2, 37, 37, 4, 2, 8, "float16", False, True, None, None),
]


@pytest.mark.parametrize(
    "batch,q_len,kv_len,heads,kv_heads,head_dim,dtype,causal,segments,config,sm_scale",
    [case[1:] for case in SWEEP], ids=[case[0] for case in SWEEP],
)
def test_matches_reference(request, batch, q_len, kv_len, heads, kv_heads, head_dim, dtype, causal, segments,
                           config, sm_scale):
    seed = zlib.crc32(request.node.callspec.id.encode())  # fixed per case, different across cases
    q, k, v, cot, ids, empty = make_case(seed, batch, q_len, kv_len, heads, kv_heads, head_dim, dtype,
                                         segments=segments)
    check_against_reference(q, k, v, cot, ids, causal=causal, config=config, sm_scale=sm_scale, empty=empty)


@pytest.mark.parametrize("q_len,kv_len,dtype,causal,config", [
    (100, 37, "float32", True, SMALL), (37, 100, "bfloat16", False, MIXED),
], ids=["causal-qlong", "full-kvlong"])
def test_matches_reference_two_loop_path(q_len, kv_len, dtype, causal, config):
    """Off Hopper the key blocks run as a plain loop then a masked one (on Hopper: one masked loop)."""
    q, k, v, cot, ids, empty = make_case(q_len + kv_len, 1, q_len, kv_len, 4, 2, 24, dtype, segments=True)
    check_against_reference(q, k, v, cot, ids, causal=causal, config=config, empty=empty,
                            device_kind="NVIDIA A100-SXM4-80GB")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_acceptance_case(dtype):
    """batch 2, length 300, 8 heads over 2 kv heads, head_dim 72, causal with segment ids, default config."""
    q, k, v, cot, ids, empty = make_case(300, 2, 300, 300, 8, 2, 72, dtype, segments=True)
    check_against_reference(q, k, v, cot, ids, causal=True, config=None, empty=empty)


def test_jit_default_config_one_segment_array():
    """Forward and gradient traced inside one jax.jit; default config; lengths that need no padding; one
    segment-id array shared by q and kv."""
    q, k, v, cot, _, _ = make_case(7, 1, 64, 64, 2, 2, 64, "float32", segments=False)
    seg = jnp.asarray(np.repeat(np.arange(3), [13, 30, 21])[None], jnp.int32)

    @jax.jit
    def run(q, k, v):
        def loss(q, k, v):
            out = flash_attention(q, k, v, causal=True, segment_ids=seg, interpret=True)
            return jnp.sum(out * cot), out
        (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return out, grads

    out, grads = run(q, k, v)
    reference = functools.partial(attention_reference, causal=True, segment_ids=seg)
    ref_out, ref_grads = reference_with_grads(reference, q, k, v, cot)
    assert_close(out, ref_out, "float32", grad=False, what="output")
    for name, g, ref_g in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(g, ref_g, "float32", grad=True, what=name)


def test_vmap_over_extra_axis():
    """vmap over a leading axis (segment ids mapped too), forward and gradient."""
    rng = np.random.default_rng(11)
    q = jnp.asarray(rng.standard_normal((3, 1, 40, 4, 16), dtype=np.float32))
    k = jnp.asarray(rng.standard_normal((3, 1, 33, 2, 16), dtype=np.float32))
    v = jnp.asarray(rng.standard_normal((3, 1, 33, 2, 16), dtype=np.float32))
    q_ids = jnp.asarray(np.sort(rng.integers(0, 2, (3, 1, 40)), axis=-1), jnp.int32)
    kv_ids = jnp.asarray(np.sort(rng.integers(0, 2, (3, 1, 33)), axis=-1), jnp.int32)

    def loss(attend):
        def f(q, k, v):
            out = jax.vmap(lambda q, k, v, a, b: attend(q, k, v, segment_ids=(a, b), causal=True))(
                q, k, v, q_ids, kv_ids)
            return jnp.sum(jnp.sin(out)), out
        return f

    kernel = lambda *a, **kw: flash_attention(*a, **kw, config=SMALL, interpret=True)  # noqa: E731
    (_, out), grads = jax.value_and_grad(loss(kernel), argnums=(0, 1, 2), has_aux=True)(q, k, v)
    (_, ref), ref_grads = jax.jit(jax.value_and_grad(loss(attention_reference), argnums=(0, 1, 2), has_aux=True))(
        q, k, v)
    assert_close(out, ref, "float32", grad=False, what="output")
    for name, g, ref_g in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(g, ref_g, "float32", grad=True, what=name)


@pytest.mark.gpu
@on_gpu
def test_compiled_on_gpu():
    """The Triton-compiled kernels (interpret=False): causal, segment ids, GQA, bf16, ragged length."""
    q, k, v, cot, ids, empty = make_case(5, 2, 300, 300, 8, 2, 72, "bfloat16", segments=True)

    def kernel(q, k, v):
        return flash_attention(q, k, v, causal=True, segment_ids=ids, config=MIXED)

    out, vjp = jax.vjp(jax.jit(kernel), q, k, v)
    grads = vjp(cot)
    reference = functools.partial(attention_reference, causal=True, segment_ids=ids)
    ref_out, ref_grads = reference_with_grads(reference, q, k, v, cot)
    assert_close(out, ref_out, "bfloat16", grad=False, what="output")
    for name, g, ref_g in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(g, ref_g, "bfloat16", grad=True, what=name)
    assert np.all(np.asarray(out[:, empty], np.float32) == 0.0)


# ---------------------------------------------------------------------------------------------------------------
# Config, search space and validity: no kernel runs.

PROBLEM = Problem(batch=2, q_len=300, kv_len=300, heads=8, kv_heads=2, head_dim=72, dtype="bfloat16",
                  causal=True, segments=True, backward=True)


def test_identity():
    assert NAME == "flash_attention_gpu"
    assert isinstance(VERSION, str) and len(VERSION) == 12


def test_config_json_round_trip():
    config = Config.default(PROBLEM)
    again = Config.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and hash(again) == hash(config)
    assert again.to_dict() == config.to_dict()


@pytest.mark.parametrize("change,field", [
    ({"block_x": 16}, "block_x"),
    ({"block_q": True}, "block_q"),
    ({"num_warps": 4.0}, "num_warps"),
    ({"bwd_num_stages": "2"}, "bwd_num_stages"),
])
def test_config_from_dict_rejects(change, field):
    data = {**Config.default(PROBLEM).to_dict(), **change}
    with pytest.raises(ValueError, match=field):
        Config.from_dict(data)


def test_config_from_dict_requires_all_fields():
    data = Config.default(PROBLEM).to_dict()
    del data["bwd_block_k"]
    with pytest.raises(ValueError, match="bwd_block_k"):
        Config.from_dict(data)


@pytest.mark.parametrize("problem", [
    PROBLEM,
    Problem(1, 20, 5000, 4, 4, 256, "float32", backward=True),
    Problem(1, 4096, 4096, 16, 1, 128, "float16", causal=True, backward=True),
    Problem(1, 1, 1, 1, 1, 1),
])
@pytest.mark.parametrize("device_kind", [None, "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB", "Tesla T4"])
def test_default_is_valid(problem, device_kind):
    config = Config.default(problem, device_kind=device_kind)
    assert invalid_reasons(config, problem, device_kind=device_kind) == []
    assert config.num_warps == (8 if problem.head_dim > 64 and config.block_q >= 128 else 4)  # 8 on 128+ rows


def test_default_scales_blocks_to_short_sequences():
    config = Config.default(Problem(1, 20, 40, 2, 2, 64))
    assert (config.block_q, config.block_k) == (32, 64)
    config = Config.default(Problem(1, 3, 3, 2, 2, 64))
    assert (config.block_q, config.block_k, config.bwd_block_q, config.bwd_block_k) == (16, 16, 16, 16)


def test_search_space():
    space = search_space(PROBLEM)
    assert set(space) == set(Config.default(PROBLEM).to_dict())
    assert space["num_warps"] == (1, 2, 4, 8) and space["num_stages"] == (1, 2, 3, 4)
    assert max(space["block_q"]) <= 512 and 256 not in space["block_q"]
    forward_only = search_space(PROBLEM.replace(backward=False))
    assert set(forward_only) == {"block_q", "block_k", "num_warps", "num_stages"}
    assert int(np.prod([len(v) for v in forward_only.values()])) <= 400
    short = search_space(Problem(1, 20, 3000, 1, 1, 64))
    assert short["block_q"] == (16, 32) and 256 in short["block_k"]
    for name, values in space.items():
        assert all(isinstance(x, int) and x > 0 for x in values), name


def test_search_space_candidates_mostly_valid():
    space = search_space(PROBLEM)
    base = Config.default(PROBLEM)
    for block_q in space["block_q"]:
        for block_k in space["block_k"]:
            warps = base.num_warps if block_q >= 128 else 4  # 8 warps need 128 rows
            config = Config(**{**base.to_dict(), "block_q": block_q, "block_k": block_k, "num_stages": 2,
                               "num_warps": warps})
            assert invalid_reasons(config, PROBLEM) == [], config


def _with(**changes):
    return Config(**{**Config.default(PROBLEM).to_dict(), **changes})


@pytest.mark.parametrize("config,problem,device_kind,needle", [
    (_with(block_q=24), PROBLEM, None, "block_q=24"),
    (_with(bwd_block_k=8), PROBLEM, None, "bwd_block_k=8"),
    (_with(num_warps=3), PROBLEM, None, "num_warps=3"),
    (_with(bwd_num_stages=0), PROBLEM, None, "bwd_num_stages=0"),
    (_with(num_stages=9), PROBLEM, None, "num_stages=9"),
    (_with(block_k=1024), PROBLEM, None, "block_k=1024"),
    (_with(bwd_block_q=1024), PROBLEM, None, "bwd_block_q=1024"),
    (Config(256, 256, 8, 4, 32, 32, 8, 2), Problem(1, 1024, 1024, 1, 1, 256, "float32"), None, "shared memory"),
    (_with(bwd_block_q=128, bwd_block_k=128, bwd_num_stages=4), PROBLEM.replace(head_dim=256), None, "backward"),
    # 3 stages of 128x64 float32 d128 tiles: more than an A100's shared memory.
    (Config(128, 64, 8, 3, 32, 32, 8, 2), Problem(1, 1024, 1024, 1, 1, 128, "float32"), "NVIDIA A100-SXM4-40GB",
     "163 KiB"),
    (Config(128, 64, 8, 2, 32, 32, 8, 2), Problem(1, 1024, 1024, 1, 1, 128, "float32"), "Tesla T4", "99 KiB"),
    # 8 warps on 64-row backward tiles: both warpgroups compute the same scores (issue 22 part 3)
    (_with(bwd_block_q=64, bwd_block_k=64, bwd_num_warps=8), PROBLEM, "NVIDIA H100 80GB HBM3", "bwd_block_q >= 128"),
    (_with(bwd_block_q=128, bwd_block_k=64, bwd_num_warps=8), PROBLEM, "NVIDIA A100-SXM4-80GB", "bwd_block_k >= 128"),
    (_with(block_q=64, num_warps=8), PROBLEM, None, "block_q >= 128"),
    (_with(bwd_block_q=16, bwd_block_k=64, bwd_num_warps=4), PROBLEM, "NVIDIA A100-SXM4-80GB", "bwd_block_k >= 32"),
    (_with(bwd_block_q=16, bwd_block_k=16, bwd_num_warps=4), PROBLEM, None, "bwd_block_k >= 32"),
])
def test_invalid_reasons(config, problem, device_kind, needle):
    reasons = invalid_reasons(config, problem, device_kind=device_kind)
    assert reasons and any(needle in reason for reason in reasons), reasons


def test_valid_configs():
    problem = Problem(1, 1024, 1024, 1, 1, 128, "float32")
    config = Config(128, 64, 8, 2, 32, 32, 8, 2)
    for kind in (None, "cpu", "NVIDIA H100 80GB HBM3", "NVIDIA H200"):
        assert invalid_reasons(config, problem, device_kind=kind) == []
    # Backward fields are not held to the sequence when the problem has no backward.
    assert invalid_reasons(_with(bwd_block_q=1024), PROBLEM.replace(backward=False)) == []


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs: rejected with the argument named, before anything is compiled.

def _arrays(batch=1, q_len=8, kv_len=8, heads=2, kv_heads=2, head_dim=16, dtype=jnp.float32):
    q = jnp.ones((batch, q_len, heads, head_dim), dtype)
    k = jnp.ones((batch, kv_len, kv_heads, head_dim), dtype)
    return q, k, k


def _call(q, k, v, **kwargs):
    return lambda: flash_attention(q, k, v, interpret=True, **kwargs)


_q, _k, _v = _arrays()
BAD_INPUTS = [
    ("batch", _call(_q, *_arrays(batch=2)[1:]), ValueError, "batch"),
    ("head_dim", _call(_q, *_arrays(head_dim=8)[1:]), ValueError, "head_dim"),
    ("kv_heads", _call(_arrays(heads=3)[0], _k, _v), ValueError, "kv_heads must divide heads"),
    ("k_vs_v", _call(_q, _k, _arrays(kv_len=9)[2]), ValueError, "k and v"),
    ("rank", _call(_q[0], _k, _v), ValueError, "q must have 4 dimensions"),
    ("int_dtype", _call(_q.astype(jnp.int32), _k, _v), TypeError, "q must be a floating"),
    ("mixed_dtype", _call(_q, _k.astype(jnp.bfloat16), _v), TypeError, "share one dtype"),
    ("not_array", _call([[1.0]], _k, _v), TypeError, "q must be an array"),
    ("ids_shape", _call(_q, _k, _v, segment_ids=jnp.zeros((1, 9), jnp.int32)), ValueError, "segment_ids"),
    ("ids_dtype", _call(_q, _k, _v, segment_ids=jnp.zeros((1, 8), jnp.float32)), TypeError, "segment_ids"),
    ("ids_pair", _call(_q, _k, _v, segment_ids=(jnp.zeros((1, 8), jnp.int32),)), ValueError, "segment_ids"),
    ("ids_single_ragged", _call(_q, *_arrays(kv_len=9)[1:], segment_ids=jnp.zeros((1, 8), jnp.int32)),
     ValueError, "segment_ids"),
    ("empty", _call(*_arrays(q_len=0)), ValueError, "empty"),
    ("sm_scale", _call(_q, _k, _v, sm_scale=float("nan")), ValueError, "sm_scale"),
    ("config_type", _call(_q, _k, _v, config=Config.default(PROBLEM).to_dict()), TypeError, "config"),
    ("config_invalid", _call(_q, _k, _v, config=_with(block_q=24)), ValueError, "config.*block_q=24"),
    ("config_too_big", _call(_q, _k, _v, config=_with(block_q=64)), ValueError, "config.*q_len"),
    ("causal_type", _call(_q, _k, _v, causal="yes"), TypeError, "causal must be a bool"),
    ("device_kind_type", _call(_q, _k, _v, device_kind=3), TypeError, "device_kind"),
]


@pytest.mark.parametrize("make_call,error,pattern", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs(make_call, error, pattern):
    with pytest.raises(error, match=pattern):
        make_call()


# ---------------------------------------------------------------------------------------------------------------
# Flags: numpy bools, jax_enable_x64, and the device kind of a compile target.

def test_causal_numpy_bool_and_x64():
    """causal as a numpy bool, under jax_enable_x64 (Python ints are int64 there: the kernels' indices stay int32)."""
    q, k, v, cot, _, _ = make_case(7, 1, 40, 40, 2, 1, 24, "float32", segments=False)
    with jax.enable_x64(True):
        out, vjp = jax.vjp(lambda *a: flash_attention(*a, causal=np.bool_(True), config=SMALL, interpret=True),
                           q, k, v)
        grads = vjp(cot)
    ref_out, ref_grads = reference_with_grads(lambda *a: attention_reference(*a, causal=True), q, k, v, cot)
    assert_close(out, ref_out, "float32", grad=False, what="output")
    for name, g, ref_g in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(g, ref_g, "float32", grad=True, what=name)


def test_device_kind_is_what_the_shared_memory_check_uses():
    """A config that fits Hopper's shared memory but not a T4's is refused when compiling for a T4."""
    q = jnp.ones((1, 128, 1, 128), jnp.float32)
    config = Config(block_q=128, block_k=64, num_warps=8, num_stages=2,
                    bwd_block_q=32, bwd_block_k=32, bwd_num_warps=8, bwd_num_stages=2)
    assert invalid_reasons(config, Problem(1, 128, 128, 1, 1, 128), device_kind="NVIDIA H100 80GB HBM3") == []
    with pytest.raises(ValueError, match="shared memory"):
        flash_attention(q, q, q, config=config, interpret=True, device_kind="Tesla T4")
