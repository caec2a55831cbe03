"""Problems as users write them: command-line flags or entries of a shapes file (TOML or JSON).

Every entry is validated before anything is compiled; errors name the entry and the field.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kernels import DTYPES, Problem
from kernels.problem import check_softcap, check_window, window_fields

try:
    import tomllib
except ImportError:  # pragma: no cover - Python < 3.11
    import tomli as tomllib

# The fields of a shapes file and of the problem flags: Problem's fields, in Problem's order, with the lengths
# named as users name them, `segments` a number of packed documents (0: no segment ids) instead of a flag, and the
# window's two sides one field `window` (an int, or [left, right] with -1 for no bound; as a flag "128" or
# "128,0").
USER_NAMES = {"q_len": "seq_len", "kv_len": "kv_seq_len", "window_left": "window", "window_right": "window"}
_TYPES = {"int": int, "str": str, "bool": bool, "float | None": float, "int | None": tuple}
FIELDS = {USER_NAMES.get(f.name, f.name): int if f.name == "segments" else _TYPES[str(f.type)]
          for f in dataclasses.fields(Problem)}
REQUIRED = ("batch", "seq_len", "heads", "head_dim")
# The largest sizes a search is asked to tune: beyond them a problem is a typo or an attack, and would fail only
# after a run and a study were written (out of memory, or no valid config).
LIMITS = {"batch": 1 << 16, "seq_len": 1 << 20, "kv_seq_len": 1 << 20, "heads": 1 << 10, "kv_heads": 1 << 10,
          "head_dim": 1 << 10}
MAX_ELEMENTS = 1 << 34  # of q, k or v: 32 GiB in bfloat16, more than one device holds three times over
INT_FIELDS = tuple(name for name, kind in FIELDS.items() if kind is int)


def parse_window(value: Any, where: str = "window") -> tuple[int | None, int | None] | None:
    """A window as written by a user: an int, a pair [left, right] (-1 or None: no bound on that side), or the
    flag's text "128" / "128,0" / "none,0"; ValueError naming `where` otherwise."""
    if isinstance(value, str):
        parts = [p.strip().lower() for p in value.split(",")]
        try:
            value = [None if p in ("none", "-1", "") else int(p) for p in parts]
        except ValueError:
            raise ValueError(f"{where} must be an int or 'left,right' (none or -1: no bound), got {value!r}") from None
        value = value[0] if len(value) == 1 else value
    if isinstance(value, (list, tuple)):
        value = [None if (isinstance(x, int) and not isinstance(x, bool) and x == -1) else x for x in value]
    try:
        return check_window(value, where)
    except ValueError:
        raise ValueError(f"{where} must be a non-negative int or a pair [left, right] of non-negative ints "
                         f"(-1: no bound), got {value!r}") from None


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
        if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"{where}: field '{name}' must be a number, got {value!r}")
    for name in INT_FIELDS:
        if name != "segments" and fields.get(name) is not None and fields[name] <= 0:
            raise ValueError(f"{where}: field '{name}' must be positive, got {fields[name]}")
    for name, limit in LIMITS.items():
        if fields.get(name) is not None and fields[name] > limit:
            raise ValueError(f"{where}: field '{name}' must be at most {limit}, got {fields[name]}")
    longest = max(fields["seq_len"], fields.get("kv_seq_len") or 0)
    elements = fields["batch"] * longest * fields["heads"] * fields["head_dim"]
    if elements > MAX_ELEMENTS:
        raise ValueError(f"{where}: q, k and v would hold {elements} elements each; at most {MAX_ELEMENTS} are "
                         "tuned (lower 'batch', 'seq_len', 'heads' or 'head_dim')")
    documents = fields.get("segments") or 0
    if documents > min(fields["seq_len"], fields.get("kv_seq_len") or fields["seq_len"]):
        raise ValueError(f"{where}: field 'segments' ({documents}) must be at most the sequence length")
    if documents < 0:
        raise ValueError(f"{where}: field 'segments' must be 0 (no segment ids) or a number of documents, got {documents}")
    heads = fields["heads"]
    kv_heads = fields.get("kv_heads") or heads
    if heads % kv_heads:
        raise ValueError(f"{where}: field 'kv_heads' ({kv_heads}) must divide 'heads' ({heads})")
    dtype = fields.get("dtype") or "float32"
    if dtype not in DTYPES:
        raise ValueError(f"{where}: field 'dtype' must be one of {list(DTYPES)}, got {dtype!r}")
    window = parse_window(fields.get("window"), f"{where}: field 'window'")
    try:
        softcap = check_softcap(fields.get("softcap"))
    except ValueError:
        raise ValueError(f"{where}: field 'softcap' must be a positive finite number, got {fields['softcap']!r}") \
            from None
    problem = Problem(
        batch=fields["batch"], q_len=fields["seq_len"], kv_len=fields.get("kv_seq_len") or fields["seq_len"],
        heads=heads, kv_heads=kv_heads, head_dim=fields["head_dim"], dtype=dtype,
        causal=bool(fields.get("causal") or False), segments=documents > 0, backward=bool(fields.get("backward")),
        **window_fields(window), softcap=softcap, lengths=bool(fields.get("lengths")),
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
