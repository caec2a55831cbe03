"""kernels.masking and the block ranges both kernels derive from it, checked as pure functions against the
reference's mask: every block a row needs is visited, no other is (the work falls with the window and the
lengths), and the GPU's unmasked blocks hold only visible pairs. One short interpret-mode run shows that the GPU
kernel reads nothing outside its ranges.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from kernels import attention_reference
from kernels.gpu import Config
from kernels.gpu import flash_attention as gpu_attention
from kernels.gpu.common import Masking, edge_block, kv_ranges, q_ranges
from kernels.masking import Band, visible
from kernels.problem import Problem
from kernels.reference import attention_mask
from kernels.tpu.common import Static, kv_blocks, kv_steps, q_blocks

CASES = {  # name: (causal, window)
    "full": (False, None),
    "causal": (True, None),
    "window": (False, (40, 8)),
    "sliding": (True, (64, None)),
    "right_only": (False, (None, 21)),
    "causal_with_right": (True, (5, 9)),
}


def mask_of(q_len, kv_len, causal, window, q_length=None, kv_length=None) -> np.ndarray:
    lengths = {}
    if q_length is not None:
        lengths = dict(q_lengths=jnp.asarray([q_length]), kv_lengths=jnp.asarray([kv_length]))
    return np.asarray(attention_mask(q_len, kv_len, causal=causal, window=window, **lengths))[0, 0]


def tiles(mask: np.ndarray, block_q: int, block_k: int, *, keys_past_the_end: bool = False):
    """Per (q block, key block) tile: whether it holds a visible pair, and whether every pair in it is visible.
    Rows past the end count as visible there (the kernels never store them) and so do keys past the end with
    `keys_past_the_end` (the dk/dv kernel needs no mask for them: it never stores their rows either)."""
    q_len, kv_len = mask.shape
    rows, cols = -(-q_len // block_q) * block_q, -(-kv_len // block_k) * block_k

    def grid(rows_fill: bool, keys_fill: bool) -> np.ndarray:
        padded = np.full((rows, cols), keys_fill)
        padded[q_len:] = rows_fill
        padded[:q_len, :kv_len] = mask
        return padded.reshape(rows // block_q, block_q, cols // block_k, block_k)

    return grid(False, False).any(axis=(1, 3)), grid(True, keys_past_the_end).all(axis=(1, 3))


def blocks_of(ranges) -> tuple[list[int], list[int]]:
    """All blocks the ranges visit in order, and those visited without a mask."""
    every, plain = [], []
    for start, stop, masked in ranges:
        span = list(range(int(start), int(stop)))
        every += span
        plain += [] if masked else span
    return every, plain


@pytest.mark.parametrize("name", CASES)
def test_band_pairs_key_ranges_and_span_match_the_reference_mask(name):
    causal, window = CASES[name]
    rng = np.random.default_rng()
    q_len, kv_len = (int(x) for x in rng.integers(40, 200, 2))
    band = Band.of(causal=causal, window=window)
    mask = mask_of(q_len, kv_len, causal, window)
    assert band.pairs(q_len, kv_len) == mask.sum()
    assert Problem(1, q_len, kv_len, 1, 1, 8, causal=causal, window_left=(window or (None, None))[0],
                   window_right=(window or (None, None))[1]).flops() == 4 * 8 * mask.sum()
    first, last = band.key_range(np.arange(q_len), kv_len)
    for row in range(q_len):
        assert list(np.flatnonzero(mask[row])) == list(range(first[row] if np.ndim(first) else first,
                                                             (last[row] if np.ndim(last) else last) + 1))
    left, right = window or (None, None)
    right = 0 if causal else right
    assert band.span == (None if left is None or right is None else left + right + 1)
    rule = visible(np.arange(q_len)[:, None], np.arange(kv_len)[None, :], band)
    assert np.array_equal(np.broadcast_to(True if rule is None else rule, mask.shape), mask)


def needed_and_edge(every, needed, block_q: int, block_k: int) -> bool:
    """With sequence ends off the block grid: the visited blocks are contiguous and hold the needed ones, plus at
    most the few blocks that only rows or keys past the end (in the last, overhanging block) reach, which the
    kernels' loads and stores mask anyway; with none needed, at most one block."""
    every, needed = [int(x) for x in every], [int(x) for x in needed]
    if not needed:
        return len(every) <= 1
    contiguous = every == list(range(every[0], every[-1] + 1))
    slack = max(block_q, block_k) // min(block_q, block_k) + 1
    return contiguous and set(needed) <= set(every) and len(every) - len(needed) <= slack


@pytest.mark.parametrize("ragged", [False, True], ids=["on_the_grid", "ragged"])
@pytest.mark.parametrize("name", CASES)
def test_gpu_block_ranges_visit_exactly_the_needed_blocks(name, ragged):
    causal, window = CASES[name]
    rng = np.random.default_rng()
    q_len, kv_len = (int(x) for x in (rng.integers(300, 700, 2) if ragged else rng.integers(5, 11, 2) * 64))
    block_q, block_k = (int(x) for x in rng.choice([16, 32, 64], 2))
    masking = Masking(band=Band.of(causal=causal, window=window))
    mask = mask_of(q_len, kv_len, causal, window)
    any_pair, all_pairs = tiles(mask, block_q, block_k)
    def same(every, needed):
        return needed_and_edge(every, needed, block_q, block_k) if ragged else every == list(needed)

    for i in range(any_pair.shape[0]):
        every, plain = blocks_of(kv_ranges(i, block_q=block_q, block_k=block_k, kv_len=kv_len, masking=masking))
        assert same(every, np.flatnonzero(any_pair[i])), f"q block {i}: visits blocks no row needs, or misses some"
        assert all(all_pairs[i, j] for j in plain), f"q block {i}: an unmasked block hides pairs"
        ranges = kv_ranges(i, block_q=block_q, block_k=block_k, kv_len=kv_len, masking=masking)
        branch_plain = [j for j in every if not edge_block(np.int32(j), ranges)]  # the one loop's (Hopper) choice
        assert branch_plain == plain, f"q block {i}: the one loop masks other blocks than the split loops"
    _, all_pairs = tiles(mask, block_q, block_k, keys_past_the_end=True)
    for j in range(any_pair.shape[1]):
        every, plain = blocks_of(q_ranges(j, block_q=block_q, block_k=block_k, q_len=q_len, masking=masking))
        assert same(every, np.flatnonzero(any_pair[:, j])), f"key block {j}: visits the wrong q blocks"
        assert all(all_pairs[i, j] for i in plain), f"key block {j}: an unmasked block hides pairs"


