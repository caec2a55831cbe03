"""The one entry sequence of every attention call: check the arguments, describe the problem, resolve the rest.

Both kernels' `flash_attention` and the runtime start with `prepare`, so an argument is checked once, by one rule,
with one message naming it, before anything is looked up, traced or compiled; what it returns is everything a
kernel needs besides its config.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Any, Callable

import jax
import numpy as np

from kernels.masking import Band
from kernels.problem import Problem, check_inputs, check_lengths, full_lengths, resolve_scale


@dataclass(frozen=True)
class Prepared:
    """A checked call: the arrays, its Problem, the scale, the band of visible pairs and the device compiled for.
    Segment ids are int32 [batch, seq] arrays (or None); the lengths are both int32 [batch] arrays when either
    was given (the missing one: the whole sequence), else None."""

    q: Any
    k: Any
    v: Any
    q_ids: Any
    kv_ids: Any
    q_lengths: Any
    kv_lengths: Any
    problem: Problem
    scale: float
    band: Band
    device_kind: str | None
    interpret: bool
    return_lse: bool


def _check_flag(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def device_kind_for(platform: str | None, device_kind: str | None, interpret: bool) -> str | None:
    """The device a kernel is checked and compiled for: the caller's kind (a compile target or a mesh's device),
    else the default device's when it is of the kernel's `platform` and not in interpret mode, else None (the
    kernels' conservative reading)."""
    if device_kind is not None:
        if not isinstance(device_kind, str):
            raise TypeError(f"device_kind must be a str or None, got {type(device_kind).__name__}")
        return device_kind
    if interpret or platform is None:
        return None
    device = jax.devices()[0]
    return device.device_kind if device.platform == platform else None


def prepare(q, k, v, *, causal=False, segment_ids=None, sm_scale=None, window=None, softcap=None, q_lengths=None,
            kv_lengths=None, return_lse=False, interpret=False, device_kind: str | None = None,
            platform: str | None = None) -> Prepared:
    """Check one attention call's arguments (see the kernels' `flash_attention` for their meaning) and resolve
    them; `platform` ('gpu' or 'tpu': the kernel's) says whose default device kind to read when none is given."""
    interpret = _check_flag("interpret", interpret)
    return_lse = _check_flag("return_lse", return_lse)
    has_lengths = q_lengths is not None or kv_lengths is not None
    problem, q_ids, kv_ids = check_inputs(q, k, v, segment_ids, causal=causal, window=window, softcap=softcap,
                                          lengths=has_lengths)
    q_lengths = check_lengths(q_lengths, "q_lengths", problem.batch, problem.q_len)
    kv_lengths = check_lengths(kv_lengths, "kv_lengths", problem.batch, problem.kv_len)
    if has_lengths:
        q_lengths, kv_lengths = full_lengths(q_lengths, kv_lengths, problem)
    scale = resolve_scale(sm_scale, problem.head_dim)
    kind = device_kind_for(platform, device_kind, interpret)
    return Prepared(q=q, k=k, v=v, q_ids=q_ids, kv_ids=kv_ids, q_lengths=q_lengths, kv_lengths=kv_lengths,
                    problem=problem, scale=scale, band=problem.band, device_kind=kind, interpret=interpret,
                    return_lse=return_lse)


_UNCHECKED = contextvars.ContextVar("kernels_unchecked_configs", default=False)


@contextlib.contextmanager
def unchecked_configs():
    """Within it, `checked_config` takes any config of the kernel's type without judging it against the problem:
    for deviceless compiles of a target, where the real compiler is the judge (whether it refuses what the checks
    reject is what those compiles measure)."""
    token = _UNCHECKED.set(True)
    try:
        yield
    finally:
        _UNCHECKED.reset(token)


def configs_unchecked() -> bool:
    """Whether this call runs within `unchecked_configs` (kernels that judge a config again later, e.g. for their
    backward, skip that judgement too)."""
    return _UNCHECKED.get()


def checked_config(config, config_type: type, invalid_reasons: Callable, problem: Problem,
                   device_kind: str | None, type_name: str):
    """The config to run: the kernel's default for the problem when None, else the given one once it is of the
    kernel's type and valid for the problem on the device (else one error naming what is wrong; not judged within
    `unchecked_configs`)."""
    if config is None:
        return config_type.default(problem, device_kind=device_kind)
    if not isinstance(config, config_type):
        raise TypeError(f"config must be a {type_name} or None, got {type(config).__name__}")
    reasons = [] if _UNCHECKED.get() else invalid_reasons(config, problem, device_kind=device_kind)
    if reasons:
        raise ValueError(f"config cannot run this problem ({problem}): " + "; ".join(reasons)
                         + f" (config {config.to_dict()})")
    return config
