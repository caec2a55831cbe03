"""`autotune search`: find the fastest valid config for each problem and store it.

The command reads the flags (or a shapes file, or the runtime's misses), opens the database, starts a run row, then
takes the problems the scheduler (autotune/search/scheduler.py) hands it, each claimed while it runs the search
(autotune/search/loop.py) on it. The summary at the end says what was stored and why.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import signal
import socket
import sys
import threading
import uuid
from typing import Callable

import click

from autotune.cli.common import (Seconds, database_errors, db_option, describe_problem, format_ms, given_flag_texts,
                                      kernel_option_module, open_store, print_table, problem_options,
                                      specs_from_flags, table_config, where, worker_settings)
from autotune.cli.winners import others_text, winner_note
from autotune.options import DEFAULT_MARGIN, SAMPLERS
from autotune.settings import MAX_TRIALS
from autotune.shapes import ProblemSpec, spec_from_fields
from db.urls import PASSWORD_HINT, resolve_url, shareable_url
from autotune.problem_fields import DEFAULT_DOCUMENTS, lookup_arguments

_CTRL_C_SEEN = threading.Event()  # once set, a failure on the way out is the interrupt's doing, not the database's


def _stop_on_first_ctrl_c(_signum, _frame) -> None:
    """The first Ctrl-C stops the search (KeyboardInterrupt); more while it shuts down are ignored, so the run is
    recorded and the process ends cleanly instead of with tracebacks from its cleanup or an abort."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _CTRL_C_SEEN.set()
    raise KeyboardInterrupt


def _quiet_swallowed_interrupt(unraisable) -> None:
    """A first Ctrl-C that lands in a callback Python cannot raise from (e.g. a garbage-collection hook) is lost
    there; the flag it set still stops the search after the problem at hand, so say nothing of it here."""
    if not (_CTRL_C_SEEN.is_set() and isinstance(unraisable.exc_value, KeyboardInterrupt)):
        sys.__unraisablehook__(unraisable)


def _beat(store, run_id: int) -> None:
    with contextlib.suppress(Exception):  # a missed beat only risks the run being called crashed later
        store.heartbeat_run(run_id)


@click.command("search")
@problem_options
@click.option("--shapes", type=click.Path(exists=True, dir_okay=False),
              help="TOML or JSON file of problems. Problem flags given beside it apply to each of its problems that "
                   "does not set the field itself (--backward tunes the backward of every one).")
@click.option("--misses", "tune_misses", is_flag=True, help="Tune the keys the runtime missed, most frequent first.")
@click.option("--kernel", default=None, help="gpu | tpu | a module path (default: the platform's kernel).")
@click.option("--trials", type=click.IntRange(min=1, max=MAX_TRIALS), default=None,
              help="Total trials per problem's study, over all workers and resumptions [default: 30; grid: all].")
@click.option("--timeout", type=Seconds(), default=None, help="Seconds for this run.")
@click.option("--patience", type=click.IntRange(min=1, max=MAX_TRIALS), default=None,
              help="Stop after N trials without a better config.")
@click.option("--sampler", type=click.Choice(SAMPLERS), default="tpe", show_default=True,
              help="How candidates are chosen (grid: every valid config once).")
@click.option("--seed", type=click.IntRange(min=0, max=2**32 - 1), default=None,
              help="Seed of the sampler and the inputs.")
@click.option("--isolate", is_flag=True, help="Run each candidate in a child process (survives crashing candidates).")
@click.option("--trial-timeout", type=Seconds(), default=600.0, show_default=True,
              help="Seconds one candidate may take.")
@click.option("--samples", type=click.IntRange(min=3, max=10_000), default=None,
              help="Timing samples per candidate (each a synchronised run of back-to-back calls; the median is "
                   "kept) [default: 7].")
@click.option("--no-xla", is_flag=True,
              help="Leave jax.nn.dot_product_attention (XLA, and cuDNN on a GPU) out of the final re-timing: the "
                   "tuned kernel then wins by default.")
