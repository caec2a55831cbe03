"""The `autotune` command line: `search` here; the inspection commands live in their own modules."""
from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
import uuid
from typing import Iterator

import click

from autotune.shapes import ProblemSpec, load_shapes, spec_from_fields

DB_HELP = "Results database: a SQLAlchemy URL or a file path (default: $AUTOTUNE_DB, else ~/.cache/pallas-autotune)."


def problem_options(func):
    """The flags that describe one problem, shared by search, show and bench."""
    options = [
        click.option("--batch", type=int, help="Batch size."),
        click.option("--seq-len", type=int, help="Query sequence length."),
        click.option("--kv-seq-len", type=int, help="Key/value sequence length (default: --seq-len)."),
        click.option("--heads", type=int, help="Query heads."),
        click.option("--kv-heads", type=int, help="Key/value heads (default: --heads; fewer for GQA/MQA)."),
        click.option("--head-dim", type=int, help="Head dimension."),
        click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32",
                     show_default=True),
        click.option("--causal", is_flag=True, help="Causal (top-left aligned) masking."),
        click.option("--segments", type=int, default=0, show_default=True,
                     help="N packed documents of random lengths (0: no segment ids)."),
        click.option("--backward", is_flag=True, help="Tune forward plus backward."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


FLAG_FIELDS = ("batch", "seq_len", "kv_seq_len", "heads", "kv_heads", "head_dim", "dtype", "causal", "segments",
               "backward")


def specs_from_flags(params: dict, shapes: str | None) -> list[ProblemSpec]:
    """The problems named by --shapes, or by the problem flags; UsageError naming what is wrong."""
    given = {name: params.get(name) for name in FLAG_FIELDS}
    try:
        if shapes:
            if any(given[n] is not None for n in ("batch", "seq_len", "heads", "head_dim")):
                raise ValueError("give either --shapes or the problem flags, not both")
            return load_shapes(shapes)
        missing = [f"--{n.replace('_', '-')}" for n in ("batch", "seq_len", "heads", "head_dim") if given[n] is None]
        if missing:
            raise ValueError(f"missing {', '.join(missing)} (or give --shapes FILE)")
        return [spec_from_fields({k: v for k, v in given.items() if v is not None}, "flags")]
    except (ValueError, OSError) as exc:
        raise click.UsageError(str(exc)) from None


def worker_settings():
    """The multi-worker timings from the environment (autotune/workers.py), or a usage error naming the variable."""
    from autotune.workers import settings

    try:
        return settings()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


def open_store(db: str | None):
    """Open the results database or stop with a clear message (never a traceback)."""
    from autotune.workers import explain_open_failure
    from db import DatabaseError, Store
    from db.urls import default_url, resolve_url

    try:
        return Store(db, busy_timeout_s=worker_settings().busy_timeout_s)
    except DatabaseError as exc:
        message = str(exc)
    except Exception as exc:  # noqa: BLE001 - driver errors: locked, read-only, unreachable server
        message = f"cannot open the results database {db or '(default)'}: {exc}"
    with contextlib.suppress(Exception):
        message = explain_open_failure(resolve_url(db) if db else default_url(), message)
    raise click.ClickException(message)


@contextlib.contextmanager
def database_errors(store) -> Iterator[None]:
    """Turn database failures in the middle of work into one clear message; what was stored stays stored.

    Our own store raises SQLAlchemy errors or DatabaseError (a lock held past the busy timeout); Optuna wraps the
    same driver errors in StorageInternalError. All of them, and OS errors (a full disk), end the command here.
    """
    from optuna.exceptions import StorageInternalError
    from sqlalchemy.exc import SQLAlchemyError

    from autotune.workers import describe_database_error
    from db import DatabaseError
    from db.urls import display_url

    try:
        yield
    except (SQLAlchemyError, StorageInternalError, DatabaseError, OSError) as exc:
        raise click.ClickException(describe_database_error(exc, display_url(store.url))) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Autotune Pallas flash-attention kernels: search, store, inspect and ship the best configs."""


@main.command()
@problem_options
@click.option("--shapes", type=click.Path(exists=True, dir_okay=False), help="TOML or JSON file of problems.")
@click.option("--misses", "tune_misses", is_flag=True, help="Tune the keys the runtime missed, most frequent first.")
@click.option("--kernel", default=None, help="gpu | tpu | a module path (default: the platform's kernel).")
@click.option("--trials", type=click.IntRange(min=1), default=None,
              help="Total trials per problem's study, over all workers and resumptions [default: 30; grid: all].")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None, help="Seconds for this run.")
@click.option("--patience", type=click.IntRange(min=1), default=None, help="Stop after N trials without a better config.")
@click.option("--sampler", type=click.Choice(["tpe", "random", "grid", "cmaes"]), default="tpe", show_default=True)
@click.option("--seed", type=int, default=None, help="Seed of the sampler and the inputs.")
@click.option("--isolate", is_flag=True, help="Run each candidate in a child process (survives crashing candidates).")
@click.option("--trial-timeout", type=click.FloatRange(min=0, min_open=True), default=600.0, show_default=True,
              help="Seconds one candidate may take.")
@click.option("--samples", type=click.IntRange(min=3), default=None, help="Timing samples per candidate.")
@click.option("--no-xla", is_flag=True, help="Skip timing jax.nn.dot_product_attention for the summary.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--db", default=None, help=DB_HELP)
def search(shapes, tune_misses, kernel, trials, timeout, patience, sampler, seed, isolate, trial_timeout, samples,
           no_xla, quiet, db, **flags):
    """Find the fastest valid config for each problem and store it."""
    from autotune.device import current_device
    from autotune.kernels_registry import kernel_for_platform, load_kernel
    from autotune.search import AllCandidatesFailed, SearchOptions, search_problem
    from autotune.timing import TimingPolicy

    config = worker_settings()
    if isolate:  # parent and children share the accelerator: no process may grab most of its memory up front
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    device = current_device()
    kernel = kernel or kernel_for_platform(device.platform)
    try:
        kernel_module = load_kernel(kernel)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--kernel") from None
    specs = None if tune_misses else specs_from_flags(flags, shapes)  # bad input stops here, before any write
    store = open_store(db)
    if tune_misses:
        specs = missed_specs(store, kernel_module, device)
        if not specs:
            click.echo("No missed keys for this kernel and device: nothing to tune.")
            return
    timing = TimingPolicy(samples=samples) if samples else TimingPolicy()
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
    arguments = {k: v for k, v in dict(shapes=shapes, kernel=kernel, trials=trials, timeout=timeout,
                                       patience=patience, sampler=sampler, seed=seed, isolate=isolate,
                                       misses=tune_misses, **flags).items() if v not in (None, False)}
    with database_errors(store):
        run_id = store.start_run(host=device.host, device_kind=device.device_kind, platform=device.platform,
                                 jax_version=device.jax_version, arguments=arguments)
    click.echo(f"Tuning {len(specs)} problem(s) with the {kernel_module.NAME} kernel (version "
               f"{kernel_module.VERSION}) on {device.device_kind} [{device.platform}], results in {store.url}", err=True)
    results, failures = [], []
    started = time.monotonic()
    status = "failed"
    try:
        with database_errors(store):
            # Each problem of a list is tuned by one worker at a time (a claim in the database). A problem another
            # worker holds is come back to until it is done: if that worker dies, its claim goes stale after
            # $AUTOTUNE_CLAIM_TTL seconds and is taken over here, so every problem gets tuned.
            pending = list(enumerate(specs))
            told: set[int] = set()
            while pending:
                held = []
                for index, spec in pending:
                    remaining = None if timeout is None else timeout - (time.monotonic() - started)
                    if remaining is not None and remaining <= 0:
                        break
                    options = SearchOptions(trials=trials, timeout_s=remaining, patience=patience, sampler=sampler,
                                            seed=seed, documents=spec.documents or 3, isolate=isolate,
                                            trial_timeout_s=trial_timeout, timing=timing, compare_xla=not no_xla)
                    claim = _claim_name(kernel_module, spec, device, options) if len(specs) > 1 else None
                    with _claimed(store, claim, owner, config.claim_ttl_s, config.claim_beat_s) as mine:
                        if not mine:
                            if not store.claim_done(claim):
                                held.append((index, spec))
                            if index not in told:
                                told.add(index)
                                click.echo(f"Skipping problem {index + 1} for now: tuned or being tuned by another "
                                           "worker.", err=True)
                            continue
                        try:
                            results.append(search_problem(spec.problem, kernel_name=kernel, store=store,
                                                          device=device, options=options, run_id=run_id,
                                                          progress=not quiet))
                        except AllCandidatesFailed as exc:
                            failures.append(str(exc))
                else:
                    pending = held
                    if pending:
                        time.sleep(min(5.0, config.claim_beat_s))
                    continue
                click.echo("Time is up: the remaining problems are left for a later run.", err=True)
                break
        status = "failed" if failures else "ok"
    except KeyboardInterrupt:
        status = "interrupted"
        click.echo("\nInterrupted: every finished trial is stored; run the same command to resume.", err=True)
        sys.exit(130)
    finally:
        with contextlib.suppress(Exception):
            store.finish_run(run_id, status, "; ".join(failures))
    print_summary(results)
    if failures:
        raise click.ClickException("no valid config found:\n  " + "\n  ".join(failures))


def missed_specs(store, kernel_module, device) -> list[ProblemSpec]:
    """The missed keys of this kernel version on this device, most frequent first, as problems to tune."""
    from autotune.keys import problem_of

    specs = []
    for key, _count in store.misses():
        if (key.kernel, key.kernel_version, key.platform, key.device_kind) == (
                kernel_module.NAME, kernel_module.VERSION, device.platform, device.device_kind):
            specs.append(ProblemSpec(problem_of(key), 3 if key.segments else 0))
    return specs


def _claim_name(kernel_module, spec: ProblemSpec, device, options) -> str:
    from autotune.keys import make_key

    return f"shape:{make_key(kernel_module, spec.problem, device).digest()}:{options.sampler}:{options.trials}"


@contextlib.contextmanager
def _claimed(store, name: str | None, owner: str, ttl_s: float = 60.0, beat_s: float = 10.0) -> Iterator[bool]:
    """Hold a claim on one problem of a shapes list while it is tuned, with heartbeats; no claim for one problem.

    A claim whose heartbeat is older than `ttl_s` is stale (its worker died) and may be taken over."""
    if name is None:
        yield True
        return
    if store.claim_done(name) or not store.try_claim(name, owner, ttl_s=ttl_s):
        yield False
        return
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(beat_s):
            with contextlib.suppress(Exception):
                store.heartbeat_claim(name, owner)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    done = False
    try:
        yield True
        done = True
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            store.release_claim(name, owner, done=done)


def format_ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3f}"


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *rows)]
    for row in [headers, ["-" * w for w in widths], *rows]:
        click.echo("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())


def describe_problem(p) -> str:
    text = f"b{p.batch} q{p.q_len} kv{p.kv_len} h{p.heads}/{p.kv_heads} d{p.head_dim} {p.dtype}"
    return text + " causal" * p.causal + " seg" * p.segments + " +bwd" * p.backward


def table_config(config: dict, key) -> str:
    """A config for a table cell. A forward-only key's backward fields (bwd_*) are left out: they change nothing
    that runs. `--json` always has every field."""
    shown = {k: v for k, v in config.items() if key.backward or not k.startswith("bwd_")}
    return " ".join(f"{name}={value}" for name, value in shown.items())


def print_summary(results) -> None:
    if not results:
        return
    rows = []
    for r in results:
        rows.append([
            describe_problem(r.problem), table_config(r.best_config, r.key),
            format_ms(r.best_time_s), format_ms(r.default_time_s),
            f"{r.speedup:.2f}x" if r.speedup else "-", format_ms(r.xla_time_s),
            f"{r.trials_run}/{r.trials_failed}", f"{r.wall_s:.1f}",
        ])
    click.echo()
    print_table(["problem", "best config", "best ms", "default ms", "speedup", "xla ms", "trials/failed", "wall s"],
                rows)


def _register_optional_commands() -> None:
    """Add the inspection commands (list, show, export, import, prune, bench, report) where present."""
    import importlib

    for module in ("autotune.inspect_commands", "autotune.bench", "autotune.report"):
        try:
            loaded = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name == module:
                continue
            raise
        for command in getattr(loaded, "COMMANDS", ()):
            main.add_command(command)


_register_optional_commands()

if __name__ == "__main__":
    main()
