"""How `show` and `report` present compile-only trials (`search --target`): the key a --target names, and each
trial's compiler figures in a few words (bytes of shared memory or VMEM, registers and spills per kernel)."""
from __future__ import annotations

import click

from autotune.cli.common import specs_from_flags, where

ROLE_SHORT = {"forward": "fwd", "dq": "dq", "dkv": "dkv"}


def size_text(size: int | None) -> str:
    """Bytes in the unit that suits them, one decimal: '96 B', '52.0 KiB', '12.3 MiB' ('-' when unknown)."""
    if size is None:
        return "-"
    if size < 1024:
        return f"{size} B"
    if size < 1 << 20:
        return f"{size / 1024:.1f} KiB"
    return f"{size / (1 << 20):.1f} MiB"


def kernel_text(kernel: dict) -> str:
    """'fwd 40.0 KiB r143' (+ ' spill 1.7 KiB' when it spilled): one kernel's figures."""
    text = f"{ROLE_SHORT.get(kernel.get('role'), kernel.get('role'))} {size_text(kernel.get('memory_bytes'))}"
    if kernel.get("registers") is not None:
        text += f" r{kernel['registers']}"
    spilled = (kernel.get("spill_store_bytes") or 0) + (kernel.get("spill_load_bytes") or 0)
    if spilled:
        text += f" spill {size_text(spilled)}"
    return text


def figures_text(figures: dict | None) -> str:
    """A compile-only trial's figures for a table cell: every kernel's, or the bytes a failure asked for."""
    if not figures:
        return ""
    kernels = figures.get("kernels") or []
    if kernels:
        return "; ".join(kernel_text(k) for k in kernels)
    if figures.get("requested_bytes") is not None:
        return f"asked {size_text(figures['requested_bytes'])} of {size_text(figures.get('limit_bytes'))}"
    return ""


def figures_heading(key) -> str:
    """The header of the figures column, with the unit and the limit of the target the key is for:
    'kernels (shared memory of 227.0 KiB per block, registers, spills)'."""
    from autotune.compile.targets import target_for_device_kind

    target = target_for_device_kind(key.device_kind)
    memory = "shared memory" if key.platform.startswith("gpu") else "VMEM"
    if target is not None:
        memory += f" of {size_text(target.memory_limit_bytes)}" + (" per block" if target.platform == "gpu" else "")
    return f"kernels ({memory}, registers, spills)"


def compile_status(trial) -> str:
    """A compile-only trial's status as `show` prints it: 'spills' for a compiled config that spilled registers
    (the device search skips it by default), else the stored status."""
    from autotune.compile.results import SPILLS, trial_verdict

    return "spills" if trial_verdict(trial) == SPILLS else trial.status


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