@click.option("--baseline-margin", type=click.FloatRange(min=0, max=1, max_open=True), default=DEFAULT_MARGIN,
              show_default=True,
              help="How much faster than the best kernel config XLA or cuDNN must be to win the key (0.03 = 3%).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--target", "target_text", default=None, metavar="NAME|all|list",
              help="Compile-only search for a target this machine lacks (h100, v5e, ...; a comma list, 'all', or "
                   "'list' to show them): every outcome and its compiler figures are stored, nothing is timed.")
@click.option("--allow-spills", is_flag=True,
              help="Also time configs that spilled registers in a compile-only search for this device kind.")
@db_option
def search_command(shapes, tune_misses, kernel, trials, timeout, patience, sampler, seed, isolate, trial_timeout,
                   samples, no_xla, baseline_margin, quiet, target_text, allow_spills, db, **flags):
    """Find the fastest valid config for each problem and store it (or, with --target, compile every candidate
    for a target ahead of time)."""
    if target_text is not None:
        from autotune.cli.compile_search import run_target_command

        run_target_command(target_text=target_text, kernel=kernel, shapes=shapes, flags=flags,
                           tune_misses=tune_misses, allow_spills=allow_spills, trials=trials, sampler=sampler,
                           seed=seed, trial_timeout=trial_timeout, quiet=quiet, db=db)
        return
    from autotune.device import current_device
    from autotune.kernel_protocol import kernel_for_platform
    from autotune.options import SearchOptions, TimingPolicy
    from autotune.heartbeat import Heartbeat
    from autotune.search.loop import AllCandidatesFailed, Search
    from autotune.search.scheduler import ClaimTimings, TurnKind, claim_name, claimed_problems
    from autotune.kernel_protocol import device_kind_of, refusals

    config = worker_settings()
    if isolate:  # parent and children share the accelerator: no process may grab most of its memory up front
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    device = current_device()
    kernel_text = kernel  # as the user gave it, for the summary's lookup hint
    kernel = kernel or kernel_for_platform(device.platform)
    kernel_module = kernel_option_module(kernel, device)  # the only load: the search and the claims use it
    specs = None if tune_misses else specs_from_flags(flags, shapes)  # bad input stops here, before any write
    for index, spec in enumerate(specs or []):
        refused = refusals(kernel_module, spec.problem, device_kind=device_kind_of(device))
        if refused:
            entry = f"problem {index + 1}: " if shapes else ""
            raise click.UsageError(f"{entry}the {kernel_module.NAME} kernel cannot run {describe_problem(spec.problem)}"
                                   f": its default config, where every search starts, is invalid "
                                   f"({'; '.join(refused)})")
    store = open_store(db)
    if tune_misses:
        specs = missed_specs(store, kernel_module, device, on_skip=lambda line: click.echo(line, err=True))
        if not specs:
            click.echo("No missed keys for this kernel and device: nothing to tune.")
            return
    options = SearchOptions(trials=trials, patience=patience, sampler=sampler, seed=seed, isolate=isolate,
                            trial_timeout_s=trial_timeout, timing=TimingPolicy(samples=samples) if samples
                            else TimingPolicy(), compare_xla=not no_xla, baseline_margin=baseline_margin,
                            allow_spills=allow_spills)
    if device.interpret:  # before the run starts: its matmul is not work a Ctrl-C must unwind
        from autotune.cli.interpret_notice import announce_cpu_search

        announce_cpu_search(specs, trials=trials, timing=options.timing, shapes=shapes,
                            given_flags=given_flag_texts(flags))
    claims = [claim_name(kernel_module, spec, device, options) if len(specs) > 1 else None for spec in specs]
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
    arguments = {k: v for k, v in dict(shapes=shapes, kernel=kernel, trials=trials, timeout=timeout,
                                       patience=patience, sampler=sampler, seed=seed, isolate=isolate,
                                       misses=tune_misses, **flags).items() if v not in (None, False)}
    with database_errors(store):
        store.mark_crashed_runs(config.claim_ttl_s)  # searches killed without a word (SIGKILL, a lost machine)
        run_id = store.start_run(host=device.host, device_kind=device.device_kind, platform=device.platform,
                                 jax_version=device.jax_version, arguments=arguments)
    run_beat = Heartbeat(config.claim_beat_s, lambda: _beat(store, run_id), name="run heartbeat").start()
    previous_sigint = None
    if threading.current_thread() is threading.main_thread():
        previous_sigint = signal.signal(signal.SIGINT, _stop_on_first_ctrl_c)
        sys.unraisablehook = _quiet_swallowed_interrupt
    click.echo(f"Tuning {len(specs)} problem(s) with the {kernel_module.NAME} kernel (version "
               f"{kernel_module.VERSION}) on {device.device_kind} [{device.platform}], results in {where(store)}",
               err=True)

    status, results, failures = "failed", [], []
    _CTRL_C_SEEN.clear()
    try:
        turns = claimed_problems(specs, claims, store=store, owner=owner, timeout_s=timeout,
                                 timings=ClaimTimings(config.claim_ttl_s, config.claim_beat_s))
        with database_errors(store), contextlib.closing(turns):
            for turn in turns:
                if turn.kind is TurnKind.HELD:
                    click.echo(f"Skipping problem {turn.index + 1} for now: tuned or being tuned by another "
                               "worker.", err=True)
                elif turn.kind is TurnKind.OUT_OF_TIME:
                    click.echo("Time is up: the remaining problems are left for a later run.", err=True)
                else:
                    one = dataclasses.replace(options, timeout_s=turn.remaining_s,
                                              documents=turn.spec.documents or DEFAULT_DOCUMENTS)
                    try:
                        results.append(Search(turn.spec.problem, kernel_module, kernel, store, device, one,
                                              run_id=run_id, progress=not quiet).run())
                    except AllCandidatesFailed as exc:  # this problem's failure, not the list's
                        failures.append(str(exc))
                if _CTRL_C_SEEN.is_set():  # an interrupt swallowed where it landed still stops the list
                    raise KeyboardInterrupt
        if _CTRL_C_SEEN.is_set():
            raise KeyboardInterrupt
        status = "failed" if failures else "ok"
    except (KeyboardInterrupt, click.ClickException) as exc:
        if isinstance(exc, click.ClickException) and not _CTRL_C_SEEN.is_set():
            raise
        status = "interrupted"  # a database error after Ctrl-C (a commit cut short) is the interrupt too
        click.echo("\nInterrupted: every finished trial is stored; run the same command to resume.", err=True)
        sys.exit(130)
    finally:
        run_beat.stop()
        if previous_sigint is not None and signal.getsignal(signal.SIGINT) is _stop_on_first_ctrl_c:
            signal.signal(signal.SIGINT, previous_sigint)  # no Ctrl-C came: the caller's handling again
        sys.unraisablehook = sys.__unraisablehook__
        with contextlib.suppress(Exception):
            store.finish_run(run_id, status, "; ".join(failures))
        store.close()
    print_summary(results, db, kernel_text)
    if failures:
        raise click.ClickException("no valid config found:\n  " + "\n  ".join(failures))


