"""The `autotune` command line: one click group with the commands of `autotune/commands/` added to it."""
from __future__ import annotations

import click

from autotune.commands.bench import bench_command
from autotune.commands.listing import list_command, show_command
from autotune.commands.report import report_command
from autotune.commands.search import search_command
from autotune.commands.targets import targets_command
from autotune.commands.transfer import export_command, import_command, prune_command


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pallas-autotune")
    except PackageNotFoundError:
        return "unknown (not installed)"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(_version(), "--version", prog_name="autotune", message="%(prog)s %(version)s")
def main() -> None:
    """Autotune Pallas flash-attention kernels: search, store, inspect and ship the best configs."""


for _command in (search_command, list_command, show_command, export_command, import_command, prune_command,
                 bench_command, report_command, targets_command):
    main.add_command(_command)

if __name__ == "__main__":
    main()
