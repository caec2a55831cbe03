"""`autotune list`, `show`, `export`, `import` and `prune`: reading and curating the results database.

Everything here only reads or deletes what the search stored; nothing is compiled or timed. Tables are for people,
`--json` prints the same facts for scripts, and every "nothing there" case is one clear message with exit code 1.
"""
from __future__ import annotations

import json
import math
import re
import sys
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import click

from autotune.cli import (DB_HELP, table_config, database_errors, describe_problem, format_ms, open_store,
                          print_table, problem_options, specs_from_flags)

SHAPE_FLAGS = ("batch", "seq_len", "kv_seq_len", "heads", "kv_heads", "head_dim")

# ---------------------------------------------------------------- shared by list, export, import, bench and report


def filter_options(func):
    """--device, --kernel, --dtype and --causal/--no-causal: which keys a command looks at."""
    options = [
        click.option("--device", "device_kind", default=None, help="Only this device kind (as `list` shows it)."),
        click.option("--kernel", "kernel_filter", default=None,
                     help="Only this kernel: gpu | tpu | a module path | a stored kernel name."),
        click.option("--dtype", "dtype_filter", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
                     help="Only this dtype."),
        click.option("--causal/--no-causal", "causal_filter", default=None, help="Only causal / non-causal problems."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def kernel_name(value: str | None) -> str | None:
    """The stored kernel name for `gpu`, `tpu` or a module path; any other text is taken as a stored name."""
    if value is None:
        return None
    from autotune.kernels_registry import BUILTIN, load_kernel

    if value in BUILTIN or "." in value:
        try:
            return load_kernel(value).NAME
        except ValueError:
            return value
    return value


def key_filters(device_kind=None, kernel_filter=None, dtype_filter=None, causal_filter=None) -> dict[str, Any]:
    """The filter flags as keyword arguments of `Store.bests` and `export_document`."""
    return dict(device_kind=device_kind, kernel=kernel_name(kernel_filter), dtype=dtype_filter, causal=causal_filter)


def key_matches(key, filters: dict[str, Any]) -> bool:
    return all(value is None or getattr(key, name) == value for name, value in filters.items())


def describe_filters(filters: dict[str, Any]) -> str:
    named = [f"{name}={value}" for name, value in filters.items() if value is not None]
    return f" matching {', '.join(named)}" if named else ""


def where(store) -> str:
    """The database as messages name it (an SQLite file as its path, a password hidden)."""
    from db.urls import display_url

    return display_url(store.url)


def plural(count: int, word: str, words: str | None = None) -> str:
    return f"{count} {word if count == 1 else words or word + 's'}"


def when(moment: datetime | None) -> str:
    return "-" if moment is None else moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M")


def plain_number(value: float | None) -> float | str | None:
    """A float as strict JSON takes it: infinities (a NaN error is stored as +inf) become strings."""
    if value is None or math.isfinite(value):
        return value
    return "inf" if value > 0 else "-inf"


def best_json(best) -> dict[str, Any]:
    return {
        "id": best.id, "digest": best.key.digest(), "key": best.key.to_dict(), "problem": describe_problem(best.key),
        "config": best.config, "time_s": best.time_s, "default_time_s": best.default_time_s,
        "speedup": best.speedup, "trials": best.trials, "run_id": best.run_id,
        "updated_at": best.updated_at.isoformat(),
    }


def trial_json(trial) -> dict[str, Any]:
    return {
        "id": trial.id, "number": trial.number, "run_id": trial.run_id, "status": trial.status,
        "config": trial.config, "time_s": trial.time_s, "time_spread_s": trial.time_spread_s,
        "time_count": trial.time_count, "compile_s": trial.compile_s, "max_error": plain_number(trial.max_error),
        "error_class": trial.error_class, "error_message": trial.error_message,
        "created_at": trial.created_at.isoformat(),
    }


def echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, allow_nan=False))


def missing_database(db: str | None):
    """The path of the SQLite file --db names if that file does not exist (else None)."""
    from db import default_url, resolve_url
    from db.urls import sqlite_file

    try:
        url = default_url() if db is None else resolve_url(db)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--db") from None
    path = sqlite_file(url)
    return path if path is not None and not path.exists() else None


def open_existing(db: str | None):
    """Open the results database for reading; a missing SQLite file is an error here, never silently created."""
    path = missing_database(db)
    if path is not None:
        raise click.ClickException(f"no results database at {path} (run `autotune search` first, or pass --db)")
    return open_store(db)


