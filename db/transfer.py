"""Moving tuned results between databases as a JSON document (e.g. from a GPU box to a shared store).

Only bests travel: they are what the runtime needs, and trials stay with the run that made them. Importing checks
the whole document before writing anything, so a bad record never leaves half an import behind; the document is
plain data (nothing in it is evaluated), and merging keeps the faster result per key, exactly like `put_best`.

The text itself is distrusted too: its size and nesting depth are bounded before it is parsed, duplicate keys in
an object are refused (JSON readers disagree on which one wins), and NaN/Infinity are not JSON. Every record is
checked by the same rules as the kernels through the caller's `ConfigCheck`. Merging goes in batches that each
hold the write lock for a moment, so a concurrent search is never locked out by a large import; a merge cut short
keeps what it stored, and importing the same document again finishes it.
"""
from __future__ import annotations

import itertools
import json
import re
import time
from collections.abc import Iterable, Mapping
from typing import Any

from db.compile_transfer import compile_records
from db.errors import ImportValidationError
from db.records import IMPLEMENTATIONS, KERNEL_IMPLEMENTATION, BestOffer, ConfigCheck, TuningKey, check_winner
from db.store import Store
from db.validation import (MAX_JSON_DEPTH, check_choice, check_datetime, check_int, check_json_object, check_time,
                           utc_now)

FORMAT = "pallas-autotune-results"
FORMAT_VERSION = 1
COMPILE_FORMAT_VERSION = 2  # a document that also carries compile-only trials (db/compile_transfer.py)
WINNER_FORMAT_VERSION = 3  # records also carry the winning implementation and every one's time; compile_trials optional
_DOCUMENT_FIELDS = ("format", "version", "exported_at", "records")
_OPTIONAL_FIELDS = ("compile_trials",)  # version 2 (required there) and 3
_RECORD_FIELDS = ("key", "config", "time_s", "default_time_s", "trials", "updated_at")
_WINNER_FIELDS = ("implementation", "times")  # version 3 records only
MAX_DOCUMENT_BYTES = 256 * 2**20  # about half a million records; far past any real export
_MAX_TEXT_DEPTH = MAX_JSON_DEPTH + 3  # the document, its records list and a record hold the configs
BATCH_SECONDS = 0.5  # longest a merge holds the write lock in one go
BATCH_PAUSE_S = 0.12  # then lets go this long: longer than SQLite's longest busy-wait sleep (100 ms), so any
                      # process waiting for the lock gets it


def export_document(store: Store, *, device_kind: str | None = None, kernel: str | None = None,
                    dtype: str | None = None, causal: bool | None = None) -> dict[str, Any]:
    """The bests matching every given filter, as a JSON-ready document: version 1 while every best is a kernel win
    timed alone (what older versions read), 2 with compile-only trials, 3 once any best carries a baseline's time
    or won by one (its records then name the winner and every implementation's time)."""
    bests = store.bests(device_kind=device_kind, kernel=kernel, dtype=dtype, causal=causal)
    winners = any(best.baseline_won or set(best.times) != {KERNEL_IMPLEMENTATION} for best in bests)
    records = [{"key": best.key.to_dict(), "config": best.config, "time_s": best.time_s,
                "default_time_s": best.default_time_s, "trials": best.trials,
                "updated_at": best.updated_at.isoformat(),
                **({"implementation": best.implementation, "times": best.times} if winners else {})}
               for best in bests]
    document = {"format": FORMAT, "version": WINNER_FORMAT_VERSION if winners else FORMAT_VERSION,
                "exported_at": utc_now().isoformat(), "records": records}
    compiled = compile_records(store, device_kind=device_kind, kernel=kernel, dtype=dtype, causal=causal)
    if compiled:  # only then version 2 (or 3): a document without them stays readable by older versions
        document.update(version=WINNER_FORMAT_VERSION if winners else COMPILE_FORMAT_VERSION,
                        compile_trials=compiled)
    return document


