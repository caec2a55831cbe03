"""The correctness gate: a candidate must match the einsum reference on fresh random inputs before it is timed.

Long problems are compared on a slice (the first batch row, the query heads of the first kv head), with the
reference computed in chunks of query rows under `jax.checkpoint`, so neither the forward nor the gradient ever
holds a [q_len, kv_len] score matrix larger than one chunk.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from autotune.measure.inputs import random_lengths, random_qkv, random_segment_ids
from kernels import Problem, attention_reference, tolerance

FULL_CHECK_ELEMENTS = 1 << 22  # batch*heads*q_len*kv_len below which everything is compared
CHUNK_ROWS = 1024


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    max_error: float
    message: str = ""


def chunked_reference(q, k, v, q_ids, kv_ids, *, causal: bool, window=None, softcap=None, q_lengths=None,
                      kv_lengths=None):
    """The reference, computed over chunks of query rows so its memory stays bounded (gradients too)."""
    outs = []
    for start in range(0, q.shape[1], CHUNK_ROWS):
        stop = min(start + CHUNK_ROWS, q.shape[1])
        ids = None if q_ids is None else (q_ids[:, start:stop], kv_ids)

        def chunk(q_, k_, v_, ids=ids, start=start):
            return attention_reference(q_, k_, v_, causal=causal, segment_ids=ids, q_offset=start, window=window,
                                       softcap=softcap, q_lengths=q_lengths, kv_lengths=kv_lengths)

        outs.append(jax.checkpoint(chunk)(q[:, start:stop], k, v))
    return jnp.concatenate(outs, axis=1)


def _slice(problem: Problem) -> tuple[slice, slice, slice]:
    """(batch, query heads, kv heads) slices to compare: all of it when small, else one batch row and one group."""
    if problem.batch * problem.heads * problem.q_len * problem.kv_len <= FULL_CHECK_ELEMENTS:
        return slice(None), slice(None), slice(None)
    return slice(0, 1), slice(0, problem.groups), slice(0, 1)


def _compare(name: str, got, want, atol: float, rtol: float) -> tuple[bool, float, str]:
    got = np.asarray(got, np.float32)
    want = np.asarray(want, np.float32)
    if not np.all(np.isfinite(got)):
        return False, float("inf"), f"{name} has NaN or infinity"
    err = np.abs(got - want)
    worst = float(err.max()) if err.size else 0.0
    if np.any(err > atol + rtol * np.abs(want)):
        return False, worst, f"{name} differs from the reference by up to {worst:.3g} (atol {atol}, rtol {rtol})"
    return True, worst, ""


def check_candidate(call: Callable, problem: Problem, *, seed: int, documents: int = 3) -> CheckResult:
    """Run the compiled candidate on fresh inputs and compare with the reference (gradients too if backward)."""
    q, k, v = random_qkv(problem, seed)
    ids = random_segment_ids(problem, documents, seed, unseen_rows=True)
    q_ids, kv_ids = ids if ids is not None else (None, None)
    q_lengths, kv_lengths = random_lengths(problem, seed, edge_rows=True)
    args = [q, k, v, q_ids, kv_ids, q_lengths, kv_lengths]
    if problem.backward:
        d_out = jax.random.normal(jax.random.key(seed + 1), q.shape, jnp.float32).astype(q.dtype)
        args.append(d_out)
    results = call(*args)
    results = results if problem.backward else (results,)

    b, hq, hk = _slice(problem)
    qs, ks, vs = q[b, :, hq], k[b, :, hk], v[b, :, hk]
    qi = None if q_ids is None else q_ids[b]
    ki = None if kv_ids is None else kv_ids[b]
    features = dict(causal=problem.causal, window=problem.window, softcap=problem.softcap,
                    q_lengths=None if q_lengths is None else q_lengths[b],
                    kv_lengths=None if kv_lengths is None else kv_lengths[b])
    if problem.backward:
        want_out, vjp = jax.vjp(lambda q_, k_, v_: chunked_reference(q_, k_, v_, qi, ki, **features), qs, ks, vs)
        dq, dk, dv = vjp(args[-1][b, :, hq])
        # kv head 0 gets gradient only from query heads 0..groups-1, exactly the slice's heads.
        wants = {"out": want_out, "dq": dq, "dk": dk, "dv": dv}
        gots = {"out": results[0][b, :, hq], "dq": results[1][b, :, hq],
                "dk": results[2][b, :, hk], "dv": results[3][b, :, hk]}
    else:
        wants = {"out": chunked_reference(qs, ks, vs, qi, ki, **features)}
        gots = {"out": results[0][b, :, hq]}

    worst = 0.0
    for name, want in wants.items():
        atol, rtol = tolerance(problem.dtype, grad=name != "out")
        ok, err, message = _compare(name, gots[name], want, atol, rtol)
        worst = max(worst, err)
        if not ok:
            return CheckResult(False, worst, message)
    return CheckResult(True, worst)
