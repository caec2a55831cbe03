"""A candidate: one kernel config for one problem, built into a compiled function.

The search compiles candidates ahead of time (`lower(...).compile()`), so compile seconds are measured apart from
run time, and every later call runs the same executable. Segment ids always travel as a (q_ids, kv_ids) pair so
that the checking inputs (which need rows that see no key) and the timing inputs share one executable. Every
candidate takes (q, k, v, q_ids, kv_ids, q_lengths, kv_lengths), the last four None where the problem has none.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable

import jax
import jax.numpy as jnp

from kernels import Problem


def jitted_call(forward: Callable, problem: Problem) -> Callable:
    """`forward(q, k, v, q_ids, kv_ids, q_lengths, kv_lengths)` jitted with the candidates' signature: forward
    alone, or forward plus backward returning (out, dq, dk, dv) for a cotangent `d_out`. Kernels and baselines all
    go through here."""
    if not problem.backward:
        return jax.jit(forward)

    def forward_backward(q, k, v, q_ids, kv_ids, q_lengths, kv_lengths, d_out):
        out, vjp = jax.vjp(lambda q_, k_, v_: forward(q_, k_, v_, q_ids, kv_ids, q_lengths, kv_lengths), q, k, v)
        return (out, *vjp(d_out))

    return jax.jit(forward_backward)


def feature_kwargs(problem: Problem, q_lengths=None, kv_lengths=None) -> dict[str, Any]:
    """The keywords a kernel gets for the problem's window, soft cap and lengths: none for a plain problem, so a
    kernel without these features (a user's own) is called exactly as before."""
    kwargs: dict[str, Any] = {}
    if problem.window is not None:
        kwargs["window"] = problem.window
    if problem.softcap is not None:
        kwargs["softcap"] = problem.softcap
    if problem.lengths:
        kwargs["q_lengths"], kwargs["kv_lengths"] = q_lengths, kv_lengths
    return kwargs


def make_function(kernel: ModuleType, config: Any, problem: Problem, *, interpret: bool) -> Callable:
    """The jitted function a candidate is: forward, or forward plus backward (returning out, dq, dk, dv)."""

    def forward(q, k, v, q_ids, kv_ids, q_lengths, kv_lengths):
        segment_ids = None if q_ids is None else (q_ids, kv_ids)
        return kernel.flash_attention(
            q, k, v, causal=problem.causal, segment_ids=segment_ids, config=config, interpret=interpret,
            **feature_kwargs(problem, q_lengths, kv_lengths),
        )

    return jitted_call(forward, problem)


def abstract_args(problem: Problem) -> tuple:
    """Shape-and-dtype stand-ins for the candidate's arguments, to compile before any input exists."""
    dtype = jnp.dtype(problem.dtype)
    q = jax.ShapeDtypeStruct((problem.batch, problem.q_len, problem.heads, problem.head_dim), dtype)
    kv = jax.ShapeDtypeStruct((problem.batch, problem.kv_len, problem.kv_heads, problem.head_dim), dtype)
    ids = (
        (jax.ShapeDtypeStruct((problem.batch, problem.q_len), jnp.int32),
         jax.ShapeDtypeStruct((problem.batch, problem.kv_len), jnp.int32))
        if problem.segments else (None, None)
    )
    lengths = ((jax.ShapeDtypeStruct((problem.batch,), jnp.int32),) * 2 if problem.lengths else (None, None))
    args = (q, kv, kv, *ids, *lengths)
    return args + (q,) if problem.backward else args


@dataclass
class Compiled:
    """A compiled candidate and what compiling it cost."""

    call: Callable
    compile_s: float


def compile_candidate(kernel: ModuleType, config: Any, problem: Problem, *, interpret: bool) -> Compiled:
    """Trace, lower and compile the candidate; raises whatever the compiler raises."""
    start = time.perf_counter()
    executable = make_function(kernel, config, problem, interpret=interpret).lower(*abstract_args(problem)).compile()
    return Compiled(executable, time.perf_counter() - start)
