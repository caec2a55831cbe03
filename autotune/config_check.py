"""The kernels' rules, handed to the database as its `ConfigCheck` (db/ knows no kernels).

An import checks every record's config with them, so a config no kernel can run (`block_q: -64`, `"64"`, unknown
fields) is refused naming the record; and storing a best replaces a stored one they refuse, so a best that cannot
run never blocks a real one. A built-in kernel is known by its stored name: its `Config.from_dict` judges the fields
of any version, and `invalid_reasons` judges the config against the key's problem when the version is this build's
(another build's limits may differ). A user's kernel is judged by its own module where the caller has it (the
search), and accepted otherwise: the runtime re-checks it when that kernel is loaded.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from autotune.kernel_protocol import BUILTIN, load_kernel
from autotune.keys import problem_of
from db import ConfigCheck, TuningKey
from kernels.devices import INTERPRET


def check_with(kernel: ModuleType) -> ConfigCheck:
    """A ConfigCheck judging configs with `kernel` (the search's own kernel, built-in or a user's)."""
    return functools.partial(_check, kernel)


def check_any_kernel(key: TuningKey, config: Mapping[str, Any]) -> None:
    """A ConfigCheck for configs of any kernel: built-in ones by their rules, others accepted (see the module)."""
    kernel = _builtin_kernels().get(key.kernel)
    if kernel is not None:
        _check(kernel, key, config)


def check_fields_any_kernel(key: TuningKey, config: Mapping[str, Any]) -> None:
    """A ConfigCheck of a config's fields only (names and types, by the built-in kernel's `Config.from_dict`),
    not whether it can run the key's problem: for configs recorded as failing, such as a compile-only trial the
    compiler rejected."""
    kernel = _builtin_kernels().get(key.kernel)
    if kernel is not None:
        try:
            kernel.Config.from_dict(dict(config))
        except (TypeError, KeyError) as exc:
            raise ValueError(f"not a {kernel.NAME} config: {exc}") from None


@functools.lru_cache(maxsize=1)
def _builtin_kernels() -> dict[str, ModuleType]:
    kernels = (load_kernel(name) for name in BUILTIN)
    return {kernel.NAME: kernel for kernel in kernels}


def _check(kernel: ModuleType, key: TuningKey, config: Mapping[str, Any]) -> None:
    if key.kernel != kernel.NAME:
        return  # another kernel's config: not this module's to judge
    try:
        parsed = kernel.Config.from_dict(dict(config))
    except (TypeError, KeyError) as exc:  # a from_dict that does not say ValueError itself
        raise ValueError(f"not a {kernel.NAME} config: {exc}") from None
    if key.kernel_version != kernel.VERSION:
        return
    device_kind = None if key.platform == INTERPRET else key.device_kind
    reasons = kernel.invalid_reasons(parsed, problem_of(key), device_kind=device_kind)
    if reasons:
        raise ValueError(f"{kernel.NAME} cannot run it for this key's problem: {'; '.join(reasons)}")