def missed_specs(store, kernel_module, device, on_skip: Callable[[str], None] | None = None) -> list[ProblemSpec]:
    """The missed keys of this kernel version on this device, most frequent first, as problems to tune; calls the
    kernels could not run at all (a bias, a mask: counted apart, as fallbacks) are left out, tuning cannot help. A
    key the flags or a shapes file could not name (past their limits), or that the kernel cannot run at all (its
    default config is invalid), is skipped with one line to `on_skip`: the other keys are still tuned."""
    from autotune.kernel_protocol import device_kind_of, refusals
    from autotune.keys import problem_of

    specs = []
    for record in store.miss_records():
        key = record.key
        if not record.count or (key.kernel, key.kernel_version, key.platform, key.device_kind) != (
                kernel_module.NAME, kernel_module.VERSION, device.platform, device.device_kind):
            continue
        try:  # the limits of the flags and shapes files
            spec = spec_from_fields(_user_fields(key), f"missed key {key.digest()[:8]}")
            refused = refusals(kernel_module, spec.problem, device_kind=device_kind_of(device))
            if refused:
                raise ValueError(f"missed key {key.digest()[:8]}: the {kernel_module.NAME} kernel cannot run it: "
                                 f"its default config, where every search starts, is invalid ({'; '.join(refused)})")
        except ValueError as exc:
            if on_skip is not None:
                on_skip(f"Skipping {describe_problem(problem_of(key))}: {exc}")
            continue
        specs.append(spec)
    return specs


