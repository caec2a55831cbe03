"""What a search on a CPU says before it starts: its times are interpret-mode times, and, when it will take more
than a few minutes, about how long and the compile-only search that vets configs for a GPU or TPU instead."""
from __future__ import annotations

import shlex

import click

from autotune.measure.cost import (INTERPRET_CAVEAT, SLOW_SEARCH_S, duration_text, first_trial_seconds,
                                   matmul_rate, search_seconds)
from autotune.options import TimingPolicy
from autotune.problem_fields import command_flags, describe


def target_command(specs, shapes: str | None, given_flags: list[str]) -> str:
    """The `autotune search --target h100 ...` line with the problem of this search."""
    problem = (["--shapes", shlex.quote(shapes)] + given_flags) if shapes else command_flags(specs[0].problem)
    return "autotune search --target h100 " + " ".join(problem)


def announce_cpu_search(specs, *, trials: int | None, timing: TimingPolicy, shapes: str | None,
                        given_flags: list[str]) -> float:
    """Print the interpret-mode caveat; when the whole search will take over SLOW_SEARCH_S, say about how long
    (the first trial's estimated cost per problem, times the trials) and suggest `--target`. Returns the estimate
    in seconds."""
    click.echo(INTERPRET_CAVEAT, err=True)
    rates: dict[str, float] = {}
    firsts = []
    for spec in specs:
        dtype = spec.problem.dtype
        if dtype not in rates:
            rates[dtype] = matmul_rate(dtype)
        firsts.append(first_trial_seconds(spec.problem, rates[dtype], timing))
    total = sum(search_seconds(first, trials) for first in firsts)
    if total > SLOW_SEARCH_S:
        slowest = max(range(len(specs)), key=lambda i: firsts[i])
        click.echo(f"This search will take about {duration_text(total)} on this CPU (estimated: the first trial of "
                   f"{describe(specs[slowest].problem)} about {duration_text(firsts[slowest])}, in interpret mode). "
                   "To tune for a GPU or TPU without one, compile the candidates for it instead (nothing is timed): "
                   f"{target_command(specs, shapes, given_flags)}", err=True)
    return total
