"""What the compile-only search (`search --target`) says around its work: before it starts, about how long it will
take; when nothing is left to compile, that everything asked for is recorded; at the end, the next steps (the
`show` command for what was compiled, how the results reach the device machine, which device kinds they apply on).
"""
from __future__ import annotations

import shlex
import statistics

import click

from autotune.compile.results import compile_platform
from autotune.measure.cost import duration_text
from autotune.problem_fields import command_flags
from db.urls import PASSWORD_HINT, resolve_url, shareable_url

# Seconds one compile takes in one worker process, measured on a 2-core x86 machine (benchmarks/results/
# target-search-cpu.json: wall seconds x 2 processes / configs, 6 bfloat16 forward problems, 10 configs each).
# The other targets of a platform compile the same way as the measured one (same architecture or generation).
MEASURED_COMPILE_S = {"h100": 8.3, "a100": 60.0, "v5e": 4.4, "v6e": 4.7}
PLATFORM_COMPILE_S = {"gpu": 8.3, "tpu": 4.7}
STARTUP_S = 30.0  # starting the compile workers (jax and the compilers imported in each), measured on that machine
RECORDED_ENOUGH = 5  # compile-only trials of a target in the database before their mean replaces the measurement


def compile_seconds(store, target) -> tuple[float, str]:
    """Seconds per compile for `target`, and where the figure comes from: the mean of this database's earlier
    compile-only trials of the target, else the committed measurement."""
    seconds = []
    for key in store.keys(platform=compile_platform(target.platform), device_kind=target.device_kind):
        seconds += [t.compile_s for t in store.trials(key) if t.compile_s is not None]
    if len(seconds) >= RECORDED_ENOUGH:
        return statistics.fmean(seconds), f"the mean of its {len(seconds)} compiles recorded in this database"
    measured = MEASURED_COMPILE_S.get(target.name, PLATFORM_COMPILE_S[target.platform])
    return measured, "measured on a 2-core machine (benchmarks/results/target-search-cpu.md)"


def estimate_line(plans, store, processes: int) -> str | None:
    """'About 12 min before it ends: ...' for the configs the plans will compile; None when there are none."""
    per_target: dict[str, list] = {}
    for plan in plans:
        per_target.setdefault(plan.target.name, [plan.target, 0])[1] += len(plan.configs)
    total_configs = sum(n for _, n in per_target.values())
    if not total_configs:
        return None
    work, parts, sources = 0.0, [], []
    for target, configs in per_target.values():
        if not configs:
            continue
        each, source = compile_seconds(store, target)
        work += configs * each
        parts.append(f"{target.name} {configs} x {each:.1f} s")
        sources.append(source if source.startswith("measured") else f"{target.name}: {source}")
    wall = STARTUP_S + work / max(1, processes)
    return (f"Estimated time: about {duration_text(wall)} ({total_configs} compiles over {processes} worker "
            f"processes: {', '.join(parts)}; seconds per compile {'; '.join(dict.fromkeys(sources))}). Ctrl-C keeps "
            "every finished compile; the same command resumes.")


def nothing_left_line(plans) -> str:
    """What a run with nothing to compile says: every config its budget asks for is recorded already (raise
    --trials), or the rest are claimed by another process on the same database."""
    if all(plan.recorded >= plan.limit for plan in plans):
        each = " or ".join(str(n) for n in sorted({plan.limit for plan in plans}))
        return (f"Nothing to compile: all {each} configs of each target and problem are already recorded; raise "
                "--trials to compile more.")
    return ("Nothing to compile here: the configs not recorded yet are being compiled by another process on this "
            "database.")


def _db_flag(db: str | None) -> tuple[str, bool]:
    if db is None:
        return "", False
    shown, secret_left_out = shareable_url(resolve_url(db))
    return f" --db {shlex.quote(shown)}", secret_left_out


def next_steps(plans, *, db: str | None, shapes: str | None, given_flags: list[str]) -> list[str]:
    """The lines after the summary: the concrete `show --target` command, how results travel to the device machine
    and what the device search does with them, and the device kinds each target's results apply on."""
    if not plans:
        return []
    db_flag, secret_left_out = _db_flag(db)
    first = plans[0]
    problem = " ".join(command_flags(first.spec.problem))
    search = (f"--shapes {shlex.quote(shapes)}" + "".join(f" {flag}" for flag in given_flags)) if shapes else problem
    lines = [f"Next: autotune show --target {first.target.name} {problem}{db_flag}   (each target and problem: "
             "its own --target and problem flags; a page of them all: autotune report report.html"
             f"{db_flag})",
             f"On the device: copy the database there (or `autotune export compile.json{db_flag}` here and "
             f"`autotune import compile.json` there), then run `autotune search {search}{db_flag}` there: it "
             "skips the configs the compiler rejected and those that spill, and times the rest."]
    for target in dict.fromkeys(plan.target for plan in plans):
        lines.append(f"{target.name}'s results apply on: {', '.join(target.device_kinds)}")
    if secret_left_out:
        lines.append(f"(In these commands, {PASSWORD_HINT}.)")
    return lines
