"""`autotune list` and `autotune show`: what the search stored, one row per key or one key in full.

Everything here only reads; nothing is compiled or timed. Tables are for people, `--json` prints the same facts for
scripts, and every "nothing there" case is one clear message with exit code 1.
"""
from __future__ import annotations

import json
from collections import Counter
from typing import Any

import click

from autotune.cli.common import (SHAPE_FLAGS, database_errors, db_option, describe_problem, echo_json,
                                      describe_filters, filter_options, first_line, format_ms, key_filters,
                                      key_matches, kernel_option_module,
                                      open_existing, ordered_config, plain_number, print_table, printable,
                                      problem_options, require_bests, specs_from_flags, table_config, when, where)
from autotune.cli.compile_listing import compile_status, figures_heading, figures_text, target_key
from autotune.cli.winners import others_text, winner_note
from autotune.cli.predicted_listing import (PREDICTED_HEADERS, predicted_best_json, predicted_cells,
                                            print_predicted_bests, ranking_json)
from autotune.compile.ranking import describe_prediction, predicted_bests, rank_trials
from autotune.keys import PROBLEM_FIELDS


def best_json(best) -> dict[str, Any]:
    return {
        "source": "measured", "id": best.id, "digest": best.key.digest(), "key": best.key.to_dict(),
        "problem": describe_problem(best.key),
        "config": ordered_config(best.config), "time_s": best.time_s, "default_time_s": best.default_time_s,
        "speedup": best.speedup, "trials": best.trials, "run_id": best.run_id,
        "updated_at": best.updated_at.isoformat(), "implementation": best.implementation, "times": best.times,
    }


def trial_json(trial) -> dict[str, Any]:
    return {
        "id": trial.id, "number": trial.number, "run_id": trial.run_id, "status": trial.status,
        "config": ordered_config(trial.config), "time_s": trial.time_s, "time_spread_s": trial.time_spread_s,
        "time_count": trial.time_count, "compile_s": trial.compile_s, "max_error": plain_number(trial.max_error),
        "error_class": trial.error_class, "error_message": trial.error_message,
        "created_at": trial.created_at.isoformat(), "figures": trial.figures,
    }


# ---------------------------------------------------------------- list