def test_gpu_block_ranges_with_run_time_lengths_skip_what_lies_past_them():
    n, block = 1024, 32
    q_length, kv_length = jnp.int32(300), jnp.int32(100)
    masking = Masking(band=Band.of(causal=False, window=(40, 8)), lengths=True)
    any_pair, _ = tiles(mask_of(n, n, False, (40, 8), 300, 100), block, block)
    for i in range(n // block):
        every, _ = blocks_of(kv_ranges(i, block_q=block, block_k=block, kv_len=n, masking=masking,
                                       q_len_b=q_length, kv_len_b=kv_length))
        assert every == list(np.flatnonzero(any_pair[i]))
    for j in range(n // block):
        every, _ = blocks_of(q_ranges(j, block_q=block, block_k=block, q_len=n, masking=masking, q_len_b=q_length,
                                      kv_len_b=kv_length))
        assert every == list(np.flatnonzero(any_pair[:, j]))
    assert not any_pair[-1].any() and not any_pair[:, -1].any()


def test_the_work_falls_with_the_window():
    n, block = 4096, 64

    def visited(window):
        masking = Masking(band=Band.of(causal=False, window=window))
        return sum(len(blocks_of(kv_ranges(i, block_q=block, block_k=block, kv_len=n, masking=masking))[0])
                   for i in range(n // block))

    assert visited(None) == (n // block) ** 2
    assert visited((40, 8)) <= 3 * (n // block)  # 49 keys per row: at most 3 key blocks per q block


@pytest.mark.parametrize("name", CASES)
def test_tpu_block_ranges_cover_the_needed_blocks_and_little_more(name):
    causal, window = CASES[name]
    rng = np.random.default_rng()
    block_q, block_k = (int(x) for x in rng.choice([128, 256], 2))
    q_len, kv_len = (int(x) for x in rng.integers(3, 9, 2) * 128)
    q_pad, kv_pad = -(-q_len // block_q) * block_q, -(-kv_len // block_k) * block_k
    st = Static(band=Band.of(causal=causal, window=window), scale=0.1, q_len=q_len, kv_len=kv_len, groups=1,
                segments=False, highest=True, interpret=True)
    any_pair, _ = tiles(mask_of(q_len, kv_len, causal, window), block_q, block_k)
    n_q, n_kv = q_pad // block_q, kv_pad // block_k
    first, last = kv_blocks(st, np.arange(n_q) * block_q, block_q, block_k, n_kv)
    for i in range(n_q):  # a block no row needs is clamped to one fetch, whose chunks `chunk_needed` skips
        visited = list(range(int(np.broadcast_to(first, n_q)[i]), int(np.broadcast_to(last, n_q)[i]) + 1))
        needed = list(np.flatnonzero(any_pair[i]))
        assert needed_and_edge(visited, needed, block_q, block_k), f"q block {i}: {visited} for {needed}"
    assert any_pair.sum(axis=1).max() <= kv_steps(st, n_q, block_q, block_k, n_kv) <= any_pair.sum(axis=1).max() + 2
    first, last = q_blocks(st, np.arange(n_kv) * block_k, block_k, block_q, n_q)
    for j in range(n_kv):
        visited = list(range(int(np.broadcast_to(first, n_kv)[j]), int(np.broadcast_to(last, n_kv)[j]) + 1))
        needed = list(np.flatnonzero(any_pair[:, j]))
        assert needed_and_edge(visited, needed, block_q, block_k), f"key block {j}: {visited} for {needed}"


def test_gpu_kernel_reads_no_key_block_past_the_run_time_length():
    """One short run: values past the last visited key block are NaN, yet the output is finite and right."""
    rng = np.random.default_rng()
    n, block, kv_length = 256, 32, int(rng.integers(40, 90))
    q, k, v = (jnp.asarray(rng.standard_normal((1, n, 1, 16), np.float32)) for _ in range(3))
    poisoned = v.at[:, -(-kv_length // block) * block:].set(jnp.nan)
    config = Config(block_q=block, block_k=block, num_warps=4, num_stages=2, bwd_block_q=block, bwd_block_k=block,
                    bwd_num_warps=4, bwd_num_stages=2)
    lengths = dict(q_lengths=jnp.asarray([n], jnp.int32), kv_lengths=jnp.asarray([kv_length], jnp.int32))
    out = gpu_attention(q, k, poisoned, config=config, interpret=True, window=(40, 8), **lengths)
    want = attention_reference(q, k, v, window=(40, 8), **lengths)
    assert bool(jnp.all(jnp.isfinite(out)))
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=1e-4, rtol=1e-4)
