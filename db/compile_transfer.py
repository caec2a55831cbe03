"""Compile-only trials in an export document, so a sweep made on one machine seeds the device search on another.

A document of format version 2 may carry `compile_trials`: the trials of compile-only keys (platform "gpu-compile"
or "tpu-compile"), each with its key, config, outcome and compiler figures. They are checked as strictly as bests,
against the schema the compile path writes (db/figures.py), before anything is written, and merged into the trials table only where the key does not already hold a trial of
the same config with the same outcome, so importing a document twice adds nothing. (Optuna's study of the key is
not rebuilt on import: the device search reads our table; a compile-only search there records what it adds.)
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from db.errors import ImportValidationError
from db.figures import check_figures, check_flat_config
from db.records import COMPILE_PLATFORMS, ConfigCheck, TuningKey
from db.store import Store
from db.validation import check_choice, check_text, check_time

COMPILE_STATUSES = ("compiled", "resource_exhausted", "compile_error")
_FIELDS = ("key", "config", "status", "error_class", "error_message", "compile_s", "figures")
MAX_MESSAGE = 4000  # an imported error message is cut to this many characters


@dataclass(frozen=True)
class CompileTrial:
    """One compile-only trial as a document carries it."""

    key: TuningKey
    config: dict[str, Any]
    status: str
    error_class: str | None
    error_message: str | None
    compile_s: float | None
    figures: dict[str, Any] | None


def compile_records(store: Store, *, device_kind: str | None = None, kernel: str | None = None,
                    dtype: str | None = None, causal: bool | None = None) -> list[dict[str, Any]]:
    """The compile-only trials matching every given filter, as document records (oldest first)."""
    records = []
    for platform in COMPILE_PLATFORMS:
        for key in store.keys(platform=platform, kernel=kernel, device_kind=device_kind):
            if (dtype is not None and key.dtype != dtype) or (causal is not None and key.causal != causal):
                continue
            for t in store.trials(key):
                records.append({"key": key.to_dict(), "config": t.config, "status": t.status,
                                "error_class": t.error_class, "error_message": t.error_message,
                                "compile_s": t.compile_s, "figures": t.figures})
    return records


def parse_compile_trials(document: Mapping[str, Any], *, check: ConfigCheck | None = None,
                         fields_check: ConfigCheck | None = None) -> list[CompileTrial]:
    """The document's compile-only trials, every field checked against what the compile path writes
    (ImportValidationError naming the record): a flat config of integers (`check` judges a compiled one by the
    kernels' rules; `fields_check` any one by its kernel's fields only, since a failure's config may be one the
    rules now refuse), and figures of db.figures' schema."""
    records = document.get("compile_trials", [])
    if not isinstance(records, list):
        raise ImportValidationError(f"the document's compile_trials must be a list, got {type(records).__name__}")
    return [_parse(index, record, check, fields_check) for index, record in enumerate(records)]


def _parse(index: int, record: Any, check: ConfigCheck | None, fields_check: ConfigCheck | None) -> CompileTrial:
    where = f"compile trial {index}"
    if not isinstance(record, Mapping):
        raise ImportValidationError(f"{where} must be an object, got {type(record).__name__}")
    unknown = sorted(str(name) for name in record if name not in _FIELDS)
    missing = [name for name in _FIELDS if name not in record]
    if unknown or missing:
        raise ImportValidationError(f"{where} has unknown field(s) {unknown} or lacks {missing}")
    checks = {
        "key": TuningKey.from_dict,
        "config": check_flat_config,
        "status": lambda v: check_choice("status", v, COMPILE_STATUSES),
        "error_class": lambda v: check_text("error_class", v, optional=True, allow_empty=True),
        "error_message": lambda v: None if v is None else check_text("error_message", v, allow_empty=True)[
            :MAX_MESSAGE],
        "compile_s": lambda v: check_time("compile_s", v, optional=True),
        "figures": lambda v: None if v is None else check_figures(v),
    }
    values: dict[str, Any] = {}
    for name, field_check in checks.items():
        try:
            values[name] = field_check(record[name])
        except (ValueError, TypeError) as exc:
            raise ImportValidationError(f"{where}, field {name!r}: {exc}") from None
    if values["key"].platform not in COMPILE_PLATFORMS:
        raise ImportValidationError(f"{where}, field 'key': platform must be one of {list(COMPILE_PLATFORMS)} "
                                    f"(compile-only), got {values['key'].platform!r}")
    config_check = check if values["status"] == "compiled" else fields_check
    if config_check is not None:
        try:
            config_check(values["key"], values["config"])
        except (ValueError, TypeError) as exc:
            raise ImportValidationError(f"{where}, field 'config': {exc}") from None
    return CompileTrial(**values)


def merge_compile_trials(store: Store, trials: list[CompileTrial]) -> int:
    """Add the trials a key does not hold yet (same config and outcome); returns how many were added."""
    added = 0
    held: dict[str, set[tuple[str, str]]] = {}
    for trial in trials:
        digest = trial.key.digest()
        if digest not in held:
            held[digest] = {(json.dumps(t.config, sort_keys=True), t.status) for t in store.trials(trial.key)}
        mark = (json.dumps(trial.config, sort_keys=True), trial.status)
        if mark in held[digest]:
            continue
        store.add_trial(trial.key, config=trial.config, status=trial.status, error_class=trial.error_class,
                        error_message=trial.error_message, compile_s=trial.compile_s, figures=trial.figures)
        held[digest].add(mark)
        added += 1
    return added