def _user_fields(key) -> dict:
    """A key's problem as the fields of a shapes file (what the flags and shapes checks take)."""
    window = None if key.window_left is None and key.window_right is None else [
        -1 if side is None else side for side in (key.window_left, key.window_right)]
    return {"batch": key.batch, "seq_len": key.q_len, "kv_seq_len": key.kv_len, "heads": key.heads,
            "kv_heads": key.kv_heads, "head_dim": key.head_dim, "dtype": key.dtype, "causal": key.causal,
            "segments": 3 if key.segments else 0, "backward": key.backward, "window": window,
            "softcap": key.softcap, "lengths": key.lengths}


def stored_word(result) -> str:
    """The summary's `stored` cell: whether this worker's winner became the key's stored best."""
    if result.budget_met_before:
        return "earlier"
    return "yes" if result.stored else "no: a faster one is kept"


def print_summary(results, db: str | None, kernel: str | None = None) -> None:
    """What was stored per problem, and why it can differ from the progress bar's best trial; then what to run
    next: `show`, and the `autotune.lookup` call that finds the stored key (every field of it, and the --kernel
    given)."""
    if not results:
        return
    rows = []
    for r in results:
        rows.append([
            describe_problem(r.problem), r.implementation, table_config(r.best_config, r.key),
            format_ms(r.best_time_s), format_ms(r.default_time_s),
            f"{r.speedup:.2f}x" if r.speedup else "-", others_text(r.times, r.implementation),
            f"{r.trials_run}/{r.trials_failed}", f"{r.wall_s:.1f}", stored_word(r),
        ])
    click.echo()
    print_table(["problem", "winner", "best config", "best ms", "default ms", "speedup", "others ms",
                 "trials/failed", "wall s", "stored"], rows)
    click.echo()
    for r in results:
        if r.ahead_of_time:
            click.echo(f"{describe_problem(r.problem)}: {r.ahead_of_time}")
        label = f"#{r.best_id}" if r.best_id is not None else describe_problem(r.problem)
        click.echo(f"{label}: winner {winner_note(r.key.platform, r.implementation, r.times)}")
        if r.predicted_rank:
            click.echo(f"{describe_problem(r.problem)}: {r.predicted_rank}")
    if any(r.stored for r in results):
        click.echo("Stored: the winner of the final re-timing, where the top configs and the default ran interleaved "
                   "on the same inputs; the trial times, measured while other candidates compiled, are what the "
                   "progress bar showed (so the stored time can differ from the fastest trial's).")
    for r in results:
        label = f"#{r.best_id}" if r.best_id is not None else describe_problem(r.problem)
        if r.budget_met_before:
            click.echo(f"{label}: the study already has its {r.trials_run} trials; nothing searched. Shown: the best "
                       "stored before (raise --trials to search further).")
        elif not r.stored:
            click.echo(f"{label}: this worker's winner ({table_config(r.best_config, r.key)}, "
                       f"{format_ms(r.best_time_s)} ms) was not kept: the database already held a faster result "
                       f"(another worker's, or an earlier run's), which stays the stored best (autotune show --id "
                       f"{r.best_id}).")
    # A secret in the URL is never printed: the hints show the URL without it, and say how to give it instead.
    shown, secret_left_out = (None, False) if db is None else shareable_url(resolve_url(db))
    db_flag = "" if shown is None else f" --db {shlex.quote(shown)}"
    ids = [str(r.best_id) for r in results if r.best_id is not None]
    if ids:
        click.echo(f"Next: autotune show --id {ids[0]}{db_flag}   (all results: autotune list{db_flag})")
        r = next(r for r in results if r.best_id is not None)
        db_arg = "" if shown is None else f"autotune.configure(db={shown!r}); "
        kernel_arg = "" if kernel is None else f", kernel={kernel!r}"
        click.echo(f"In Python: {db_arg}autotune.lookup({lookup_arguments(r.key)}{kernel_arg})")
        if secret_left_out:
            click.echo(f"(In both, {PASSWORD_HINT}.)")
