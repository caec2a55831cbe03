"""Tuned kernels at runtime: pick the stored best config for each problem when the function is traced.

The lookup happens once per key per process (results kept in memory behind a lock), at trace time, so a jitted
call costs what the kernel with a fixed config costs. On a miss the policy decides: `heuristic` (the default
config, one warning naming the command that would tune it), `nearest` (the best of the nearest tuned problem, if
valid here), `error`, or `tune` (a short search now). A missing, read-only or locked database never breaks
inference: the lookup falls back to the heuristic with one warning. Warnings point at the user's call (the
first frame outside this package), since that is the line the user can change.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import shlex
import sys
import threading
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Iterator


from autotune.measure.kernel_call import feature_kwargs
from autotune.device import DeviceInfo, current_device, device_of
from autotune.keys import make_key, shape_distance
from autotune.kernel_protocol import device_kind_of, kernel_for_platform, load_kernel
from autotune.settings import RUNTIME_BUSY_TIMEOUT_S, busy_timeout_s
from db import Store, TuningKey, default_url, resolve_url
from db.urls import display_url, scrub, sqlite_file
from kernels import Problem, canonical_dtype
from kernels.entry import prepare
from kernels.problem import check_window, window_fields

MISS_POLICIES = ("heuristic", "nearest", "error", "tune")
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


class TuningMissError(LookupError):
    """Raised under the `error` miss policy: no tuned config for the key."""


@dataclass(frozen=True)
class Settings:
    """Where to look and what to do on a miss; URL and policy are resolved once per settings object."""

    db: str | None = None
    on_miss: str | None = None

    @functools.cached_property
    def _resolved(self) -> tuple[str, str]:
        policy = self.on_miss or os.environ.get("AUTOTUNE_ON_MISS") or "heuristic"
        if policy not in MISS_POLICIES:
            raise ValueError(f"on_miss must be one of {MISS_POLICIES}, got {policy!r}")
        return (resolve_url(self.db) if self.db is not None else default_url()), policy

    def url(self) -> str:
        return self._resolved[0]

    def policy(self) -> str:
        return self._resolved[1]


@dataclass(frozen=True)
class Lookup:
    """The config a call will use and where it came from: 'tuned', 'nearest' or 'heuristic'."""

    config: Any
    source: str
    key: TuningKey
    detail: str = ""


_settings = Settings()
_override: contextvars.ContextVar[Settings | None] = contextvars.ContextVar("autotune_settings", default=None)
_lock = threading.RLock()
_cache: dict[tuple, Lookup] = {}
_fast: dict[tuple, Lookup] = {}  # lookup() by its raw arguments, to skip building the problem on a hit
_stores: dict[str, tuple[Store | None, str]] = {}  # url -> (store, why not)
_fallbacks: set[tuple] = set()  # (url, kernel, device, problem, reason) counted by record_fallback
_warned: set = set()


def configure(db: str | os.PathLike | None = None, on_miss: str | None = None) -> None:
    """Set the database and miss policy for this process (None keeps the environment's defaults)."""
    global _settings
    settings = Settings(None if db is None else str(db), on_miss)
    settings.policy()
    _settings = settings


@contextlib.contextmanager
def using(db: str | os.PathLike | None = None, on_miss: str | None = None) -> Iterator[None]:
    """Use another database or miss policy inside a block (affects functions traced inside it)."""
    current = _override.get() or _settings
    settings = Settings(current.db if db is None else str(db), on_miss or current.on_miss)
    settings.policy()
    token = _override.set(settings)
    try:
        yield
    finally:
        _override.reset(token)


def reload() -> None:
    """Forget what was looked up, so a database changed meanwhile is read again."""
    global _settings
    with _lock:
        _settings = Settings(_settings.db, _settings.on_miss)  # re-read the environment's defaults
        _cache.clear()
        _fast.clear()
        for store, _why in _stores.values():
            if store is not None:
                store.close()
        _stores.clear()
        _warned.clear()
        _fallbacks.clear()


def _user_stacklevel() -> int:
    """The stacklevel, counted from the caller of this function, of the first frame outside this package."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    return level


def _warn_once(tag: Any, message: str) -> None:
    with _lock:
        if tag in _warned:
            return
        _warned.add(tag)
    warnings.warn(message, RuntimeWarning, stacklevel=_user_stacklevel())


def _store(url: str) -> tuple[Store | None, str]:
    """The open store for a URL, or None and why not (missing, or cannot be opened). Never creates a database;
    never warns: the caller folds the reason into the one warning of the call."""
    with _lock:
        if url in _stores:
            return _stores[url]
        store, why = None, ""
        path = sqlite_file(url, uris=True)  # `file:` URIs (e.g. `?mode=ro`) included
        if path is not None and not path.exists():
            why = f"there is no results database at {path}"
        else:
            try:
                # Inference waits little for a locked database: the heuristic beats a stalled model.
                store = Store(url, busy_timeout_s=busy_timeout_s(RUNTIME_BUSY_TIMEOUT_S),
                              create=False, read_only=None)  # never creates; read-only where it cannot write
            except Exception as exc:  # noqa: BLE001 - inference must never break on the database
                why = f"the results database {display_url(url)} cannot be opened ({scrub(str(exc), url)})"
        _stores[url] = (store, why)
        return store, why


def record_fallback(problem: Problem, reason: str, *, kernel: str | None = None,
                    device: DeviceInfo | None = None) -> None:
    """Count a call the tuned kernels could not run (it ran XLA), once per problem and reason in this process, as a
    miss with its reason: `autotune list --misses` then shows what models ask for that the kernels lack."""
    settings = _override.get() or _settings
    device = device or current_device()
    kernel_name = kernel or kernel_for_platform(device.platform)
    tag = (settings.url(), kernel_name, device, problem, reason)
    with _lock:
        if tag in _fallbacks:
            return
        _fallbacks.add(tag)
    store, _why = _store(settings.url())
    if store is None:
        return
    with contextlib.suppress(Exception):  # a read-only or locked database cannot count: not worth failing for
        store.record_miss(make_key(load_kernel(kernel_name), problem, device), reason=reason)


def _tune_command(key: TuningKey, url: str) -> str:
    """The `autotune search` command that tunes this key into the database the runtime reads."""
    flags = [f"--batch {key.batch}", f"--seq-len {key.q_len}", f"--heads {key.heads}", f"--head-dim {key.head_dim}",
             f"--dtype {key.dtype}"]
    if key.kv_len != key.q_len:
        flags.append(f"--kv-seq-len {key.kv_len}")
    if key.kv_heads != key.heads:
        flags.append(f"--kv-heads {key.kv_heads}")
    flags += ["--causal"] * key.causal + ["--segments 3"] * key.segments + ["--backward"] * key.backward
    if key.window_left is not None or key.window_right is not None:
        sides = ["none" if side is None else str(side) for side in (key.window_left, key.window_right)]
        flags.append(f"--window {sides[0] if key.window_left == key.window_right else ','.join(sides)}")
    if key.softcap is not None:
        flags.append(f"--softcap {key.softcap:g}")
    flags += ["--lengths"] * key.lengths
    if url != default_url():
        flags.append(f"--db {shlex.quote(display_url(url))}")
    return "autotune search " + " ".join(flags)


def _stored_config(kernel: ModuleType, problem: Problem, config_dict: dict, device: DeviceInfo):
    """The stored config as the kernel's Config and "", or None and why it cannot run this problem."""
    try:
        config = kernel.Config.from_dict(config_dict)
        reasons = kernel.invalid_reasons(config, problem, device_kind=device_kind_of(device))
    except (ValueError, TypeError) as exc:
        config, reasons = None, [str(exc)]
    if reasons:
        return None, f"it cannot run {problem} ({'; '.join(reasons)})"
    return config, ""


def _resolve(kernel: ModuleType, kernel_name: str, problem: Problem, device: DeviceInfo, settings: Settings) -> Lookup:
    """The uncached lookup: one indexed query, then the miss policy. At most one warning, saying why it missed."""
    key = make_key(kernel, problem, device)
    policy, url = settings.policy(), settings.url()
    store, why = _store(url)
    if store is not None:
        try:
            best = store.get_best(key)
        except Exception as exc:  # noqa: BLE001 - a locked or broken database falls back
            best, store, why = None, None, f"the results database {display_url(url)} cannot be read ({scrub(str(exc), url)})"
        if best is not None:
            config, invalid = _stored_config(kernel, problem, best.config, device)
            if config is not None:
                return Lookup(config, "tuned", key)
            why = f"ignoring the stored config {best.config}: {invalid}"
    if store is not None:
        with contextlib.suppress(Exception):  # a read-only database cannot count misses: not worth failing for
            store.record_miss(key)
    why = why or f"no tuned config for this problem on {device.device_kind}"
    if policy == "error":
        raise TuningMissError(f"{why} (key {key.to_dict()}); tune it with: {_tune_command(key, url)}")
    if policy == "tune" and store is not None:
        from autotune.options import SearchOptions
        from autotune.search.loop import search_problem

        result = search_problem(problem, kernel_name=kernel_name, store=store, device=device,
                                options=SearchOptions(trials=int(os.environ.get("AUTOTUNE_TUNE_TRIALS", "8")),
                                                      compare_xla=False, retime_top=2), progress=False)
        return Lookup(kernel.Config.from_dict(result.best_config), "tuned", key, "tuned on miss")
    if policy == "nearest" and store is not None:
        with contextlib.suppress(Exception):
            for best in sorted(store.neighbours(key), key=lambda b: shape_distance(b.key, key)):
                config, _invalid = _stored_config(kernel, problem, best.config, device)
                if config is not None:
                    return Lookup(config, "nearest", key, f"from {best.key.to_dict()}")
        why += "; no config of a nearby tuned problem can run it either"
    _warn_once(("miss", url, key), f"{why}: using the heuristic default config. "
                                   f"Tune it with: {_tune_command(key, url)}")
    return Lookup(kernel.Config.default(problem, device_kind=device_kind_of(device)), "heuristic", key)


def _lookup_problem(problem: Problem, kernel_name: str | None, device: DeviceInfo) -> Lookup:
    settings = _override.get() or _settings
    kernel_name = kernel_name or kernel_for_platform(device.platform)
    cache_key = (settings.url(), settings.policy(), kernel_name, device, problem)
    found = _cache.get(cache_key)
    if found is not None:
        return found
    with _lock:
        found = _cache.get(cache_key)
        if found is None:
            found = _resolve(load_kernel(kernel_name), kernel_name, problem, device, settings)
            _cache[cache_key] = found
    return found


def lookup(q_shape, k_shape, dtype, *, causal: bool = False, segments: bool = False, backward: bool = False,
           window=None, softcap: float | None = None, lengths: bool = False, kernel: str | None = None) -> Lookup:
    """The config `flash_attention` would use for inputs of these shapes on the current device."""
    q_shape, k_shape = tuple(q_shape), tuple(k_shape)
    window = check_window(window)
    fast_key = (_override.get() or _settings, q_shape, k_shape, dtype, causal, segments, backward, window, softcap,
                lengths, kernel)
    found = _fast.get(fast_key)
    if found is not None:
        return found
    if len(q_shape) != 4 or len(k_shape) != 4:
        raise ValueError(f"q_shape and k_shape must be [batch, seq, heads, head_dim], got {q_shape} and {k_shape}")
    problem = Problem(batch=q_shape[0], q_len=q_shape[1], kv_len=k_shape[1], heads=q_shape[2],
                      kv_heads=k_shape[2], head_dim=q_shape[3], dtype=canonical_dtype(dtype), causal=causal,
                      segments=segments, backward=backward, **window_fields(window), softcap=softcap,
                      lengths=lengths)
    if k_shape[0] != q_shape[0] or k_shape[3] != q_shape[3]:
        raise ValueError(f"k_shape must share batch and head_dim with q_shape, got {k_shape} and {q_shape}")
    found = _lookup_problem(problem, kernel, current_device())
    _fast[fast_key] = found
    return found


def _backward_fields(kernel: ModuleType) -> tuple[str, ...]:
    return tuple(name for name in kernel.Config.__dataclass_fields__ if name.startswith("bwd_"))


def flash_attention(q, k, v, *, causal: bool = False, segment_ids=None, sm_scale: float | None = None,
                    window=None, softcap: float | None = None, q_lengths=None, kv_lengths=None,
                    return_lse: bool = False, kernel: str | None = None, device: DeviceInfo | None = None):
    """Flash attention with the tuned config for these shapes on this device (see `kernels` for the semantics).

    Layout q [batch, q_len, heads, head_dim], k and v [batch, kv_len, kv_heads, head_dim]. The forward uses the
    config tuned for the forward; the backward kernels (under `jax.grad`) use the backward config of the key
    tuned with `--backward` when there is one. `kernel` picks one ('gpu', 'tpu' or a module path; default: the
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
    forward = _lookup_problem(problem, kernel_name, device)
    config = forward.config
    backward = _peek_tuned(problem.replace(backward=True), kernel_name, device)
    if backward is not None:
        if forward.source == "tuned":  # forward fields tuned for the forward, backward fields for the backward
            fields = _backward_fields(kernel)
            config = kernel.Config.from_dict(
                {**config.to_dict(), **{name: getattr(backward.config, name) for name in fields}})
        else:
            config = backward.config
    extra = {"device_kind": device.device_kind} if target is not None and not device.interpret else {}
    extra.update(feature_kwargs(problem, q_lengths, kv_lengths))
    if return_lse:
        extra["return_lse"] = True
    return kernel.flash_attention(q, k, v, causal=causal, segment_ids=segment_ids, sm_scale=sm_scale,
                                  config=config, interpret=device.interpret, **extra)


def _peek_tuned(problem: Problem, kernel_name: str, device: DeviceInfo) -> Lookup | None:
    """The tuned lookup for a problem if there is one, without applying the miss policy or counting a miss."""
    settings = _override.get() or _settings
    cache_key = (settings.url(), "peek", kernel_name, device, problem)
    with _lock:
        if cache_key not in _cache:
            found = None
            store, _why = _store(settings.url())
            kernel = load_kernel(kernel_name)
            key = make_key(kernel, problem, device)
            if store is not None:
                with contextlib.suppress(Exception):
                    best = store.get_best(key)
                    if best is not None:
                        config, invalid = _stored_config(kernel, problem, best.config, device)
                        if config is not None:
                            found = Lookup(config, "tuned", key)
                        else:
                            _warn_once(("invalid", settings.url(), key),
                                       f"ignoring the stored backward config {best.config}: {invalid}")
            _cache[cache_key] = found  # type: ignore[assignment]
        return _cache[cache_key]
