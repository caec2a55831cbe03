"""The GPU kernel's sliding windows, soft-capping, run-time lengths and log-sum-exp, in interpret mode on the CPU.

Every case checks the forward and the gradients of a random-weighted sum against `attention_reference` with fresh
random inputs; the cases combine the features with causal, segment ids, GQA, odd lengths and a head_dim that is
not a power of two, on the Hopper path (one loop over key blocks) and the split-loop path (an A100's). Which
blocks the kernels visit is checked as pure functions in tests/kernels/test_masking.py.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import Problem, attention_reference
from kernels.gpu import Config, flash_attention, invalid_reasons, search_space
from tests.kernels.test_gpu_kernel import assert_close

# Several q and kv blocks per sequence, ragged tails, different forward and backward tiles.
SMALL = Config(block_q=16, block_k=32, num_warps=2, num_stages=1,
               bwd_block_q=32, bwd_block_k=16, bwd_num_warps=2, bwd_num_stages=1)
A100 = "NVIDIA A100-SXM4-80GB"  # split loops (plain and masked key blocks apart)


def normal(rng, *shape, dtype=jnp.float32):
    return jnp.asarray(rng.standard_normal(shape, dtype=np.float32)).astype(dtype)


def make(seed, batch=2, q_len=100, kv_len=83, heads=4, kv_heads=2, head_dim=24, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return rng, (normal(rng, batch, q_len, heads, head_dim, dtype=dtype),
                 normal(rng, batch, kv_len, kv_heads, head_dim, dtype=dtype),
                 normal(rng, batch, kv_len, kv_heads, head_dim, dtype=dtype),
                 normal(rng, batch, q_len, heads, head_dim, dtype=dtype))


def check(q, k, v, cot, *, config=SMALL, device_kind=None, lengths=(), **options):
    """Kernel and reference agree on the output and on the q, k, v gradients of sum(out * cot), all in one jit
    with the lengths (if any) as traced arguments. Returns the kernel's (out, dq, dk, dv)."""
    def both(q, k, v, cot, *lens):
        extra = dict(zip(("q_lengths", "kv_lengths"), lens)) if lens else {}
        extra = {name: value for name, value in extra.items() if value is not None}

        def kernel(q, k, v):
            return flash_attention(q, k, v, config=config, interpret=True, device_kind=device_kind, **extra,
                                   **options)

        def reference(q, k, v):
            return attention_reference(q, k, v, **extra, **options)

        out, vjp = jax.vjp(kernel, q, k, v)
        ref, ref_vjp = jax.vjp(reference, q, k, v)
        return (out, *vjp(cot)), (ref, *ref_vjp(cot))

    got, want = jax.jit(both)(q, k, v, cot, *lengths)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert_close(a, b, q.dtype, grad=name != "out", what=f"{name} {sorted(options)}")
    return got


def test_two_sided_window_gqa_segments_odd_lengths():
    rng, (q, k, v, cot) = make(1, q_len=100, kv_len=83, head_dim=24)
    ids = (jnp.asarray(np.sort(rng.integers(0, 3, (2, 100)), axis=1), jnp.int32),
           jnp.asarray(np.sort(rng.integers(0, 3, (2, 83)), axis=1), jnp.int32))
    check(q, k, v, cot, window=(19, 6), segment_ids=ids)


def test_left_window_with_causal_and_softcap_bfloat16():
    _, (q, k, v, cot) = make(2, batch=1, q_len=96, kv_len=96, heads=2, kv_heads=1, head_dim=40,
                             dtype=jnp.bfloat16)
    check(q, k, v, cot, window=(23, None), causal=True, softcap=1.5, sm_scale=0.5)


def test_right_window_one_segment_array_split_loops():
    rng, (q, k, v, cot) = make(3, batch=1, q_len=90, kv_len=90, heads=2, kv_heads=2, head_dim=16)
    ids = jnp.asarray(np.sort(rng.integers(0, 2, (1, 90)), axis=1), jnp.int32)
    check(q, k, v, cot, window=(None, 21), segment_ids=ids, device_kind=A100)


def test_window_int_softcap_and_causal_split_loops():
    _, (q, k, v, cot) = make(4, q_len=77, kv_len=130, heads=2, kv_heads=1, head_dim=32)
    check(q, k, v, cot, window=37, causal=True, softcap=2.0, device_kind=A100)


def test_traced_lengths_with_window_and_softcap_zero_rows_and_gradients():
    rng, (q, k, v, cot) = make(5, q_len=100, kv_len=83)
    q_lengths = jnp.asarray([int(rng.integers(30, 70)), 0], jnp.int32)
    kv_lengths = jnp.asarray([int(rng.integers(20, 60)), 83], jnp.int32)
    out, dq, dk, dv = check(q, k, v, cot, window=(31, 12), softcap=3.0, lengths=(q_lengths, kv_lengths))
    ql, kl = int(q_lengths[0]), int(kv_lengths[0])
    assert not np.any(np.asarray(out[0, ql:])) and not np.any(np.asarray(out[1]))
    assert not np.any(np.asarray(dq[0, ql:])) and not np.any(np.asarray(dq[1]))
    assert not np.any(np.asarray(dk[0, kl:])) and not np.any(np.asarray(dv[0, kl:]))
    assert not np.any(np.asarray(dk[1])), "no query row of batch row 1 is live: no key gradient"


