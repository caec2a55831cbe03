"""The `autotune` command line: one click group with the commands of `autotune/cli/` added to it."""
from __future__ import annotations

import click

from autotune.cli.bench import bench_command
from autotune.cli.listing import list_command, show_command
from autotune.cli.report import report_command
from autotune.cli.search import search_command
from autotune.cli.targets import targets_command
from autotune.cli.transfer import export_command, import_command, prune_command


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pallas-autotune")
    except PackageNotFoundError:
        return "unknown (not installed)"


class OneLineErrors(click.Group):
    """Bad input is one line, `Error: ...` naming the flag (exit code 2), without click's two usage lines before it:
    the flag and what was expected are all the user needs, and `-h` is where it always is."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            exc.ctx = None  # click prints the usage lines only when the error carries its context
            raise


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(_version(), "--version", prog_name="autotune", message="%(prog)s %(version)s")
def main() -> None:
    """Autotune Pallas flash-attention kernels: search, store, inspect and ship the best configs."""


for _command in (search_command, list_command, show_command, export_command, import_command, prune_command,
                 bench_command, report_command, targets_command):
    main.add_command(_command)

if __name__ == "__main__":
    main()
