"""`autotune export`, `import` and `prune`: moving results between databases and removing old ones.

Export writes the bests (what the runtime needs) and the compile-only trials as a versioned JSON document; import checks the whole document
before writing and keeps the faster result per key; prune removes whole keys, with their Optuna studies.
"""
from __future__ import annotations

import json
import re
import sys
from datetime import datetime, timedelta, timezone
from typing import Any

import click

from autotune.cli.common import (database_errors, db_option, describe_filters, echo_json, filter_options,
                                      kernel_name, key_filters, key_matches, open_existing, open_store, plural,
                                      require_bests, where)


@click.command("export")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@filter_options
@db_option
def export_command(file, device_kind, kernel_filter, dtype_filter, causal_filter, db):
    """Write tuned results as a versioned JSON document.

    The bests travel (what the runtime needs), and the compile-only trials of `search --target` (what a device
    search starts from). A document with compile-only trials is format version 2; one without them is version 1,
    which older versions read. FILE '-' writes to stdout.
    """
    from db import export_document

    store = open_existing(db)
    filters = key_filters(device_kind, kernel_filter, dtype_filter, causal_filter)
    with database_errors(store):
        document = export_document(store, **filters)
    if not document.get("compile_trials"):
        require_bests(store, filters)
    text = json.dumps(document, indent=2, allow_nan=False) + "\n"
    if file == "-":
        click.echo(text, nl=False)
    else:
        try:
            with open(file, "w", encoding="utf-8") as handle:
                handle.write(text)
        except OSError as exc:
            raise click.ClickException(f"cannot write {file}: {exc.strerror or exc}") from None
    compiled = len(document.get("compile_trials", []))
    click.echo(f"Exported {len(document['records'])} result(s)"
               + (f" and {compiled} compile-only trial(s)" if compiled else "")
               + f" from {where(store)} to {'stdout' if file == '-' else file}", err=True)


@click.command("import")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@filter_options
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
@db_option
def import_command(file, device_kind, kernel_filter, dtype_filter, causal_filter, as_json, db):
    """Merge an exported JSON document into the database.

    Per key the faster result wins; the whole document is checked before anything is written. FILE '-' is stdin.
    """
    from autotune.config_check import check_any_kernel, check_fields_any_kernel
    from db import DatabaseError
    from db.compile_transfer import merge_compile_trials, parse_compile_trials
    from db.transfer import MAX_DOCUMENT_BYTES, merge_offers, parse_document, read_document

    try:
        if file == "-":
            text = sys.stdin.read(MAX_DOCUMENT_BYTES + 1)
        else:
            with open(file, "rb") as handle:
                text = handle.read(MAX_DOCUMENT_BYTES + 1)
        document = read_document(text)
        offers = parse_document(document, check=check_any_kernel)
        compiled = parse_compile_trials(document, check=check_any_kernel, fields_check=check_fields_any_kernel)
    except OSError as exc:
        raise click.ClickException(f"cannot read {file}: {exc.strerror or exc}") from None
    except DatabaseError as exc:
        raise click.ClickException(f"{file}: {exc}") from None
    filters = key_filters(device_kind, kernel_filter, dtype_filter, causal_filter)
    chosen = [offer for offer in offers if key_matches(offer.key, filters)]
    store = open_store(db)
    with database_errors(store):
        stored = merge_offers(store, chosen, check=check_any_kernel) if chosen else []
        compiled = [t for t in compiled if key_matches(t.key, filters)]
        added = merge_compile_trials(store, compiled) if compiled else 0
    counts = {"records": len(offers), "selected": len(chosen), "imported": sum(stored),
              "kept_existing": len(stored) - sum(stored)}
    if "compile_trials" in document:  # a version 2 document (db/compile_transfer.py)
        counts.update(compile_trials=len(compiled), compile_trials_added=added)
    if as_json:
        echo_json(counts)
        return
    skipped = f", {len(offers) - len(chosen)} left out by the filters" if len(chosen) < len(offers) else ""
    click.echo(f"Imported {counts['imported']} of {len(offers)} result(s) into {where(store)}; "
               f"{counts['kept_existing']} kept the faster result already there{skipped}.")
    if compiled:
        click.echo(f"Added {added} of {len(compiled)} compile-only trial(s) (the others were there already).")


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
    """Optuna's storage in this database and which of the digests have a study there (none: no Optuna tables).
    Close the storage with `close_storage`."""
    from autotune.optuna_storage import existing_studies, has_optuna_tables, open_storage

    if not digests or not has_optuna_tables(store.engine):
        return None, []
    storage = open_storage(store.url)
    return storage, existing_studies(storage, digests)


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
@db_option
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
    from autotune.optuna_storage import close_storage

    store = open_existing(db, write=True)
    storage = None
    try:
        with database_errors(store):
            counts = store.prune(**filters, older_than=cutoff, dry_run=True)
            storage, studies = optuna_studies(store, pruned_digests(store, filters, cutoff))
        _prune(store, storage, studies, counts, filters, cutoff, older_than, dry_run, yes, as_json)
    finally:
        close_storage(storage)
        store.close()


def _prune(store, storage, studies, counts, filters, cutoff, older_than, dry_run, yes, as_json) -> None:
    from autotune.optuna_storage import delete_study

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
        if sys.stdin is None or sys.stdin.closed:  # no input to answer on (e.g. `<&-`): never delete unasked
            raise click.ClickException(f"refusing to remove {summary} without --yes: there is no input to confirm "
                                       "on")
        click.confirm(f"Remove {summary} from {where(store)}{described}?", abort=True, err=True)
    with database_errors(store):
        counts = store.prune(**filters, older_than=cutoff)
        for name in studies:
            delete_study(storage, name)  # nothing if another process deleted it meanwhile
    counts["optuna_studies"] = len(studies)
    if as_json:
        echo_json({"removed": True, **counts})
    else:
        click.echo(f"Removed {describe_counts(counts)} from {where(store)}.")
