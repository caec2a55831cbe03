"""`autotune.flash_attention`: the kernel called with the config the lookup found, forward and backward.

The forward runs the config of its key; the backward kernels (under `jax.grad`) the backward fields of the key tuned
with `--backward` when there is one. The output passes through an identity with its own backward rule, so that
when `jax.grad` traces the backward of a call, the call can say so: the verbose log's backward line, the backward
key's miss counted, and one warning when the forward is tuned but the backward is not (nothing else would tell).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import jax

from autotune.device import DeviceInfo, device_of
from db import KERNEL_IMPLEMENTATION as KERNEL
from autotune.keys import make_key
from autotune.kernel_protocol import kernel_for_platform, load_kernel
from autotune.measure.kernel_call import feature_kwargs
from autotune.problem_fields import describe
from autotune.runtime import notices
from autotune.runtime.lookup import Lookup, count_miss, current_settings, find, peek_tuned, tune_command, use
from autotune.runtime.predicted import predicted_warning
from db import TuningKey
from kernels.entry import prepare


def _backward_fields(kernel: ModuleType) -> tuple[str, ...]:
    return tuple(name for name in kernel.Config.__dataclass_fields__ if name.startswith("bwd_"))


def flash_attention(q, k, v, *, causal: bool = False, segment_ids=None, sm_scale: float | None = None,
                    window=None, softcap: float | None = None, q_lengths=None, kv_lengths=None,
                    return_lse: bool = False, kernel: str | None = None, device: DeviceInfo | None = None):
    """Flash attention with the tuned config for these shapes on this device (see `kernels` for the semantics).

    Layout q [batch, q_len, heads, head_dim], k and v [batch, kv_len, kv_heads, head_dim]. The forward uses the
    config tuned for the forward; the backward kernels (under `jax.grad`) use the backward config of the key
    tuned with `--backward` when there is one (when there is none but the forward is tuned, the backward warns once,
    naming the command). `kernel` picks one ('gpu', 'tpu' or a module path; default: the
    platform's); `device` is the device compiled for when q does not say it (a mesh's devices inside `shard_map`,
    a deviceless compile target): its kind then also goes to the kernel. `window` ((left, right) or one int),
    `softcap`, `q_lengths`/`kv_lengths` ([batch] ints) and `return_lse` are the kernels' own (see `kernels`); each
    is part of the tuning key (the lengths as "given or not").
    """
    problem = prepare(q, k, v, causal=causal, segment_ids=segment_ids, sm_scale=sm_scale, window=window,
                      softcap=softcap, q_lengths=q_lengths, kv_lengths=kv_lengths, return_lse=return_lse).problem
    target = device
    device = device or device_of(q)
    kernel_name = kernel or kernel_for_platform(device.platform)
    kernel = load_kernel(kernel_name)
    backward = peek_tuned(problem.replace(backward=True), kernel_name, device)
    forward = find(problem, kernel_name, device)
    if backward is not None and forward.source != "tuned" and (backward.source == "tuned"
                                                               or forward.source != "predicted"):
        # the --backward key's config (measured, else predicted) runs both: the forward key is not a miss
        forward = _from_backward(backward, forward.key)
        config = backward.config
    else:
        forward = use(problem, kernel_name, device)
        config = forward.config
        if backward is not None:  # both tuned: forward fields from the forward's key, backward fields from its own
            fields = _backward_fields(kernel)
            config = kernel.Config.from_dict(
                {**config.to_dict(), **{name: getattr(backward.config, name) for name in fields}})
    settings = current_settings()
    if settings.logs():
        detail = forward.detail
        if forward.implementation != KERNEL:  # the key's winner is a baseline, but this call runs the kernel
            detail += "; this call runs the kernel (flash_attention, or implementation='pallas')"
        _log(kernel, "forward", forward.key, config, forward.source, detail)
    note = _backward_note(kernel, problem, kernel_name, device, config, forward, backward, settings)
    extra = {"device_kind": device.device_kind} if target is not None and not device.interpret else {}
    extra.update(feature_kwargs(problem, q_lengths, kv_lengths))
    if return_lse:
        extra["return_lse"] = True
    out = kernel.flash_attention(q, k, v, causal=causal, segment_ids=segment_ids, sm_scale=sm_scale,
                                 config=config, interpret=device.interpret, **extra)
    if return_lse:
        return _when_differentiated(note, out[0]), out[1]
    return _when_differentiated(note, out)


def stored_winner(q, k, v, *, causal: bool, sm_scale: float | None, window, softcap: float | None, q_lengths,
                  kv_lengths, device: DeviceInfo | None = None) -> str:
    """Which implementation `dot_product_attention(implementation=None)` runs for this call: jax.nn's 'xla' or
    'cudnn' where that won the final re-timing of the call's key (or, with the forward key untuned, of its
    --backward key) and can run it here; else 'pallas', the tuned kernel (`flash_attention`). A baseline run counts
    no miss (nothing is missing) and prints its verbose line here; the kernel's own call prints the kernel's."""
    problem = prepare(q, k, v, causal=causal, sm_scale=sm_scale, window=window, softcap=softcap,
                      q_lengths=q_lengths, kv_lengths=kv_lengths).problem
    device = device or device_of(q)
    kernel_name = kernel_for_platform(device.platform)
    found = find(problem, kernel_name, device)
    if found.source != "tuned":
        found = peek_tuned(problem.replace(backward=True), kernel_name, device) or found
    if found.source not in ("tuned", "predicted") or found.implementation == KERNEL:
        return KERNEL
    if current_settings().logs():
        notices.log_choice("forward", describe(found.key), found.key.kernel, found.key.device_kind,
                           {"implementation": found.implementation}, found.source, found.detail)
    return found.implementation


def _from_backward(backward: Lookup, forward_key: TuningKey) -> Lookup:
    """The forward's lookup when the --backward key's config runs both directions; a predicted one is said once
    (as `use` says it for a forward key) and counted as the backward key's miss, so `search --misses` measures it."""
    if backward.source == "tuned":
        return Lookup(backward.config, "tuned", forward_key, "the forward fields of the key tuned with --backward")
    settings = current_settings()
    count_miss(settings.url(), backward.key)
    notices.warn_once(("predicted", settings.url(), backward.key),
                      predicted_warning(backward.detail, tune_command(backward.key, settings.url())))
    return Lookup(backward.config, "predicted", forward_key,
                  f"the forward fields of the --backward key's predicted best ({backward.detail})",
                  prediction=backward.prediction)