def require_bests(store, filters: dict[str, Any]) -> list:
    """The bests matching the filters, or a clear error (exit 1) when there are none."""
    with database_errors(store):
        bests = store.bests(**filters)
    if not bests:
        raise click.ClickException(f"no tuned results in {where(store)}{describe_filters(filters)}")
    return bests


# ---------------------------------------------------------------- list


@click.command("list")
@filter_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--db", default=None, help=DB_HELP)
def list_command(device_kind, kernel_filter, dtype_filter, causal_filter, as_json, db):
    """One row per tuned key, with its speedup.

    Each row: device, kernel, problem, best config, its time, the default config's time, speedup, trials, when.
    """
    store = open_existing(db)
    bests = require_bests(store, key_filters(device_kind, kernel_filter, dtype_filter, causal_filter))
    if as_json:
        echo_json([best_json(b) for b in bests])
        return
    rows = [[str(b.id), b.key.device_kind, f"{b.key.kernel}@{b.key.kernel_version}", describe_problem(b.key),
             table_config(b.config, b.key), format_ms(b.time_s), format_ms(b.default_time_s),
             f"{b.speedup:.2f}x" if b.speedup else "-", str(b.trials), when(b.updated_at)] for b in bests]
    print_table(["id", "device", "kernel", "problem", "best config", "best ms", "default ms", "speedup", "trials",
                 "updated (UTC)"], rows)


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
    from autotune.kernels_registry import kernel_for_platform, load_kernel

    if all(flags.get(n) is None for n in SHAPE_FLAGS):
        raise click.UsageError("name a key: --id N (from `autotune list`) or the problem flags as for `search`")
    spec = specs_from_flags(flags, None)[0]
    device = current_device()
    try:
        module = load_kernel(kernel or kernel_for_platform(device.platform))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--kernel") from None
    key = make_key(module, spec.problem, device)
    return key, store.get_best(key)


def no_results_message(store, key) -> str:
    """Why a key named by flags shows nothing, with a hint when the same problem was tuned elsewhere."""
    text = (f"no results for {describe_problem(key)} with the {key.kernel} kernel (version {key.kernel_version}) on "
            f"{key.device_kind} [{key.platform}], jax {key.jax_version}, in {where(store)}")
    shape = ("batch", "q_len", "kv_len", "heads", "kv_heads", "head_dim", "dtype", "causal", "segments", "backward")
    others = [b for b in store.bests(kernel=key.kernel)
              if all(getattr(b.key, name) == getattr(key, name) for name in shape)]
    if others:
        ids = ", ".join(str(b.id) for b in others)
        text += f"; the same problem has results on another device, kernel or jax version: --id {ids}"
    return text


def varying_fields(trials) -> list[str]:
    """The config fields whose values differ between trials (all fields if none do): what the table shows."""
    names = list(dict.fromkeys(name for t in trials for name in t.config))
    varying = [n for n in names if len({json.dumps(t.config.get(n)) for t in trials}) > 1]
    return varying or names


def first_line(text: str | None, width: int = 70) -> str:
    if not text:
        return ""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= width else line[:width - 3] + "..."


