"""What every `autotune` command shares: the problem and filter flags, opening the database, clear errors, tables.

Bad input becomes a click usage error naming the flag before anything is compiled or written; a database that
cannot be opened or fails in the middle of work becomes one sentence (autotune/database_messages.py), never a
traceback.
"""
from __future__ import annotations

import contextlib
import json
import math
import re
from datetime import datetime, timezone
from typing import Any, Iterator

import click

from autotune.problem_fields import BY_NAME, FIELDS, REQUIRED, describe, flag_text
from autotune.shapes import FLAGS, ProblemSpec, load_shapes, spec_from_fields
from db.urls import default_url, display_url, mask_password, resolve_url, scrub, sqlite_file

DTYPE_CHOICES = BY_NAME["dtype"].choices
SHAPE_FLAGS = tuple(field.name for field in FIELDS if field.size)  # the flags that name a problem's shape


def _db_help() -> str:
    try:
        here = display_url(default_url())
    except ValueError:
        here = "(a malformed $AUTOTUNE_DB)"
    return ("Results database: an SQLite file path or a SQLAlchemy URL [default: $AUTOTUNE_DB if set, else the file "
            f"in the user cache; here: {here}].")


def db_option(func):
    """--db, with the full default path in its help."""
    return click.option("--db", default=None, help=_db_help())(func)


