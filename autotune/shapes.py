"""Problems as users write them: command-line flags or entries of a shapes file (TOML or JSON).

Every entry is validated before anything is compiled; errors name the entry and the field.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kernels import DTYPES, Problem

try:
    import tomllib
except ImportError:  # pragma: no cover - Python < 3.11
    import tomli as tomllib

FIELDS = {
    "batch": int, "seq_len": int, "kv_seq_len": int, "heads": int, "kv_heads": int, "head_dim": int,
    "dtype": str, "causal": bool, "segments": int, "backward": bool,
}
REQUIRED = ("batch", "seq_len", "heads", "head_dim")


@dataclass(frozen=True)
class ProblemSpec:
    """A problem to tune and how many packed documents its segment-id inputs hold (0: none)."""

    problem: Problem
    documents: int = 0


def spec_from_fields(fields: dict[str, Any], where: str = "problem") -> ProblemSpec:
    """Build a ProblemSpec from flag-style fields; ValueError naming `where` and the field on bad content."""
    if not isinstance(fields, dict):
        raise ValueError(f"{where}: expected a table of fields, got {type(fields).__name__}")
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; expected some of {sorted(FIELDS)}")
    for name in REQUIRED:
        if fields.get(name) is None:
            raise ValueError(f"{where}: missing field '{name}'")
    for name, value in fields.items():
        kind = FIELDS[name]
        if value is None:
            continue
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{where}: field '{name}' must be an integer, got {value!r}")
        if kind is bool and not isinstance(value, bool):
            raise ValueError(f"{where}: field '{name}' must be true or false, got {value!r}")
        if kind is str and not isinstance(value, str):
            raise ValueError(f"{where}: field '{name}' must be a string, got {value!r}")
    for name in ("batch", "seq_len", "kv_seq_len", "heads", "kv_heads", "head_dim"):
        if fields.get(name) is not None and fields[name] <= 0:
            raise ValueError(f"{where}: field '{name}' must be positive, got {fields[name]}")
    documents = fields.get("segments") or 0
    if documents < 0:
        raise ValueError(f"{where}: field 'segments' must be 0 (no segment ids) or a number of documents, got {documents}")
    heads = fields["heads"]
    kv_heads = fields.get("kv_heads") or heads
    if heads % kv_heads:
        raise ValueError(f"{where}: field 'kv_heads' ({kv_heads}) must divide 'heads' ({heads})")
    dtype = fields.get("dtype") or "float32"
    if dtype not in DTYPES:
        raise ValueError(f"{where}: field 'dtype' must be one of {list(DTYPES)}, got {dtype!r}")
    problem = Problem(
        batch=fields["batch"], q_len=fields["seq_len"], kv_len=fields.get("kv_seq_len") or fields["seq_len"],
        heads=heads, kv_heads=kv_heads, head_dim=fields["head_dim"], dtype=dtype,
        causal=bool(fields.get("causal") or False), segments=documents > 0, backward=bool(fields.get("backward")),
    )
    return ProblemSpec(problem, documents)


def load_shapes(path: str | Path) -> list[ProblemSpec]:
    """Read a shapes file: TOML with [[problem]] tables, or JSON as a list or {"problems": [...]}."""
    path = Path(path)
    text = path.read_text()
    try:
        data = tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not valid {'TOML' if path.suffix.lower() == '.toml' else 'JSON'}: {exc}") from None
    entries = data
    if isinstance(data, dict):
        extra = sorted(set(data) - {"problem", "problems"})
        if extra:
            raise ValueError(f"{path}: unknown top-level key(s) {extra}; expected 'problem' (TOML) or 'problems'")
        entries = data.get("problem", data.get("problems"))
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected a non-empty list of problems")
    return [spec_from_fields(entry, f"{path.name}: problem {i + 1}") for i, entry in enumerate(entries)]
