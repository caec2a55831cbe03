"""How `show` and `report` present compile-only trials (`search --target`): the key a --target names, and each
trial's compiler figures in a few words (bytes of shared memory or VMEM, registers and spills per kernel)."""
from __future__ import annotations

import click

from autotune.cli.common import specs_from_flags, where

ROLE_SHORT = {"forward": "fwd", "dq": "dq", "dkv": "dkv"}


def kib(size: int | None) -> str:
    return "-" if size is None else f"{size / 1024:.1f}K"


def kernel_text(kernel: dict) -> str:
    """'fwd 40.0K r143' (+ ' spill 1.7K' when it spilled): one kernel's figures."""
    text = f"{ROLE_SHORT.get(kernel.get('role'), kernel.get('role'))} {kib(kernel.get('memory_bytes'))}"
    if kernel.get("registers") is not None:
        text += f" r{kernel['registers']}"
    spilled = (kernel.get("spill_store_bytes") or 0) + (kernel.get("spill_load_bytes") or 0)
    if spilled:
        text += f" spill {kib(spilled)}"
    return text


def figures_text(figures: dict | None) -> str:
    """A compile-only trial's figures for a table cell: every kernel's, or the bytes a failure asked for."""
    if not figures:
        return ""
    kernels = figures.get("kernels") or []
    if kernels:
        return "; ".join(kernel_text(k) for k in kernels)
    if figures.get("requested_bytes") is not None:
        return f"asked {kib(figures['requested_bytes'])} of {kib(figures.get('limit_bytes'))}"
    return ""


def target_key(store, target_name: str, kernel: str | None, flags: dict):
    """The compile-only key `show --target NAME <problem flags>` names: this jax version's if it has trials,
    else the newest other jax version's; a clear error when the target or the problem is wrong."""
    from autotune.compile.results import compile_key, find_compile_keys
    from autotune.device import current_device
    from autotune.kernel_protocol import kernel_for_platform, load_kernel
    from autotune.compile.targets import TARGETS

    if target_name not in TARGETS:
        raise click.BadParameter(f"unknown target {target_name!r}; known targets: {', '.join(TARGETS)}",
                                 param_hint="--target")
    target = TARGETS[target_name]
    if kernel is not None and kernel != target.platform:
        raise click.BadParameter(f"target {target_name!r} is a {target.platform.upper()}; --kernel {kernel} does not "
                                 "build for it", param_hint="--target")
    spec = specs_from_flags(flags, None)[0]
    module = load_kernel(kernel_for_platform(target.platform))
    device = current_device()
    key = compile_key(module.NAME, module.VERSION, target.platform, target.device_kind, device.jax_version,
                      spec.problem)
    if store.trials(key):
        return key
    device_key = key.__class__(**{**key.to_dict(), "platform": target.platform})
    for other in find_compile_keys(store, device_key):
        if store.trials(other):
            return other
    raise click.ClickException(f"no compile-only results for {target_name} and this problem in {where(store)} "
                               f"(run `autotune search --target {target_name}` with the same problem flags)")
