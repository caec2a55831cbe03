"""Problems as users write them: command-line flags or entries of a shapes file (TOML or JSON).

Every entry is checked against the field table (autotune/problem_fields.py) before anything is compiled; errors
name the entry and the field. Problem flags given beside a shapes file apply to every entry that does not set the
field itself (`--backward` with a file tunes the backward of each of its problems).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import re

from autotune.problem_fields import BY_NAME, FIELDS, REQUIRED, parse_value, problem_kwargs, with_defaults
from kernels import Problem
from db.transfer import unique_keys

try:
    import tomllib
except ImportError:  # pragma: no cover - Python < 3.11
    import tomli as tomllib

MAX_ELEMENTS = 1 << 34  # of q, k or v: 32 GiB in bfloat16, more than one device holds three times over


@dataclass(frozen=True)
class ProblemSpec:
    """A problem to tune and how many packed documents its segment-id inputs hold (0: none)."""

    problem: Problem
    documents: int = 0


def check_fields(fields: Any, where: str) -> dict[str, Any]:
    """The given fields (a shapes entry, or flags named as in a shapes file) parsed and bounded one by one; None
    values are left out. ValueError naming `where` and the field."""
    if not isinstance(fields, dict):
        raise ValueError(f"{where}: expected a table of fields, got {type(fields).__name__}")
    unknown = sorted(str(name) for name in fields if name not in BY_NAME)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; expected some of {sorted(BY_NAME)}")
    checked = {}
    for name, value in fields.items():
        if value is None:
            continue
        try:
            checked[name] = parse_value(BY_NAME[name], value)
        except ValueError as exc:
            raise ValueError(f"{where}: field '{name}': {exc}") from None
    return checked


FLAGS = "the problem flags"  # the `where` of problems given as flags: their errors name the flags


def _flag_names(message: str) -> str:
    """A message about fields in the words of the command line: 'kv_heads must divide heads' ->
    '--kv-heads must divide --heads' (a shapes file's and Problem's names alike)."""
    names = {name: field.flag for field in FIELDS for name in (field.name, *field.problem)}
    pattern = re.compile(r"(?<![\w-])(?:field )?'?(" + "|".join(sorted(map(re.escape, names), key=len, reverse=True)) +
                         r")'?(?![\w])")
    return pattern.sub(lambda m: names[m.group(1)], message)


def spec_from_fields(fields: dict[str, Any], where: str = "problem", defaults: dict[str, Any] | None = None
                     ) -> ProblemSpec:
    """A ProblemSpec from flag-style fields; `defaults` (checked values, e.g. the flags given beside a shapes file)
    fill the fields the entry leaves out. ValueError naming `where` and the field on bad content (the flags
    themselves when `where` is FLAGS)."""
    try:
        return _spec_from_fields(fields, where, defaults)
    except ValueError as exc:
        if where != FLAGS:
            raise
        raise ValueError(_flag_names(str(exc).removeprefix(f"{where}: "))) from None


def _spec_from_fields(fields: dict[str, Any], where: str, defaults: dict[str, Any] | None) -> ProblemSpec:
    given = {**(defaults or {}), **check_fields(fields, where)}
    missing = [name for name in REQUIRED if name not in given]
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(repr(n) for n in missing)}")
    values = with_defaults(given)
    longest = max(values["seq_len"], values["kv_seq_len"])
    elements = values["batch"] * longest * values["heads"] * values["head_dim"]
    if elements > MAX_ELEMENTS:
        raise ValueError(f"{where}: q, k and v would hold {elements} elements each; at most {MAX_ELEMENTS} are "
                         "tuned (lower 'batch', 'seq_len', 'heads' or 'head_dim')")
    if values["segments"] > min(values["seq_len"], values["kv_seq_len"]):
        raise ValueError(f"{where}: field 'segments' ({values['segments']}) must be at most the sequence length")
    try:
        problem = Problem(**problem_kwargs(values))  # the rules between fields (kv_heads divides heads) are its own
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    return ProblemSpec(problem, values["segments"])


def read_entries(path: str | Path) -> list[Any]:
    """The problem entries of a shapes file: TOML with [[problem]] tables, or JSON as a list or {"problems": [...]}."""
    path = Path(path)
    text = path.read_text()
    toml = path.suffix.lower() == ".toml"
    try:
        data = tomllib.loads(text) if toml else json.loads(text, object_pairs_hook=unique_keys)
    except (tomllib.TOMLDecodeError, ValueError) as exc:  # json.JSONDecodeError is a ValueError, as is a duplicate
        raise ValueError(f"{path}: not valid {'TOML' if toml else 'JSON'}: {exc}") from None
    entries = data
    if isinstance(data, dict):
        extra = sorted(set(data) - {"problem", "problems"})
        if extra:
            raise ValueError(f"{path}: unknown top-level key(s) {extra}; expected 'problem' (TOML) or 'problems'")
        entries = data.get("problem", data.get("problems"))
    if toml and isinstance(entries, dict):
        raise ValueError(f"{path}: [problem] is one table; write each problem as [[problem]] (double brackets), "
                         "a list of tables")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected a non-empty list of problems")
    return entries


def load_shapes(path: str | Path, defaults: dict[str, Any] | None = None) -> list[ProblemSpec]:
    """The problems of a shapes file; `defaults` (checked values) fill the fields an entry leaves out."""
    name = Path(path).name
    return [spec_from_fields(entry, f"{name}: problem {i + 1}", defaults)
            for i, entry in enumerate(read_entries(path))]