def _log(kernel: ModuleType, direction: str, key: TuningKey, config, source: str, detail: str) -> None:
    """The verbose log's line for one direction: the forward's fields, or the backward's (bwd_*)."""
    backward = set(_backward_fields(kernel))
    shown = {name: value for name, value in config.to_dict().items()
             if (name in backward) == (direction == "backward") or not backward}
    notices.log_choice(direction, describe(key), key.kernel, key.device_kind, shown, source, detail)


@dataclass(frozen=True)
class _BackwardNote:
    """What the backward of one kernel call says when `jax.grad` traces it: the backward key, the config and where
    its backward fields came from, and whether to warn (the forward is tuned, the backward is not)."""

    kernel_name: str
    key: TuningKey
    config: Any
    source: str
    detail: str
    url: str
    logs: bool
    warn: bool


def _backward_note(kernel, problem, kernel_name, device, config, forward, backward, settings) -> _BackwardNote:
    key = make_key(kernel, problem.replace(backward=True), device)
    if backward is not None:
        source, detail = backward.source, "" if backward.source == "tuned" else backward.detail
    else:
        source = "heuristic"
        detail = (f"no backward tuned for this problem: the default backward blocks"
                  f"{'' if forward.source == 'heuristic' else ' beside the ' + forward.source + ' forward'}")
    return _BackwardNote(kernel_name, key, config, source, detail, settings.url(), settings.logs(),
                         warn=backward is None and forward.source == "tuned")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _when_differentiated(note: _BackwardNote, out):
    """The output unchanged; when `jax.grad` traces the backward of the call, `_on_backward` speaks for it."""
    return out


def _identity_forward(note: _BackwardNote, out):
    return out, None


def _identity_backward(note: _BackwardNote, _residual, cotangent):
    _on_backward(note)
    return (cotangent,)


_when_differentiated.defvjp(_identity_forward, _identity_backward)


def _on_backward(note: _BackwardNote) -> None:
    """The backward of a kernel call is being traced: log it, and where its key is untuned, count the miss (once)
    and, when the forward is tuned (so nothing else said so), warn once with the command that tunes it."""
    if note.logs:
        _log(load_kernel(note.kernel_name), "backward", note.key, note.config, note.source, note.detail)
    if note.source == "tuned":
        return
    count_miss(note.url, note.key)
    if note.source == "predicted":
        notices.warn_once(("predicted", note.url, note.key),
                          predicted_warning(note.detail, tune_command(note.key, note.url)))
    elif note.warn:
        notices.warn_once(("backward", note.url, note.key),
                          f"the forward of {describe(note.key)} is tuned but its backward is not: jax.grad runs "
                          f"the default backward blocks. Tune it with: {tune_command(note.key, note.url)}")