def test_kv_lengths_only_split_loops_and_causal():
    rng, (q, k, v, cot) = make(6, batch=2, q_len=64, kv_len=96, heads=2, kv_heads=2, head_dim=16)
    kv_lengths = jnp.asarray(rng.integers(1, 96, 2), jnp.int32)
    check(q, k, v, cot, causal=True, device_kind=A100, lengths=(None, kv_lengths))


def test_return_lse_matches_reference_and_has_no_gradient():
    rng, (q, k, v, _) = make(7, q_len=70, kv_len=83)
    q_lengths = jnp.asarray([55, 70], jnp.int32)
    options = dict(window=(5, 0), softcap=4.0, q_lengths=q_lengths)
    out, lse = flash_attention(q, k, v, config=SMALL, interpret=True, return_lse=True, **options)
    ref, ref_lse = attention_reference(q, k, v, return_lse=True, **options)
    assert lse.shape == (2, 70, 4) and lse.dtype == jnp.float32
    assert_close(out, ref, q.dtype, grad=False, what="out")
    empty = np.isneginf(np.asarray(ref_lse))
    assert empty.any() and np.array_equal(np.isneginf(np.asarray(lse)), empty), "-inf exactly for rows seeing none"
    assert_close(jnp.where(empty, 0.0, lse), jnp.where(empty, 0.0, ref_lse), q.dtype, grad=False, what="lse")
    grad = jax.grad(lambda q: jnp.sum(jnp.where(empty, 0.0, flash_attention(
        q, k, v, config=SMALL, interpret=True, return_lse=True, **options)[1])))(q)
    assert not np.any(np.asarray(grad)), "lse is returned under stop_gradient"


@pytest.mark.parametrize("kwargs, error, needle", [
    (dict(window=-1), ValueError, "window"),
    (dict(window=(1, 2, 3)), ValueError, "window"),
    (dict(window=1.5), ValueError, "window"),
    (dict(softcap=0.0), ValueError, "softcap"),
    (dict(softcap="30"), ValueError, "softcap"),
    (dict(q_lengths=np.array([3, 4, 5])), ValueError, "q_lengths"),
    (dict(kv_lengths=np.array([1.0, 2.0])), ValueError, "kv_lengths"),
    (dict(kv_lengths=np.array([1, 99])), ValueError, "kv_lengths"),
    (dict(return_lse="yes"), TypeError, "return_lse"),
])
def test_bad_feature_arguments_are_named(kwargs, error, needle):
    q = jnp.ones((2, 16, 2, 16), jnp.float32)
    with pytest.raises(error, match=needle):
        flash_attention(q, q, q, interpret=True, **kwargs)


def test_window_shrinks_default_and_search_space_plain_problems_unchanged():
    plain = Problem(batch=1, q_len=4096, kv_len=4096, heads=8, kv_heads=8, head_dim=128, dtype="bfloat16",
                    causal=True, backward=True)
    narrow = plain.replace(window_left=127)  # causal: each row sees 128 keys
    wide = plain.replace(window_left=4000)
    two_sided = plain.replace(causal=False, window_left=16, window_right=16)
    one_sided = plain.replace(causal=False, window_left=None, window_right=64)  # unbounded on the left
    kind = "NVIDIA H100 80GB HBM3"
    base = Config.default(plain, device_kind=kind)
    for problem in (wide, one_sided):
        assert Config.default(problem, device_kind=kind) == base
        assert search_space(problem) == search_space(plain)
    for problem, top in ((narrow, 128), (two_sided, 32)):
        config = Config.default(problem, device_kind=kind)
        space = search_space(problem)
        assert invalid_reasons(config, problem, device_kind=kind) == []
        assert config.block_q <= top // 2 or config.block_q == 32
        assert config.block_k <= max(32, top // 2) and config.bwd_block_k <= max(32, top // 2)
        for name in ("block_q", "block_k", "bwd_block_q", "bwd_block_k"):
            assert max(space[name]) == top and set(space[name]) <= set(search_space(plain)[name])
        assert 256 not in space["block_k"] and 256 in search_space(plain)["block_k"]


def test_real_compilers_accept_window_lengths_softcap_forward_and_backward():
    """XLA:GPU + Triton + ptxas compile the forward and both backward kernels with every feature on (deviceless,
    for an H100 and an A100: one loop and split loops)."""
    from autotune.compile.pool import INSTALL_HINT, CompileJob, compile_many, compilers_missing

    missing = compilers_missing("gpu")
    if missing:
        pytest.skip(f"no GPU compiler here: {missing} (enable with {INSTALL_HINT})")
    problem = Problem(batch=2, q_len=200, kv_len=328, heads=4, kv_heads=2, head_dim=72, dtype="bfloat16",
                      causal=True, segments=True, backward=True, window_left=100, softcap=30.0, lengths=True)
    jobs = [CompileJob(target, problem, Config.default(problem, device_kind=kind).to_dict())
            for target, kind in (("h100", "NVIDIA H100 80GB HBM3"), ("a100", A100))]
    for result in compile_many(jobs, processes=2, timeout_s=300):
        assert result.ok, f"{result.job.target}: {result.failure_kind} {result.message[:800]}"
        assert {k.role for k in result.kernels} == {"forward", "dq", "dkv"}, result.kernels
        for k in result.kernels:
            assert 0 < k.memory_bytes and 0 < k.registers <= 255, k
