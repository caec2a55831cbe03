"""Moving tuned results between databases as a JSON document (e.g. from a GPU box to a shared store).

Only bests travel: they are what the runtime needs, and trials stay with the run that made them. Importing checks
the whole document before writing anything, so a bad record never leaves half an import behind; the document is
plain data (nothing in it is evaluated), and merging keeps the faster result per key, exactly like `put_best`.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from db.errors import ImportValidationError
from db.records import BestOffer, TuningKey
from db.store import Store
from db.validation import check_datetime, check_int, check_json_object, check_time, utc_now

FORMAT = "pallas-autotune-results"
FORMAT_VERSION = 1
_DOCUMENT_FIELDS = ("format", "version", "exported_at", "records")
_RECORD_FIELDS = ("key", "config", "time_s", "default_time_s", "trials", "updated_at")


def export_document(store: Store, *, device_kind: str | None = None, kernel: str | None = None,
                    dtype: str | None = None, causal: bool | None = None) -> dict[str, Any]:
    """The bests matching every given filter, as a JSON-ready document."""
    records = [{"key": best.key.to_dict(), "config": best.config, "time_s": best.time_s,
                "default_time_s": best.default_time_s, "trials": best.trials,
                "updated_at": best.updated_at.isoformat()}
               for best in store.bests(device_kind=device_kind, kernel=kernel, dtype=dtype, causal=causal)]
    return {"format": FORMAT, "version": FORMAT_VERSION, "exported_at": utc_now().isoformat(), "records": records}


def import_document(store: Store, document: Any) -> dict[str, int]:
    """Merge a document's records into `store` (the faster result wins per key); all or nothing.

    Returns {"imported": records stored, "kept_existing": records that lost to a result already there (or to a
    faster record earlier in the same document)}. Raises ImportValidationError naming the record and field.
    """
    offers = parse_document(document)
    stored = store.put_bests(offers)
    imported = sum(stored)
    return {"imported": imported, "kept_existing": len(stored) - imported}


def parse_document(document: Any) -> list[BestOffer]:
    """Check a whole document and turn its records into offers; the first problem found is raised."""
    if not isinstance(document, Mapping):
        raise ImportValidationError(f"an import document must be a JSON object, got {type(document).__name__}")
    _check_fields("the document", document, _DOCUMENT_FIELDS)
    if document["format"] != FORMAT:
        raise ImportValidationError(f"the document's format is {document['format']!r}, expected {FORMAT!r}")
    if document["version"] != FORMAT_VERSION or isinstance(document["version"], bool):
        raise ImportValidationError(
            f"the document's format version is {document['version']!r}; this pallas-autotune reads version "
            f"{FORMAT_VERSION}")
    try:
        check_datetime("exported_at", document["exported_at"])
    except ValueError as exc:
        raise ImportValidationError(f"the document's {exc}") from None
    records = document["records"]
    if not isinstance(records, list):
        raise ImportValidationError(f"the document's records must be a list, got {type(records).__name__}")
    return [_parse_record(index, record) for index, record in enumerate(records)]


def _parse_record(index: int, record: Any) -> BestOffer:
    where = f"record {index}"
    if not isinstance(record, Mapping):
        raise ImportValidationError(f"{where} must be an object, got {type(record).__name__}")
    _check_fields(where, record, _RECORD_FIELDS)
    checks = {
        "key": lambda value: TuningKey.from_dict(value),
        "config": lambda value: check_json_object("config", value),
        "time_s": lambda value: check_time("time_s", value, positive=True),
        "default_time_s": lambda value: check_time("default_time_s", value, optional=True, positive=True),
        "trials": lambda value: check_int("trials", value, minimum=0),
        "updated_at": lambda value: check_datetime("updated_at", value),
    }
    values: dict[str, Any] = {}
    for field, check in checks.items():
        try:
            values[field] = check(record[field])
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
