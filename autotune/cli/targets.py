"""`autotune targets`: the named compile targets, the device kinds their results apply on, their limits, and whether
this machine can compile for them (deviceless, `pip install -e '.[compilers]'`)."""
from __future__ import annotations

import json

import click

from autotune.cli.common import print_table
from autotune.compile.pool import compilers_missing
from autotune.compile.targets import TARGETS, Target

KIB = 1024


def memory_text(target: Target) -> str:
    """The target's memory limit with one decimal in the unit that suits it: '227.0 KiB smem/block',
    '16.0 MiB VMEM'."""
    what = "smem/block" if target.platform == "gpu" else "VMEM"
    size = target.memory_limit_bytes
    if size >= 1 << 20:
        return f"{size / (1 << 20):.1f} MiB {what}"
    return f"{size / KIB:.1f} KiB {what}"


def compilers_here() -> dict[str, str | None]:
    """Per platform, None when this machine can compile for it, else the reason it cannot."""
    return {platform: compilers_missing(platform) for platform in ("gpu", "tpu")}


def print_targets_table(missing: dict[str, str | None]) -> None:
    """One row per target: its name, platform, the device kinds its results apply on, limits and published peaks
    (whole TFLOP/s and GB/s), and whether this machine has its compiler."""
    rows = [[t.name, t.platform, memory_text(t), f"{t.peak_bf16_tflops:.0f}", f"{t.hbm_gbytes_per_s:.0f}",
             "yes" if missing[t.platform] is None else "no", ", ".join(t.device_kinds)]
            for t in TARGETS.values()]
    print_table(["name", "platform", "memory limit", "bf16 TFLOP/s", "HBM GB/s", "compiler here",
                 "device kinds its results apply on"], rows)
    for platform, reason in missing.items():
        if reason:
            click.echo(f"\n{platform.upper()} targets cannot be compiled here: {reason}")


@click.command("targets")
@click.option("--json", "as_json", is_flag=True, help="Print the catalogue as JSON.")
def targets_command(as_json: bool) -> None:
    """List the targets the kernels can be compiled and checked for without the hardware, and the device kinds
    each one's results apply on."""
    missing = compilers_here()
    if as_json:
        rows = []
        for target in TARGETS.values():
            data = target.to_dict()
            data["compiler_available"] = missing[target.platform] is None
            data["compiler_missing_reason"] = missing[target.platform]
            rows.append(data)
        click.echo(json.dumps(rows, indent=2))
        return
    print_targets_table(missing)
