"""Tuned kernels at runtime: pick the stored best config for each problem when the function is traced.

The lookup happens once per key per process (results kept in memory behind a lock), at trace time, so a jitted
call costs what the kernel with a fixed config costs. On a miss the policy decides: `heuristic` (the default
config, one warning naming the command that would tune it), `nearest` (the best of the nearest tuned problem, if
valid here), `error`, or `tune` (a short search now). A key with no measured best whose problem a compile-only
search ranked for this device kind runs its predicted best instead (source "predicted", said once:
autotune/runtime/predicted.py). A missing, read-only or locked database never breaks
inference: the lookup falls back to the heuristic with one warning. Warnings point at the user's call (the
first frame outside jax, flax and this project: autotune/runtime/notices.py). `lookup()` only inspects: it records
no miss, warns nothing and tunes nothing; the kernel calls do. With the verbose switch each kernel call traced
prints its key, config and source, and its backward does the same when `jax.grad` traces it.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import shlex
import threading
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Iterator

from autotune import settings as environment
from autotune.device import DeviceInfo, current_device
from autotune.keys import make_key, shape_distance
from autotune.kernel_protocol import device_kind_of, kernel_for_platform, load_kernel, refusals
from autotune.problem_fields import command_flags
from autotune.runtime import notices
from autotune.runtime.predicted import device_for_kind, predicted_choice, predicted_warning
from autotune.settings import MISS_POLICIES, RUNTIME_BUSY_TIMEOUT_S, busy_timeout_s
from db import KERNEL_IMPLEMENTATION as KERNEL, BestRecord, Store, TuningKey, default_url, resolve_url
from db.urls import PASSWORD_HINT, display_url, scrub, shareable_url, sqlite_file
from kernels import Problem, canonical_dtype
from kernels.problem import check_window, window_fields
from kernels.xla_attention import baseline_refusal


class TuningMissError(LookupError):
    """Raised under the `error` miss policy: no tuned config for the key."""


@dataclass(frozen=True)
class Settings:
    """Where to look, what to do on a miss and whether to log each call's config; URL and policy are resolved once
    per settings object."""

    db: str | None = None
    on_miss: str | None = None
    verbose: bool | None = None  # None: $AUTOTUNE_VERBOSE

    @functools.cached_property
    def _resolved(self) -> tuple[str, str, int]:
        """Everything read at once, so a malformed setting fails here (naming it), before a miss is recorded."""
        if self.on_miss and self.on_miss not in MISS_POLICIES:
            raise ValueError(f"on_miss must be one of {MISS_POLICIES}, got {self.on_miss!r}")
        policy = self.on_miss or environment.miss_policy() or "heuristic"
        trials = environment.tune_trials() if policy == "tune" else environment.DEFAULT_TUNE_TRIALS
        return (resolve_url(self.db) if self.db is not None else default_url()), policy, trials

    def url(self) -> str:
        return self._resolved[0]

    def policy(self) -> str:
        return self._resolved[1]

    def tune_trials(self) -> int:
        """The trials of the short search the `tune` policy runs ($AUTOTUNE_TUNE_TRIALS)."""
        return self._resolved[2]

    def logs(self) -> bool:
        """Whether each kernel call traced prints its key, config and source."""
        return environment.verbose() if self.verbose is None else bool(self.verbose)


@dataclass(frozen=True)
class Lookup:
    """The config a call will use and where it came from: 'tuned' (measured), 'predicted' (the static model's
    best of a compile-only search: never a timing), 'nearest' or 'heuristic'; and which implementation
    `dot_product_attention(implementation=None)` runs: 'pallas' (the kernel with `config`), or jax.nn's 'xla' or
    'cudnn' where that won the key's final re-timing and can run it here (`flash_attention` always runs the
    kernel)."""

    config: Any
    source: str
    key: TuningKey
    detail: str = ""
    refused: bool = False  # the kernel cannot run the problem with any config: not a miss, tuning cannot help
    implementation: str = KERNEL
    prediction: Any = None  # source 'predicted': the model's Prediction (predicted seconds, bound, model version)


_settings = Settings()
_override: contextvars.ContextVar[Settings | None] = contextvars.ContextVar("autotune_settings", default=None)
_lock = threading.RLock()
_cache: dict[tuple, Lookup] = {}
_fast: dict[tuple, Lookup] = {}  # lookup() by its raw arguments, to skip building the problem on a hit
_stores: dict[str, tuple[Store | None, str]] = {}  # url -> (store, why not)
_fallbacks: set[tuple] = set()  # (url, kernel, device, problem, reason) counted by record_fallback
_acted: set[tuple] = set()  # (url, key) whose miss a kernel call has recorded


def configure(db: str | os.PathLike | None = None, on_miss: str | None = None, verbose: bool | None = None) -> None:
    """Set the database, miss policy and log switch for this process (None keeps the environment's defaults:
    $AUTOTUNE_DB, $AUTOTUNE_ON_MISS, $AUTOTUNE_VERBOSE)."""
    global _settings
    settings = Settings(None if db is None else str(db), on_miss, verbose)
    settings.policy()
    settings.logs()
    _settings = settings


@contextlib.contextmanager
def using(db: str | os.PathLike | None = None, on_miss: str | None = None,
          verbose: bool | None = None) -> Iterator[None]:
    """Use another database, miss policy or log switch inside a block (affects functions traced inside it)."""
    current = _override.get() or _settings
    settings = Settings(current.db if db is None else str(db), on_miss or current.on_miss,
                        current.verbose if verbose is None else verbose)
    settings.policy()
    settings.logs()
    token = _override.set(settings)
    try:
        yield
    finally:
        _override.reset(token)


def reload() -> None:
    """Forget what was looked up, so a database changed meanwhile is read again."""
    global _settings
    with _lock:
        _settings = Settings(_settings.db, _settings.on_miss, _settings.verbose)  # re-read the environment's
        _cache.clear()
        _fast.clear()
        for store, _why in _stores.values():
            if store is not None:
                store.close()
        _stores.clear()
        _acted.clear()
        _fallbacks.clear()
        notices.clear()


def _store(url: str) -> tuple[Store | None, str]:
    """The open store for a URL, or None and why not (missing, or cannot be opened). Never creates a database; the
    caller folds the reason into the one warning of the call (only a store's notice is warned here, once)."""
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
            if store is not None and store.notice:  # said once: the store is opened once per URL
                notices.warn_once(("notice", url), store.notice)
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


def tune_command(key: TuningKey, url: str) -> str:
    """The `autotune search` command that tunes this key into the database the runtime reads."""
    flags = command_flags(key)
    note = ""
    if url != default_url():
        shown, secret_left_out = shareable_url(url)
        flags.append(f"--db {shlex.quote(shown)}")
        note = f" ({PASSWORD_HINT})" if secret_left_out else ""
    return "autotune search " + " ".join(flags) + note


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


def _tuned(config, key: TuningKey, best: BestRecord, problem: Problem, device: DeviceInfo) -> Lookup:
    """A hit: the stored kernel config, and the stored winner where jax.nn can run it here (else the kernel, with
    why in `detail`)."""
    if not best.baseline_won:
        return Lookup(config, "tuned", key)
    times = ", ".join(f"{name} {seconds * 1e3:.3f} ms" for name, seconds in sorted(best.times.items(),
                                                                                    key=lambda item: item[1]))
    refused = baseline_refusal(best.implementation, problem, device.platform)
    if refused:
        return Lookup(config, "tuned", key, f"{best.implementation} won the final re-timing ({times}) but cannot "
                                            f"run here: {refused}")
    return Lookup(config, "tuned", key, f"{best.implementation} won the final re-timing: {times}",
                  implementation=best.implementation)


def _predicted(store: Store | None, kernel: ModuleType, problem: Problem, device: DeviceInfo,
               key: TuningKey) -> Lookup | None:
    """The key's predicted best (a compile-only search's for its device kind) if it can run here, else None."""
    if store is None:
        return None
    try:
        chosen = predicted_choice(store, kernel, key, lambda data: _stored_config(kernel, problem, data, device))
    except Exception:  # noqa: BLE001 - a locked or broken database: the lookup goes on without a prediction
        return None
    return None if chosen is None else Lookup(chosen.config, "predicted", key, chosen.detail,
                                              prediction=chosen.prediction, implementation=chosen.implementation)


def _resolve(kernel: ModuleType, problem: Problem, device: DeviceInfo, settings: Settings) -> Lookup:
    """The uncached lookup, without side effects: one indexed query, then, on a miss, the nearest tuned problem
    (policy `nearest`) or the heuristic default; `detail` says why it missed."""
    key = make_key(kernel, problem, device)
    url = settings.url()
    store, why = _store(url)
    if store is not None:
        try:
            best = store.get_best(key)
        except Exception as exc:  # noqa: BLE001 - a locked or broken database falls back
            best, store, why = None, None, f"the results database {display_url(url)} cannot be read ({scrub(str(exc), url)})"
        if best is not None:
            config, invalid = _stored_config(kernel, problem, best.config, device)
            if config is not None:
                return _tuned(config, key, best, problem, device)
            why = f"ignoring the stored config {best.config}: {invalid}"
    refused = refusals(kernel, problem, device_kind=device_kind_of(device))
    if refused:  # no config can run it: not a miss (tuning cannot help); the kernel's call says why
        return Lookup(kernel.Config.default(problem, device_kind=device_kind_of(device)), "heuristic", key,
                      "; ".join(refused), refused=True)
    predicted = _predicted(store, kernel, problem, device, key)  # no measured best: the model's before any guess
    if predicted is not None:
        return predicted
    why = why or f"no tuned config for this problem on {device.device_kind}"
    if settings.policy() == "nearest" and store is not None:
        with contextlib.suppress(Exception):
            for best in sorted(store.neighbours(key), key=lambda b: shape_distance(b.key, key)):
                config, _invalid = _stored_config(kernel, problem, best.config, device)
                if config is not None:
                    return Lookup(config, "nearest", key, f"from {best.key.to_dict()}")
        why += "; no config of a nearby tuned problem can run it either"
    return Lookup(kernel.Config.default(problem, device_kind=device_kind_of(device)), "heuristic", key, why)


def current_settings() -> Settings:
    """The settings in force here: a `using` block's, else the process's (`configure`)."""
    return _override.get() or _settings


def count_miss(url: str, key: TuningKey) -> bool:
    """Record a miss of `key` in the database at `url`, once per process; whether this was the first."""
    with _lock:
        first = (url, key) not in _acted
        _acted.add((url, key))
    store, _why = _store(url)
    if first and store is not None:
        with contextlib.suppress(Exception):  # a read-only database cannot count misses: not worth failing for
            store.record_miss(key)
    return first


def _cache_key(settings: Settings, kernel_name: str, device: DeviceInfo, problem: Problem) -> tuple:
    return settings.url(), settings.policy(), kernel_name, device, problem


def find(problem: Problem, kernel_name: str | None, device: DeviceInfo) -> Lookup:
    """What a call of this problem finds, remembered per key: no miss recorded, no warning (see `_use`)."""
    settings = _override.get() or _settings
    kernel_name = kernel_name or kernel_for_platform(device.platform)
    cache_key = _cache_key(settings, kernel_name, device, problem)
    found = _cache.get(cache_key)
    if found is not None:
        return found
    with _lock:
        found = _cache.get(cache_key)
        if found is None:
            found = _resolve(load_kernel(kernel_name), problem, device, settings)
            _cache[cache_key] = found
    return found


def use(problem: Problem, kernel_name: str, device: DeviceInfo) -> Lookup:
    """What a kernel call runs with: the lookup, and on a miss (once per key and process) the miss recorded and the
    policy applied: a warning naming the command that tunes it, an error, or a short search now."""
    found = find(problem, kernel_name, device)
    if found.source == "tuned" or found.refused:
        return found
    settings = current_settings()
    url, policy, key = settings.url(), settings.policy(), found.key
    first = count_miss(url, key)
    store, _why = _store(url)
    if policy == "error":
        raise TuningMissError(f"{found.detail} (key {key.to_dict()}); tune it with: {tune_command(key, url)}")
    if policy == "tune" and store is not None and first:
        from autotune.options import SearchOptions
        from autotune.search.loop import search_problem

        result = search_problem(problem, kernel_name=kernel_name, store=store, device=device,
                                options=SearchOptions(trials=settings.tune_trials(),
                                                      compare_xla=False, retime_top=2), progress=False)
        found = Lookup(load_kernel(kernel_name).Config.from_dict(result.best_config), "tuned", key, "tuned on miss")
        with _lock:
            _cache[_cache_key(settings, kernel_name, device, problem)] = found
            _fast.clear()
        return found
    if found.source == "heuristic":
        notices.warn_once(("miss", url, key), f"{found.detail}: using the heuristic default config. "
                                              f"Tune it with: {tune_command(key, url)}")
    elif found.source == "predicted":
        notices.warn_once(("predicted", url, key), predicted_warning(found.detail, tune_command(key, url)))
    return found


def lookup(q_shape, k_shape, dtype, *, causal: bool = False, segments: bool = False, backward: bool = False,
           window=None, softcap: float | None = None, lengths: bool = False, kernel: str | None = None,
           device_kind: str | None = None) -> Lookup:
    """The config `flash_attention` would use for inputs of these shapes on the current device (or on a device of
    `device_kind`: a compile target's, e.g. 'TPU v5 lite', to see what the runtime would pick on hardware this
    machine lacks), and where it comes from ('tuned', 'predicted', 'nearest' or 'heuristic', with `detail` saying
    why it missed), and the `implementation` `dot_product_attention` would run (a baseline that won the key, or
    'pallas'). Only inspects: no miss is recorded, nothing is warned or tuned (under on_miss='error' a miss raises
    TuningMissError, as the call would). The keywords are the problem's fields (autotune/problem_fields.py) other
    than the shapes and dtype."""
    q_shape, k_shape = tuple(q_shape), tuple(k_shape)
    window = check_window(window)
    fast_key = (_override.get() or _settings, q_shape, k_shape, dtype, causal, segments, backward, window, softcap,
                lengths, kernel, device_kind)
    found = _fast.get(fast_key)
    if found is None:
        if len(q_shape) != 4 or len(k_shape) != 4:
            raise ValueError(f"q_shape and k_shape must be [batch, seq, heads, head_dim], got {q_shape} and {k_shape}")
        if k_shape[0] != q_shape[0] or k_shape[3] != q_shape[3]:
            raise ValueError(f"k_shape must share batch and head_dim with q_shape, got {k_shape} and {q_shape}")
        problem = Problem(batch=q_shape[0], q_len=q_shape[1], kv_len=k_shape[1], heads=q_shape[2],
                          kv_heads=k_shape[2], head_dim=q_shape[3], dtype=canonical_dtype(dtype), causal=causal,
                          segments=segments, backward=backward, **window_fields(window), softcap=softcap,
                          lengths=lengths)
        found = find(problem, kernel, device_for_kind(device_kind, kernel))
        _fast[fast_key] = found
    settings = _override.get() or _settings
    if found.source != "tuned" and settings.policy() == "error":
        raise TuningMissError(f"{found.detail} (key {found.key.to_dict()}); tune it with: "
                              f"{tune_command(found.key, settings.url())}")
    return found


def peek_tuned(problem: Problem, kernel_name: str, device: DeviceInfo) -> Lookup | None:
    """The tuned lookup for a problem if there is one (else its predicted best, source 'predicted', if a
    compile-only search ranked it), without applying the miss policy or counting a miss."""
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
                            found = _tuned(config, key, best, problem, device)
                        else:
                            notices.warn_once(("invalid", settings.url(), key),
                                              f"ignoring the stored backward config {best.config}: {invalid}")
                    if found is None:  # no measured backward: a compile-only search's predicted best, if any
                        found = _predicted(store, kernel, problem, device, key)
            _cache[cache_key] = found  # type: ignore[assignment]
        return _cache[cache_key]