def import_document(store: Store, document: Any, *, check: ConfigCheck | None = None) -> dict[str, int]:
    """Merge a document's records into `store` (the faster result wins per key, and a stored best `check` refuses
    is replaced); nothing is written unless every record passes the checks.

    Returns {"imported": records stored, "kept_existing": records that lost to a result already there (or to a
    faster record earlier in the same document)}. Raises ImportValidationError naming the record and field.
    """
    offers = parse_document(document, check=check)
    stored = merge_offers(store, offers, check=check)
    imported = sum(stored)
    return {"imported": imported, "kept_existing": len(stored) - imported}


def read_document(text: str | bytes) -> Any:
    """Parse a document's JSON text with bounded size and depth, refusing duplicate keys and NaN/Infinity."""
    size = len(text.encode("utf-8") if isinstance(text, str) else text)
    if size > MAX_DOCUMENT_BYTES:
        raise ImportValidationError(f"the document is {size} bytes; at most {MAX_DOCUMENT_BYTES} are read")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ImportValidationError(f"the document is not UTF-8 text ({exc})") from None
    depth = _nesting_depth(text)
    if depth > _MAX_TEXT_DEPTH:
        raise ImportValidationError(f"the document is nested {depth} levels deep; at most {_MAX_TEXT_DEPTH} are "
                                    "read")
    try:
        return json.loads(text, object_pairs_hook=unique_keys, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise ImportValidationError(f"the text is not a JSON document: {exc}") from None
    except (ValueError, RecursionError) as exc:  # a duplicate key, NaN, or an integer of thousands of digits
        raise ImportValidationError(f"the document is not valid JSON: {exc}") from None


# A JSON string, unrolled (runs of plain characters, then one escape) so that a long string costs no memory per
# character: the alternation `(?:[^"\\]|\\.)*` kept a backtracking entry per character (8.6 GB for one 71 MB string).
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')


def _nesting_depth(text: str) -> int:
    """How deep arrays and objects nest, strings ignored: checked before parsing, which recurses once per level."""
    brackets = re.findall(r"[\[\]{}]", _STRING.sub("", text))
    steps = itertools.accumulate(1 if bracket in "[{" else -1 for bracket in brackets)
    return max(steps, default=0)


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object (json's `object_pairs_hook`), refusing a key given twice: json keeps the last silently."""
    mapping: dict[str, Any] = {}
    for name, value in pairs:
        if name in mapping:
            raise ValueError(f"duplicate key {name!r}: the key {name!r} appears twice in one object")
        mapping[name] = value
    return mapping


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def merge_offers(store: Store, offers: Iterable[BestOffer], *, check: ConfigCheck | None = None) -> list[bool]:
    """`store.put_bests` in batches that hold the write lock about BATCH_SECONDS each, with a pause between them
    (SQLite only: PostgreSQL queues waiting writers itself); one bool per offer, in order."""
    offers = list(offers)
    results: list[bool] = []
    size, start = 64, 0
    pause = BATCH_PAUSE_S if store.engine.dialect.name == "sqlite" else 0.0
    while start < len(offers):
        if start:
            time.sleep(pause)
        began = time.monotonic()
        results += store.put_bests(offers[start:start + size], check=check)
        start += size
        took = max(time.monotonic() - began, 1e-6)
        size = max(1, min(4096, int(size * BATCH_SECONDS / took)))  # aim the next batch at BATCH_SECONDS
    return results


def parse_document(document: Any, *, check: ConfigCheck | None = None) -> list[BestOffer]:
    """Check a whole document and turn its records into offers; the first problem found is raised. `check` applies
    the kernels' rules to each record's config (db/ knows no kernels)."""
    if not isinstance(document, Mapping):
        raise ImportValidationError(f"an import document must be a JSON object, got {type(document).__name__}")
    _check_fields("the document", {k: v for k, v in document.items() if k not in _OPTIONAL_FIELDS}, _DOCUMENT_FIELDS)
    if document["format"] != FORMAT:
        raise ImportValidationError(f"the document's format is {document['format']!r}, expected {FORMAT!r}")
    version = document["version"]
    carries = all(name in document for name in _OPTIONAL_FIELDS)
    if version not in (FORMAT_VERSION, COMPILE_FORMAT_VERSION, WINNER_FORMAT_VERSION) or isinstance(version, bool):
        raise ImportValidationError(
            f"the document's format version is {version!r}; this pallas-autotune reads versions "
            f"{FORMAT_VERSION}, {COMPILE_FORMAT_VERSION} and {WINNER_FORMAT_VERSION}")
    if version == FORMAT_VERSION and any(name in document for name in _OPTIONAL_FIELDS):
        raise ImportValidationError(f"a version {FORMAT_VERSION} document has no compile_trials (version "
                                    f"{COMPILE_FORMAT_VERSION} has)")
    if version == COMPILE_FORMAT_VERSION and not carries:
        raise ImportValidationError(f"the document's format version is {COMPILE_FORMAT_VERSION} but it has no "
                                    "compile_trials (a version 2 document is an export with compile-only trials)")
    try:
        check_datetime("exported_at", document["exported_at"])
    except ValueError as exc:
        raise ImportValidationError(f"the document's {exc}") from None
    records = document["records"]
    if not isinstance(records, list):
        raise ImportValidationError(f"the document's records must be a list, got {type(records).__name__}")
    fields = _RECORD_FIELDS + (_WINNER_FIELDS if version == WINNER_FORMAT_VERSION else ())
    return [_parse_record(index, record, check, fields) for index, record in enumerate(records)]


def _parse_record(index: int, record: Any, check: ConfigCheck | None, fields: tuple[str, ...]) -> BestOffer:
    """One record as an offer; a record of version 1 or 2 (no winner fields) is a kernel win timed alone."""
    where = f"record {index}"
    if not isinstance(record, Mapping):
        raise ImportValidationError(f"{where} must be an object, got {type(record).__name__}")
    _check_fields(where, record, fields)
    field_checks = {
        "key": lambda value: TuningKey.from_dict(value),
        "config": lambda value: check_json_object("config", value),
        "time_s": lambda value: check_time("time_s", value, positive=True),
        "default_time_s": lambda value: check_time("default_time_s", value, optional=True, positive=True),
        "trials": lambda value: check_int("trials", value, minimum=0),
        "updated_at": lambda value: check_datetime("updated_at", value),
    }
    values: dict[str, Any] = {}
    for field, field_check in field_checks.items():
        try:
            values[field] = field_check(record[field])
        except ValueError as exc:
            raise ImportValidationError(f"{where}, field {field!r}: {exc}") from None
    if check is not None:
        try:
            check(values["key"], values["config"])
        except (ValueError, TypeError) as exc:
            raise ImportValidationError(f"{where}, field 'config': {exc}") from None
    if "implementation" in record:
        winner_checks = {
            "implementation": lambda value: check_choice("implementation", value, IMPLEMENTATIONS),
            "times": lambda value: check_winner(values["implementation"], value, values["time_s"]),
        }
        for field, field_check in winner_checks.items():
            try:
                values[field] = field_check(record[field])
            except ValueError as exc:
                raise ImportValidationError(f"{where}, field {field!r}: {exc}") from None
    return BestOffer(**values)


def _check_fields(where: str, mapping: Mapping[str, Any], expected: tuple[str, ...]) -> None:
    unknown = sorted((str(name) for name in mapping if name not in expected))
    if unknown:
        raise ImportValidationError(f"{where} has unknown field(s): {', '.join(unknown)}")
    missing = [name for name in expected if name not in mapping]
    if missing:
        raise ImportValidationError(f"{where} is missing field(s): {', '.join(missing)}")