class FieldValue(click.ParamType):
    """A problem flag's value, parsed and bounded by its entry in the field table (autotune/problem_fields.py)."""

    def __init__(self, field) -> None:
        self.field = field
        self.name = field.kind

    def convert(self, value, param, ctx):
        from autotune.problem_fields import parse_value

        try:
            return parse_value(self.field, value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def _field_option(field, backward_help: str | None):
    """One problem flag, made from its table entry. Every flag defaults to None (not given), so a given flag can be
    told apart and applied to the problems of a shapes file; the table's default is named in the help."""
    text = backward_help if field.name == "backward" and backward_help else field.help
    if field.kind == "flag":
        return click.option(field.flag, field.name, is_flag=True, default=None, help=text)
    if field.kind in ("size", "count"):
        text += f" [{field.minimum:g}<=x<={field.maximum:.0f}]"
    elif field.kind == "window":
        text += f" [each side 0<=x<={field.maximum:.0f}]"
    elif field.kind == "number":
        text += f" [0<x<={field.maximum:g}]"
    if field.default is not None:
        text += f" [default: {field.default}]"
    if field.kind == "choice":
        return click.option(field.flag, field.name, type=click.Choice(field.choices), default=None, help=text)
    metavar = {"window": "N|LEFT,RIGHT", "number": "FLOAT", "size": "INTEGER", "count": "INTEGER"}[field.kind]
    return click.option(field.flag, field.name, type=FieldValue(field), default=None, metavar=metavar, help=text)


def problem_options(func=None, *, backward_help: str | None = None):
    """The flags that describe one problem, shared by search, show and bench: one per entry of the field table, named
    as in a shapes file."""

    def decorate(func):
        for field in reversed(FIELDS):
            func = _field_option(field, backward_help)(func)
        return func

    return decorate(func) if func is not None else decorate


def given_fields(params: dict) -> dict:
    """The problem flags given on the command line (a bool flag counts when set), as checked field values."""
    return {field.name: params[field.name] for field in FIELDS if params.get(field.name) not in (None, False)}


def given_flag_texts(params: dict) -> list[str]:
    """The problem flags given on the command line as typed ('--causal', '--window 16,0')."""
    return [flag_text(BY_NAME[name], value) for name, value in given_fields(params).items()]


def specs_from_flags(params: dict, shapes: str | None) -> list[ProblemSpec]:
    """The problems named by --shapes, or by the problem flags; UsageError naming what is wrong. Flags given beside
    --shapes apply to every problem of the file that does not set the field itself (said on stderr)."""
    given = given_fields(params)
    try:
        if shapes:
            specs = load_shapes(shapes, defaults=given)
            if given:
                flags = " ".join(given_flag_texts(params))
                click.echo(f"Applying {flags} to every problem of {click.format_filename(shapes)} (a problem's own "
                           "field wins).", err=True)
            return specs
        missing = [BY_NAME[n].flag for n in REQUIRED if n not in given]
        if missing:
            raise ValueError(f"missing {', '.join(missing)} (or give --shapes FILE)")
        return [spec_from_fields({}, FLAGS, defaults=given)]
    except (ValueError, OSError) as exc:
        raise click.UsageError(str(exc)) from None


def kernel_option_module(kernel: str | None, device):
    """The kernel module --kernel names (default: the platform's), or a usage error naming --kernel."""
    from autotune.kernel_protocol import kernel_for_platform, load_kernel

    try:
        return load_kernel(kernel or kernel_for_platform(device.platform))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--kernel") from None


def worker_settings():
    """The multi-worker timings from the environment (autotune/settings.py), or a usage error naming the variable."""
    from autotune.settings import settings

    try:
        return settings()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


def open_store(db: str | None, *, create: bool = True, read_only: bool = False):
    """Open the results database or stop with a clear message (never a traceback, never a password).
    `create=False` never makes a new database; `read_only` never writes at all (and works on read-only storage)."""
    from autotune.cli.database_messages import explain_open_failure
    from db import DatabaseError, Store

    try:  # a malformed --db or $AUTOTUNE_DB is bad input (exit 2), not a database that failed
        resolve_url(db) if db else default_url()
    except ValueError as exc:
        raise (click.BadParameter(str(exc), param_hint="--db") if db else click.UsageError(str(exc))) from None
    new_folder = _missing_folder(db) if create and not read_only else None
    try:
        store = Store(db, busy_timeout_s=worker_settings().busy_timeout_s, create=create, read_only=read_only)
        if new_folder is not None and new_folder.is_dir():
            click.echo(f"Note: created the folder {printable(new_folder)} for a new results database, as --db "
                       "names it (a typo? remove it and check --db).", err=True)
        if store.notice:
            click.echo(f"Note: {printable(store.notice)}", err=True)
        return store
    except DatabaseError as exc:
        message = str(exc)
    except Exception as exc:  # noqa: BLE001 - driver errors: locked, read-only, unreachable server
        shown = mask_password(db) if db else "(default)"
        message = f"cannot open the results database {shown}: {scrub(str(exc), db or '')}"
    with contextlib.suppress(Exception):
        message = explain_open_failure(resolve_url(db) if db else default_url(), message)
    raise click.ClickException(message)


def _missing_folder(db: str | None):
    """The folder of the SQLite file --db names when that folder does not exist yet (else None): opening the
    database creates it, which the user is told of, since a mistyped path would otherwise go unnoticed."""
    if db is None:
        return None
    path = sqlite_file(resolve_url(db))
    if path is None or path.parent.exists():
        return None
    return path.parent


@contextlib.contextmanager
def database_errors(store) -> Iterator[None]:
    """Turn database failures in the middle of work into one clear message; what was stored stays stored.

    Our own store raises SQLAlchemy errors or DatabaseError (a lock held past the busy timeout); Optuna wraps the
    same driver errors in StorageInternalError. All of them, and OS errors (a full disk), end the command here.
    """
    from optuna.exceptions import StorageInternalError
    from sqlalchemy.exc import SQLAlchemyError

    from autotune.cli.database_messages import describe_database_error
    from db import DatabaseError

    try:
        yield
    except (SQLAlchemyError, StorageInternalError, DatabaseError, OSError) as exc:
        if caused_by_ctrl_c(exc):  # Ctrl-C inside a commit: the driver's next words hide the interrupt
            raise KeyboardInterrupt from exc
        raise click.ClickException(scrub(describe_database_error(exc, display_url(store.url)), store.url)) from None


def caused_by_ctrl_c(exc: BaseException) -> bool:
    """Whether `exc` was raised while a KeyboardInterrupt was being handled (SQLAlchemy's "This transaction is
    closed" when Ctrl-C lands in the middle of a commit)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def missing_database(db: str | None):
    """The path of the SQLite file --db names if that file does not exist (else None)."""
    try:
        url = default_url() if db is None else resolve_url(db)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--db") from None
    path = sqlite_file(url)
    return path if path is not None and not path.exists() else None


def open_existing(db: str | None, *, write: bool = False):
    """Open an existing results database, read-only unless `write` (prune); it is never created or upgraded here
    (a missing, empty or Optuna-only one is an error), and a read-only one on read-only storage works."""
    path = missing_database(db)
    if path is not None:
        raise click.ClickException(f"no results database at {path} (run `autotune search` first, or pass --db)")
    return open_store(db, create=False, read_only=not write)


def where(store) -> str:
    """The database as messages name it (an SQLite file as its path, a password hidden)."""
    return printable(display_url(store.url))


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text) -> str:
    """`text` without control characters: a stored name or message must not move the cursor, recolour or
    retitle the user's terminal (escape sequences lose their ESC and show as plain text)."""
    return _CONTROL.sub("", str(text))


class Seconds(click.ParamType):
    """A positive, finite number of seconds up to MAX_SECONDS (`inf` and `nan` would never end a search)."""

    name = "seconds"

    def convert(self, value, param, ctx):
        from autotune.settings import MAX_SECONDS

        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        if not (number > 0 and math.isfinite(number) and number <= MAX_SECONDS):
            self.fail(f"must be a positive number of seconds up to {MAX_SECONDS:g}, got {value!r}", param, ctx)
        return number


# ---------------------------------------------------------------- which keys: --device, --kernel, --dtype, --causal


def filter_options(func):
    """--device, --kernel, --dtype and --causal/--no-causal: which keys a command looks at."""
    options = [
        click.option("--device", "device_kind", default=None, help="Only this device kind (as `list` shows it)."),
        click.option("--kernel", "kernel_filter", default=None,
                     help="Only this kernel: gpu | tpu | a module path | a stored kernel name."),
        click.option("--dtype", "dtype_filter", type=click.Choice(DTYPE_CHOICES), default=None,
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
    from autotune.kernel_protocol import BUILTIN, load_kernel

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


def require_bests(store, filters: dict[str, Any]) -> list:
    """The bests matching the filters, or a clear error (exit 1) when there are none."""
    with database_errors(store):
        bests = store.bests(**filters)
    if not bests:
        raise click.ClickException(f"no tuned results in {where(store)}{describe_filters(filters)}")
    return bests


# ---------------------------------------------------------------- words and tables


def format_ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3f}"


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    rows = clean_rows(rows)
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *rows)]
    for row in [headers, ["-" * w for w in widths], *rows]:
        click.echo("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())


def clean_rows(rows: list[list]) -> list[list[str]]:
    return [[printable(cell) for cell in row] for row in rows]


def describe_problem(p) -> str:
    """A problem or a key on one line (autotune/problem_fields.py)."""
    return describe(p)


def ordered_config(config: dict) -> dict:
    """A config's fields in one order everywhere (sorted by name), for tables and summaries."""
    return {name: config[name] for name in sorted(config)}


def table_config(config: dict, key) -> str:
    """A config for a table cell. A forward-only key's backward fields (bwd_*) are left out: they change nothing
    that runs. `--json` always has every field."""
    shown = {k: v for k, v in ordered_config(config).items() if key.backward or not k.startswith("bwd_")}
    return " ".join(f"{name}={value}" for name, value in shown.items())


def first_line(text: str | None, width: int | None = 70) -> str:
    """The first line of a message, cut to `width` characters (None: whole)."""
    if not text:
        return ""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if width is None or len(line) <= width else line[:width - 3] + "..."


def plural(count: int, word: str, words: str | None = None) -> str:
    return f"{count} {word if count == 1 else words or word + 's'}"


def when(moment: datetime | None) -> str:
    return "-" if moment is None else moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M")


def plain_number(value: float | None) -> float | str | None:
    """A float as strict JSON takes it: infinities (a NaN error is stored as +inf) become strings."""
    if value is None or math.isfinite(value):
        return value
    return "inf" if value > 0 else "-inf"


def echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, allow_nan=False))