@click.command("list")
@filter_options
@click.option("--misses", "show_misses", is_flag=True,
              help="List the keys the runtime asked for without a tuned config instead, with how often and why.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@db_option
def list_command(device_kind, kernel_filter, dtype_filter, causal_filter, show_misses, as_json, db):
    """One row per tuned key, with its speedup.

    Each row: device, kernel, problem, the winning implementation (pallas: the tuned kernel; xla or cudnn: jax.nn's),
    the best kernel config, the winner's time, the default config's time, speedup, the others' times, trials, when.
    With --misses: one row per missed key, most frequent first, with the reason when the tuned kernels could not
    run the call at all (it ran XLA), which tuning cannot fix.
    """
    store = open_existing(db)
    if show_misses:
        list_misses(store, key_filters(device_kind, kernel_filter, dtype_filter, causal_filter), as_json)
        return
    filters = key_filters(device_kind, kernel_filter, dtype_filter, causal_filter)
    with database_errors(store):
        bests, predicted = store.bests(**filters), predicted_bests(store, filters)
    if not bests and not predicted:
        require_bests(store, filters)  # the one "nothing there" message, exit 1
    if as_json:
        echo_json([best_json(b) for b in bests] + [predicted_best_json(r) for r in predicted])
        return
    rows = [[str(b.id), b.key.device_kind, f"{b.key.kernel}@{b.key.kernel_version}", describe_problem(b.key),
             b.implementation, table_config(b.config, b.key), format_ms(b.time_s), format_ms(b.default_time_s),
             f"{b.speedup:.2f}x" if b.speedup else "-", others_text(b.times, b.implementation), str(b.trials),
             when(b.updated_at)] for b in bests]
    if rows:
        print_table(["id", "device", "kernel", "problem", "winner", "best config", "best ms", "default ms",
                     "speedup", "others ms", "trials", "updated (UTC)"], rows)
    if predicted:
        print_predicted_bests(predicted, after_measured=bool(rows))


def list_misses(store, filters: dict[str, Any], as_json: bool) -> None:
    """The runtime's misses matching the filters; exit code 1 when there are none."""
    with database_errors(store):
        records = [r for r in store.miss_records() if key_matches(r.key, filters)]
    if not records:
        raise click.ClickException(f"no missed keys{describe_filters(filters)} in {where(store)}")
    if as_json:
        echo_json([{"digest": r.key.digest(), "key": r.key.to_dict(), "problem": describe_problem(r.key),
                    "count": r.count, "fallbacks": r.fallbacks, "last_seen": r.last_seen.isoformat(),
                    "reason": r.reason} for r in records])
        return
    rows = [[r.key.device_kind, f"{r.key.kernel}@{r.key.kernel_version}", describe_problem(r.key), str(r.count),
             str(r.fallbacks), when(r.last_seen), printable(miss_why(r))] for r in records]
    print_table(["device", "kernel", "problem", "misses", "ran XLA", "last (UTC)", "why"], rows)


def miss_why(record) -> str:
    """What a missed key's row says: the tunable misses (search --misses tunes them) and, apart, why calls of it
    ran XLA."""
    parts = ["no tuned config: autotune search --misses tunes it"] if record.count else []
    if record.fallbacks and record.reason:
        parts.append(f"ran XLA: {first_line(record.reason)}")
    return "; ".join(parts)


# ---------------------------------------------------------------- show


def selected_key(store, best_id: int | None, kernel: str | None, flags: dict):
    """(key, best) named by --id or by the problem flags; a clear error when nothing is stored under it."""
    if best_id is not None:
        if kernel or any(flags.get(n) is not None for n in SHAPE_FLAGS):
            raise click.UsageError("give either --id or the problem flags, not both")
        best = store.best_by_id(best_id)
        if best is None:
            raise click.ClickException(f"no tuned result with id {best_id} in {where(store)} "
                                       "(`autotune list` shows the ids)")
        return best.key, best
    from autotune.device import current_device
    from autotune.keys import make_key

    if all(flags.get(n) is None for n in SHAPE_FLAGS):
        raise click.UsageError("name a key: --id N (from `autotune list`) or the problem flags as for `search`")
    spec = specs_from_flags(flags, None)[0]
    device = current_device()
    module = kernel_option_module(kernel, device)
    key = make_key(module, spec.problem, device)
    return key, store.get_best(key)


def no_results_message(store, key) -> str:
    """Why a key named by flags shows nothing, with a hint when the same problem was tuned elsewhere."""
    text = (f"no results for {describe_problem(key)} with the {key.kernel} kernel (version {key.kernel_version}) on "
            f"{key.device_kind} [{key.platform}], jax {key.jax_version}, in {where(store)}")
    others = [b for b in store.bests(kernel=key.kernel)
              if all(getattr(b.key, name) == getattr(key, name) for name in PROBLEM_FIELDS)]
    if others:
        ids = ", ".join(str(b.id) for b in others)
        text += f"; the same problem has results on another device, kernel or jax version: --id {ids}"
    return text


def default_config(key) -> dict | None:
    """The config the key's kernel starts every search with (the first trial), when the kernel is a built-in one
    of the stored version; None otherwise (nothing is marked)."""
    from autotune.keys import problem_of
    from autotune.kernel_protocol import BUILTIN, load_kernel

    for name in BUILTIN:
        module = load_kernel(name)
        if (module.NAME, module.VERSION) == (key.kernel, key.kernel_version):
            kind = None if key.platform == "cpu-interpret" else key.device_kind
            try:
                return module.Config.default(problem_of(key), device_kind=kind).to_dict()
            except (ValueError, TypeError):
                return None
    return None


def trial_marks(config: dict, default: dict | None, best) -> str:
    """' (default)', ' (stored best)' or both, for a trial whose config is the kernel's default or the stored best."""
    marks = [name for name, other in (("default", default), ("stored best", best.config if best else None))
             if other is not None and all(config.get(k) == v for k, v in other.items())]
    return f" ({', '.join(marks)})" if marks else ""


def varying_fields(trials, key) -> list[str]:
    """The config fields whose values differ between trials (all fields if none do): what the table shows, in the
    order of every config table; a forward-only key's backward fields are left out, as in `list`."""
    names = sorted({name for t in trials for name in t.config if key.backward or not name.startswith("bwd_")})
    varying = [n for n in names if len({json.dumps(t.config.get(n)) for t in trials}) > 1]
    return varying or names


@click.command("show")
@problem_options(backward_help="The forward plus backward key (as tuned with `search --backward`).")
@click.option("--kernel", default=None, help="gpu | tpu | a module path (default: the platform's kernel).")
@click.option("--id", "best_id", type=int, default=None, help="The key with this id in `autotune list`.")
@click.option("--target", "target_name", default=None,
              help="The compile-only results for this target (`search --target`) of the problem flags.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@db_option
def show_command(kernel, best_id, target_name, as_json, db, **flags):
    """One key in full: its best and every trial.

    Select the key by the problem flags (as for `search`, on this device) or by --id from `autotune list`. Every
    trial is shown with its config, status, time and spread, compile time and error; failure classes are counted.
    """
    store = open_existing(db)
    with database_errors(store):
        if target_name is not None:
            if best_id is not None:
                raise click.UsageError("give either --id or --target with the problem flags, not both")
            key, best = target_key(store, target_name, kernel, flags), None
        else:
            key, best = selected_key(store, best_id, kernel, flags)
        trials = store.trials(key)
        if best is None and not trials:
            raise click.ClickException(no_results_message(store, key))
    trials.sort(key=lambda t: (t.number is None, t.number if t.number is not None else 0, t.id))
    ranking = rank_trials(key, trials) if target_name is not None else None
    if ranking is not None:  # the compile-only trials by predicted time, unranked ones after them
        ranks = {entry.trial_id: entry.rank for entry in ranking.entries}
        trials.sort(key=lambda t: ranks.get(t.id, len(ranks) + 1))
    statuses = Counter(t.status for t in trials)
    failures = {status: n for status, n in statuses.items() if status not in ("ok", "compiled")}
    if as_json:
        shown = {"digest": key.digest(), "key": key.to_dict(), "problem": describe_problem(key),
                 "best": best_json(best) if best else None, "trials": [trial_json(t) for t in trials],
                 "status_counts": dict(statuses), "failures": failures}
        if target_name is not None:
            shown["predicted"] = ranking_json(ranking)
        echo_json(shown)
        return
    click.echo(f"key        {key.digest()}" + (f"  (id {best.id})" if best else ""))
    click.echo(printable(f"kernel     {key.kernel} @ {key.kernel_version}"))
    click.echo(printable(f"device     {key.device_kind} [{key.platform}], jax {key.jax_version}"))
    click.echo(f"problem    {describe_problem(key)}")
    compile_only = any(t.figures is not None for t in trials)
    if compile_only:
        click.echo("best       none measured: compile-only results (nothing was timed; the device search skips the "
                   "configs the compiler rejected and, by default, those that spill)")
        if ranking is not None and ranking.best is not None:
            click.echo(printable(f"predicted  {table_config(ranking.best.config, key)}"))
            click.echo(f"           {describe_prediction(ranking.best.prediction)}; best of "
                       f"{len(ranking.entries)} ranked by PREDICTED time")
    elif best:
        speedup = f", {best.speedup:.2f}x" if best.speedup else ""
        kernel_config = table_config(best.config, key)
        click.echo(printable(f"best       {best.implementation} (jax.nn.dot_product_attention); the kernel's best "
                             f"config: {kernel_config}" if best.baseline_won else f"best       {kernel_config}"))
        click.echo(f"           {format_ms(best.time_s)} ms (default {format_ms(best.default_time_s)} ms{speedup}), "
                   f"{best.trials} trials, updated {when(best.updated_at)} UTC")
        click.echo(f"winner     {winner_note(key.platform, best.implementation, best.times)}")
    else:
        click.echo("best       none stored (no candidate passed, or the search has not finished)")
    fields = varying_fields(trials, key) if trials else []
    default = default_config(key)
    click.echo(f"\n{len(trials)} trial(s):")
    rows = [[str(t.number if t.number is not None else "-"), compile_status(t) if compile_only else t.status,
             " ".join(f"{n}={t.config.get(n)}" for n in fields) + trial_marks(t.config, default, best),
             format_ms(t.time_s), format_ms(t.time_spread_s),
             "-" if t.compile_s is None else f"{t.compile_s:.2f}",
             "-" if t.max_error is None else f"{t.max_error:.2g}",
             first_line(f"{t.error_class}: {t.error_message}" if t.error_class else t.error_message, width=None)]
            for t in trials]
    if rows and compile_only:  # no times: the compiler's figures per kernel and the predicted time instead
        rows = [row[:2] + row[2:3] + predicted_cells(ranking, t) + [row[5], figures_text(t.figures), row[7]]
                for row, t in zip(rows, trials)]
        print_table(["#", "status", "config", *PREDICTED_HEADERS, "compile s", figures_heading(key), "error"], rows)
    elif rows:
        print_table(["#", "status", "config", "ms", "spread ms", "compile s", "max err", "error"], rows)
    summary = ", ".join(f"{status} {n}" for status, n in sorted(failures.items(), key=lambda x: -x[1]))
    click.echo(f"\nfailures: {summary or 'none'}")
