"""`autotune targets`: the named compile targets, their device kinds and limits, and whether this machine can
compile for them (deviceless, `pip install -e '.[compilers]'`)."""
from __future__ import annotations

import json

import click

from autotune.compile.pool import compilers_missing
from autotune.compile.targets import TARGETS

KIB = 1024


def _memory(target) -> str:
    what = "smem/block" if target.platform == "gpu" else "scoped VMEM"
    if target.memory_limit_bytes % (1 << 20) == 0:
        return f"{target.memory_limit_bytes >> 20} MiB {what}"
    return f"{target.memory_limit_bytes // KIB} KiB {what}"


@click.command("targets")
@click.option("--json", "as_json", is_flag=True, help="Print the catalogue as JSON.")
def targets_command(as_json: bool) -> None:
    """List the targets the kernels can be compiled and checked for without the hardware."""
    missing = {platform: compilers_missing(platform) for platform in ("gpu", "tpu")}
    rows = []
    for target in TARGETS.values():
        data = target.to_dict()
        data["compiler_available"] = missing[target.platform] is None
        data["compiler_missing_reason"] = missing[target.platform]
        rows.append(data)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    header = ("name", "platform", "device kind", "memory limit", "bf16 TFLOP/s", "HBM GB/s", "compiler")
    table = [header] + [
        (t.name, t.platform, t.device_kind, _memory(t), f"{t.peak_bf16_tflops:g}", f"{t.hbm_gbytes_per_s:g}",
         "yes" if missing[t.platform] is None else "no")
        for t in TARGETS.values()
    ]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    for row in table:
        click.echo("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
    for platform, reason in missing.items():
        if reason:
            click.echo(f"\n{platform.upper()} targets cannot be compiled here: {reason}")
