"""Random inputs for a problem: what candidates are checked and timed on.

Fresh normal values, never zeros. Segment ids pack `documents` documents of random lengths, so boundaries fall
anywhere relative to the blocks; for checking, `unseen_rows=True` also gives some query rows an id that no key
has, the rows that must come back as zeros.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kernels import Problem


def random_qkv(problem: Problem, seed: int):
    """(q, k, v) in the problem's layout and dtype, standard normal."""
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    dtype = jnp.dtype(problem.dtype)
    q = jax.random.normal(kq, (problem.batch, problem.q_len, problem.heads, problem.head_dim), jnp.float32)
    k = jax.random.normal(kk, (problem.batch, problem.kv_len, problem.kv_heads, problem.head_dim), jnp.float32)
    v = jax.random.normal(kv, (problem.batch, problem.kv_len, problem.kv_heads, problem.head_dim), jnp.float32)
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def random_lengths(problem: Problem, seed: int, *, edge_rows: bool = False):
    """(q_lengths, kv_lengths) int32 [batch] for a problem with lengths, else (None, None). Lengths are drawn from
    half the sequence to all of it (a padded batch); with `edge_rows` (for checking) the first row is cut at an odd
    place and, with batch > 1, the last row keeps everything and another row has no keys at all."""
    if not problem.lengths:
        return None, None
    rng = np.random.default_rng(seed + 7)
    q_lengths = rng.integers(max(1, problem.q_len // 2), problem.q_len + 1, size=problem.batch)
    kv_lengths = rng.integers(max(1, problem.kv_len // 2), problem.kv_len + 1, size=problem.batch)
    if edge_rows:
        q_lengths[0] = rng.integers(1, problem.q_len + 1)
        kv_lengths[0] = rng.integers(1, problem.kv_len + 1)
        if problem.batch > 1:
            q_lengths[-1], kv_lengths[-1] = problem.q_len, problem.kv_len
        if problem.batch > 2:
            kv_lengths[1] = 0
    return jnp.asarray(q_lengths, jnp.int32), jnp.asarray(kv_lengths, jnp.int32)


def packed_ids(batch: int, length: int, documents: int, rng: np.random.Generator) -> np.ndarray:
    """[batch, length] int32 ids of `documents` consecutive documents with random lengths (each at least 1)."""
    documents = max(1, min(documents, length))
    ids = np.empty((batch, length), np.int32)
    for b in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, length), size=documents - 1, replace=False)) if documents > 1 else []
        ids[b] = np.searchsorted(np.asarray(cuts), np.arange(length), side="right")
    return ids


def random_segment_ids(problem: Problem, documents: int, seed: int, *, unseen_rows: bool = False):
    """Segment ids for the problem, or None when it has none.

    One shared array when q_len == kv_len and no unseen rows are asked for; else a (q_ids, kv_ids) pair whose
    q ids end in a document that no key belongs to.
    """
    if not problem.segments:
        return None
    rng = np.random.default_rng(seed)
    documents = max(documents, 2)
    q_ids = packed_ids(problem.batch, problem.q_len, documents, rng)
    if problem.q_len == problem.kv_len and not unseen_rows:
        return jnp.asarray(q_ids)
    kv_ids = q_ids.copy() if problem.q_len == problem.kv_len else packed_ids(problem.batch, problem.kv_len, documents, rng)
    if unseen_rows:
        tail = max(1, problem.q_len // 7)
        q_ids[:, -tail:] = documents + 1  # an id no key has
    return jnp.asarray(q_ids), jnp.asarray(kv_ids)