@click.command("show")
@problem_options
@click.option("--kernel", default=None, help="gpu | tpu | a module path (default: the platform's kernel).")
@click.option("--id", "best_id", type=int, default=None, help="The key with this id in `autotune list`.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@click.option("--db", default=None, help=DB_HELP)
def show_command(kernel, best_id, as_json, db, **flags):
    """One key in full: its best and every trial.

    Select the key by the problem flags (as for `search`, on this device) or by --id from `autotune list`. Every
    trial is shown with its config, status, time and spread, compile time and error; failure classes are counted.
    """
    store = open_existing(db)
    with database_errors(store):
        key, best = selected_key(store, best_id, kernel, flags)
        trials = store.trials(key)
        if best is None and not trials:
            raise click.ClickException(no_results_message(store, key))
    trials.sort(key=lambda t: (t.number is None, t.number if t.number is not None else 0, t.id))
    statuses = Counter(t.status for t in trials)
    failures = {status: n for status, n in statuses.items() if status != "ok"}
    if as_json:
        echo_json({"digest": key.digest(), "key": key.to_dict(), "problem": describe_problem(key),
                   "best": best_json(best) if best else None, "trials": [trial_json(t) for t in trials],
                   "status_counts": dict(statuses), "failures": failures})
        return
    click.echo(f"key        {key.digest()}" + (f"  (id {best.id})" if best else ""))
    click.echo(f"kernel     {key.kernel} @ {key.kernel_version}")
    click.echo(f"device     {key.device_kind} [{key.platform}], jax {key.jax_version}")
    click.echo(f"problem    {describe_problem(key)}")
    if best:
        speedup = f", {best.speedup:.2f}x" if best.speedup else ""
        click.echo(f"best       {table_config(best.config, key)}")
        click.echo(f"           {format_ms(best.time_s)} ms (default {format_ms(best.default_time_s)} ms{speedup}), "
                   f"{best.trials} trials, updated {when(best.updated_at)} UTC")
    else:
        click.echo("best       none stored (no candidate passed, or the search has not finished)")
    fields = varying_fields(trials) if trials else []
    click.echo(f"\n{len(trials)} trial(s):")
    rows = [[str(t.number if t.number is not None else "-"), t.status,
             " ".join(f"{n}={t.config.get(n)}" for n in fields), format_ms(t.time_s), format_ms(t.time_spread_s),
             "-" if t.compile_s is None else f"{t.compile_s:.2f}",
             "-" if t.max_error is None else f"{t.max_error:.2g}",
             first_line(f"{t.error_class}: {t.error_message}" if t.error_class else t.error_message)]
            for t in trials]
    if rows:
        print_table(["#", "status", "config", "ms", "spread ms", "compile s", "max err", "error"], rows)
    summary = ", ".join(f"{status} {n}" for status, n in sorted(failures.items(), key=lambda x: -x[1]))
    click.echo(f"\nfailures: {summary or 'none'}")


# ---------------------------------------------------------------- export / import


@click.command("export")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@filter_options
@click.option("--db", default=None, help=DB_HELP)
def export_command(file, device_kind, kernel_filter, dtype_filter, causal_filter, db):
    """Write tuned results as a versioned JSON document.

    Only bests travel (what the runtime needs); FILE '-' writes to stdout.
    """
    from db import export_document

    store = open_existing(db)
    filters = key_filters(device_kind, kernel_filter, dtype_filter, causal_filter)
    require_bests(store, filters)
    with database_errors(store):
        document = export_document(store, **filters)
    text = json.dumps(document, indent=2, allow_nan=False) + "\n"
    if file == "-":
        click.echo(text, nl=False)
    else:
        try:
            with open(file, "w", encoding="utf-8") as handle:
                handle.write(text)
        except OSError as exc:
            raise click.ClickException(f"cannot write {file}: {exc.strerror or exc}") from None
    click.echo(f"Exported {len(document['records'])} result(s) from {where(store)} to "
               f"{'stdout' if file == '-' else file}", err=True)


@click.command("import")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@filter_options
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
@click.option("--db", default=None, help=DB_HELP)
def import_command(file, device_kind, kernel_filter, dtype_filter, causal_filter, as_json, db):
    """Merge an exported JSON document into the database.

    Per key the faster result wins; the whole document is checked before anything is written. FILE '-' is stdin.
    """
    from db import DatabaseError
    from db.transfer import parse_document

    try:
        text = sys.stdin.read() if file == "-" else Path(file).read_text(encoding="utf-8")
        document = json.loads(text)
    except OSError as exc:
        raise click.ClickException(f"cannot read {file}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise click.ClickException(f"{file} is not a JSON document: {exc}") from None
    try:
        offers = parse_document(document)
    except DatabaseError as exc:
        raise click.ClickException(f"{file}: {exc}") from None
    filters = key_filters(device_kind, kernel_filter, dtype_filter, causal_filter)
    chosen = [offer for offer in offers if key_matches(offer.key, filters)]
    store = open_store(db)
    with database_errors(store):
        stored = store.put_bests(chosen) if chosen else []
    counts = {"records": len(offers), "selected": len(chosen), "imported": sum(stored),
              "kept_existing": len(stored) - sum(stored)}
    if as_json:
        echo_json(counts)
        return
    skipped = f", {len(offers) - len(chosen)} left out by the filters" if len(chosen) < len(offers) else ""
    click.echo(f"Imported {counts['imported']} of {len(offers)} result(s) into {where(store)}; "
               f"{counts['kept_existing']} kept the faster result already there{skipped}.")


# ---------------------------------------------------------------- prune


def parse_moment(text: str) -> datetime:
    """An ISO date or date-time (UTC when no zone is given), or a number of days ago like '30d'."""
    days = re.fullmatch(r"\s*(\d+)\s*d\s*", text)
    if days:
        return datetime.now(timezone.utc) - timedelta(days=int(days.group(1)))
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise click.BadParameter(f"expected a date like 2025-01-31, a date-time, or '30d'; got {text!r}",
                                 param_hint="--older-than") from None
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment


def pruned_digests(store, filters: dict[str, Any], older_than: datetime | None) -> list[str]:
    """The digests of the keys `Store.prune` removes for these filters: their Optuna studies go with them."""
    from sqlalchemy import select

    from db.schema import BestRow, KeyRow

    query = select(KeyRow.digest).where(*[getattr(KeyRow, n) == v for n, v in filters.items() if v is not None])
    if older_than is not None:
        query = query.join(BestRow, BestRow.key_id == KeyRow.id).where(BestRow.updated_at < older_than)
    with store.engine.connect() as connection:
        return list(connection.scalars(query))


def optuna_studies(store, digests: list[str]) -> tuple[Any, list[str]]:
    """Optuna's storage in this database and which of the digests have a study there (none: no Optuna tables)."""
    from sqlalchemy import inspect

    if not digests or not inspect(store.engine).has_table("studies"):
        return None, []
    from autotune.search import optuna_storage

    storage = optuna_storage(store)
    found = []
    for digest in digests:
        try:
            storage.get_study_id_from_name(digest)
            found.append(digest)
        except KeyError:
            pass
    return storage, found


def describe_counts(counts: dict[str, int]) -> str:
    return (f"{plural(counts['keys'], 'key')} with {plural(counts['bests'], 'best')}, "
            f"{plural(counts['trials'], 'trial')}, {plural(counts['misses'], 'miss row')} and "
            f"{plural(counts['optuna_studies'], 'Optuna study', 'Optuna studies')}")


@click.command("prune")
@click.option("--device", "device_kind", default=None, help="Results of this device kind.")
@click.option("--kernel", "kernel_filter", default=None, help="Results of this kernel (gpu | tpu | module | name).")
@click.option("--kernel-version", default=None, help="Results of this kernel version (e.g. an old build).")
@click.option("--jax-version", default=None, help="Results measured under this jax version.")
@click.option("--older-than", default=None, help="Bests last updated before this date (2025-01-31) or '30d' ago.")
@click.option("--dry-run", is_flag=True, help="Only say what would be removed.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask before deleting.")
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
@click.option("--db", default=None, help=DB_HELP)
def prune_command(device_kind, kernel_filter, kernel_version, jax_version, older_than, dry_run, yes, as_json, db):
    """Remove results by filter (asks unless --yes).

    Removes the keys matching every filter given, with their bests, trials, runtime misses and Optuna studies.
    """
    filters = dict(device_kind=device_kind, kernel=kernel_name(kernel_filter), kernel_version=kernel_version,
                   jax_version=jax_version)
    cutoff = parse_moment(older_than) if older_than else None
    if cutoff is None and all(v is None for v in filters.values()):
        raise click.UsageError("prune needs a filter: --device, --kernel, --kernel-version, --jax-version or "
                               "--older-than")
    store = open_existing(db)
    with database_errors(store):
        counts = store.prune(**filters, older_than=cutoff, dry_run=True)
        storage, studies = optuna_studies(store, pruned_digests(store, filters, cutoff))
    counts["optuna_studies"] = len(studies)
    described = describe_filters({**filters, "older_than": older_than})
    if not counts["keys"]:
        if as_json:
            echo_json({"removed": False, **counts})
        else:
            click.echo(f"Nothing in {where(store)}{described}: no rows removed.")
        return
    summary = describe_counts(counts)
    if dry_run:
        if as_json:
            echo_json({"removed": False, **counts})
        else:
            click.echo(f"Would remove {summary} from {where(store)}{described}.")
        return
    if not yes:
        click.confirm(f"Remove {summary} from {where(store)}{described}?", abort=True, err=True)
    with database_errors(store):
        counts = store.prune(**filters, older_than=cutoff)
        for name in studies:
            try:
                storage.delete_study(storage.get_study_id_from_name(name))
            except KeyError:  # deleted meanwhile by another process
                pass
    counts["optuna_studies"] = len(studies)
    if as_json:
        echo_json({"removed": True, **counts})
    else:
        click.echo(f"Removed {describe_counts(counts)} from {where(store)}.")


COMMANDS = [list_command, show_command, export_command, import_command, prune_command]
