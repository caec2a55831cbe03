"""The problem's fields as users write them: the one table the flags, shapes files, hints and descriptions come from.

`kernels.Problem` is what the kernels are tuned for; users name some of its fields differently (`seq_len` for
`q_len`), give the window's two sides as one `window`, and `segments` as a number of packed documents. Each entry
below says how one user field is spelled (shapes-file name, flag), typed and bounded, what it defaults to, and
which Problem fields it sets. The click options (autotune/cli/common.py), the shapes-file parsing
(autotune/shapes.py), the runtime's tune command, the search's "In Python:" hint and every one-line description
are made from it, so adding a field means one entry here plus the kernels. db/ keeps its own list of key columns
(it imports nothing of ours); a test checks it against this table.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

from kernels import DTYPES, Problem

MAX_SEQ = 1 << 20  # the longest sequence a search is asked to tune: beyond it a problem is a typo or an attack
MAX_SOFTCAP = 1e38  # a cap the float32 kernels still compute (their scores times log2(e) must stay finite)
DEFAULT_DOCUMENTS = 3  # packed documents a search draws for a key tuned with segment ids (their count is not kept)


@dataclass(frozen=True)
class ProblemField:
    """One field of a problem as users write it.

    `kind` says how its values look: "size" (a positive int), "count" (an int from 0), "flag" (a bool), "choice"
    (one of `choices`), "window" (None or (left, right), each side an int from 0 or None) and "number" (None or a
    positive float). `follows` names the field whose value it takes when not given (kv_seq_len follows seq_len).
    `label` gives its part of a one-line description from all the user values ("" for none)."""

    name: str
    kind: str
    help: str
    problem: tuple[str, ...]
    required: bool = False
    default: Any = None
    follows: str | None = None
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    label: Callable[[dict[str, Any]], str] = lambda values: ""

    @property
    def flag(self) -> str:
        """The command-line flag: the name with dashes."""
        return "--" + self.name.replace("_", "-")

    @property
    def size(self) -> bool:
        """Whether the field is a size of q, k or v (in Python it is read from their shapes, not passed)."""
        return self.kind == "size"


def _window_label(values: dict[str, Any]) -> str:
    if values["window"] is None:
        return ""
    left, right = ("-" if side is None else side for side in values["window"])
    return f"win({left},{right})"


FIELDS: tuple[ProblemField, ...] = (
    ProblemField("batch", "size", "Batch size.", ("batch",), required=True, minimum=1, maximum=1 << 16,
                 label=lambda v: f"b{v['batch']}"),
    ProblemField("seq_len", "size", "Query sequence length.", ("q_len",), required=True, minimum=1, maximum=MAX_SEQ,
                 label=lambda v: f"q{v['seq_len']}"),
    ProblemField("kv_seq_len", "size", "Key/value sequence length (default: the query's).", ("kv_len",),
                 follows="seq_len", minimum=1, maximum=MAX_SEQ, label=lambda v: f"kv{v['kv_seq_len']}"),
    ProblemField("heads", "size", "Query heads.", ("heads",), required=True, minimum=1, maximum=1 << 10,
                 label=lambda v: f"h{v['heads']}/{v['kv_heads']}"),
    ProblemField("kv_heads", "size", "Key/value heads (default: the query's; fewer for GQA/MQA).", ("kv_heads",),
                 follows="heads", minimum=1, maximum=1 << 10),
    ProblemField("head_dim", "size", "Head dimension.", ("head_dim",), required=True, minimum=1, maximum=1 << 10,
                 label=lambda v: f"d{v['head_dim']}"),
    ProblemField("dtype", "choice", "Dtype of q, k and v.", ("dtype",), default="float32", choices=DTYPES,
                 label=lambda v: v["dtype"]),
    ProblemField("causal", "flag", "Causal (top-left aligned) masking.", ("causal",), default=False,
                 label=lambda v: "causal" * v["causal"]),
    ProblemField("segments", "count", "N packed documents of random lengths (0: no segment ids).", ("segments",),
                 default=0, minimum=0, maximum=MAX_SEQ, label=lambda v: "seg" * bool(v["segments"])),
    ProblemField("backward", "flag", "Forward plus backward (the key `jax.grad` uses).", ("backward",),
                 default=False, label=lambda v: "+bwd" * v["backward"]),
    ProblemField("window", "window", "Sliding window: a query sees keys from N before to N after it (LEFT,RIGHT: "
                 "each side apart; none for no bound), as jax.nn's local_window_size.",
                 ("window_left", "window_right"), minimum=0, maximum=MAX_SEQ, label=_window_label),
    ProblemField("softcap", "number", "Logits soft cap: scores become CAP*tanh(scores/CAP) (Gemma 2).",
                 ("softcap",), maximum=MAX_SOFTCAP, label=lambda v: "" if v["softcap"] is None else
                 f"cap{number_text(v['softcap'])}"),
    ProblemField("lengths", "flag", "Per-row padding lengths (query and key/value).", ("lengths",), default=False,
                 label=lambda v: "len" * v["lengths"]),
)
BY_NAME = {field.name: field for field in FIELDS}
REQUIRED = tuple(field.name for field in FIELDS if field.required)
PROBLEM_FIELDS = tuple(field.name for field in dataclasses.fields(Problem))  # the kernels' names, in their order


def _check_table() -> None:
    """Every Problem field is set by exactly one user field: a new Problem field needs its entry above."""
    covered = [name for field in FIELDS for name in field.problem]
    if sorted(covered) != sorted(PROBLEM_FIELDS):
        raise RuntimeError(f"autotune/problem_fields.py covers the Problem fields {sorted(covered)}, but Problem has "
                           f"{sorted(PROBLEM_FIELDS)}: give each Problem field one entry in FIELDS")


_check_table()


# ---- one value: parsed and bounded ----------------------------------------------------------------------------------

def number_text(value: float) -> str:
    """A float as short as it can be written and still read back exactly (30 for 30.0, 0.1 for 0.1)."""
    short = f"{value:g}"
    return short if float(short) == value else repr(value)


def _bound(value: float) -> str:
    """A bound as written in messages: 1048576, not 1.04858e+06."""
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e16 else f"{value:g}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _bounded_int(field: ProblemField, value: Any) -> int:
    if not _is_int(value):
        raise ValueError(f"must be an integer from {_bound(field.minimum)} to {_bound(field.maximum)}, "
                         f"got {value!r}")
    if value < field.minimum:
        raise ValueError(f"must be at least {_bound(field.minimum)}, got {value}")
    if value > field.maximum:
        raise ValueError(f"must be at most {_bound(field.maximum)}, got {value}")
    return value


def _window_side(field: ProblemField, value: Any):
    if value is None or (_is_int(value) and value == -1):
        return None
    if isinstance(value, str) and value.strip().lower() in ("none", "-1", ""):
        return None
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ValueError(f"must be N or LEFT,RIGHT (each an integer, none or -1 for no bound), got {value!r}") \
                from None
    if not _is_int(value):
        raise ValueError(f"must be an integer or a pair [left, right] of integers (-1: no bound), got {value!r}")
    if value < 0:
        raise ValueError(f"each side must be from 0 to {_bound(field.maximum)} (-1 or none: no bound), got {value}")
    if value > field.maximum:
        raise ValueError(f"each side must be at most {_bound(field.maximum)} (a longer window is no bound: -1 or "
                         f"none), got {value}")
    return value


def parse_value(field: ProblemField, value: Any) -> Any:
    """A value as a user gave it (a flag's text, or a shapes file's JSON/TOML value) checked against the field's type
    and bounds; ValueError saying what was expected (the caller names the field or flag)."""
    if field.kind in ("size", "count"):
        if isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                raise ValueError(f"must be an integer, got {value!r}") from None
        return _bounded_int(field, value)
    if field.kind == "flag":
        if not isinstance(value, bool):
            raise ValueError(f"must be true or false, got {value!r}")
        return value
    if field.kind == "choice":
        if value not in field.choices:
            raise ValueError(f"must be one of {', '.join(field.choices)}, got {value!r}")
        return value
    if field.kind == "window":
        if value is None:
            return None
        if isinstance(value, str):
            value = [part for part in value.split(",")]
            value = value[0] if len(value) == 1 else value
        if isinstance(value, (list, tuple)):
            if len(value) != 2:
                raise ValueError(f"must be N or a pair [left, right], got {list(value)!r}")
            sides = tuple(_window_side(field, side) for side in value)
        else:
            sides = (_window_side(field, value),) * 2
        return None if sides == (None, None) else sides
    if field.kind == "number":
        if value is None:
            return None
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise ValueError(f"must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"must be a positive number up to {_bound(field.maximum)}, got {value!r}")
        if value > field.maximum:
            raise ValueError(f"must be at most {_bound(field.maximum)}, got {value!r}")
        return float(value)
    raise AssertionError(f"unknown field kind {field.kind!r}")


# ---- whole problems: user values <-> Problem ------------------------------------------------------------------------

def with_defaults(values: dict[str, Any]) -> dict[str, Any]:
    """Every field's value: the given ones, then those that follow another field, then the defaults."""
    full = {field.name: values.get(field.name) for field in FIELDS}
    for field in FIELDS:
        if full[field.name] is None:
            full[field.name] = full[field.follows] if field.follows else field.default
    return full


def problem_kwargs(values: dict[str, Any]) -> dict[str, Any]:
    """Problem's keyword arguments from complete, checked user values (see `with_defaults`)."""
    kwargs: dict[str, Any] = {}
    for field in FIELDS:
        value = values[field.name]
        if field.kind == "window":
            kwargs.update(zip(field.problem, value if value is not None else (None, None)))
        elif field.kind == "count":
            kwargs[field.problem[0]] = value > 0
        else:
            kwargs[field.problem[0]] = value
    return kwargs


def user_values(problem) -> dict[str, Any]:
    """The user values of a Problem or a TuningKey (anything with Problem's field names); a problem with segment
    ids gets DEFAULT_DOCUMENTS documents, since a key does not keep their number."""
    values: dict[str, Any] = {}
    for field in FIELDS:
        stored = tuple(getattr(problem, name) for name in field.problem)
        if field.kind == "window":
            values[field.name] = None if stored == (None, None) else stored
        elif field.kind == "count":
            values[field.name] = DEFAULT_DOCUMENTS if stored[0] else 0
        else:
            values[field.name] = stored[0]
    return values


def describe(problem) -> str:
    """A problem (or a key) on one line: "b1 q128 kv128 h2/1 d32 float32 causal seg +bwd win(16,0) cap30 len"."""
    values = user_values(problem)
    return " ".join(part for part in (field.label(values) for field in FIELDS) if part)


def _is_default(field: ProblemField, values: dict[str, Any]) -> bool:
    expected = values[field.follows] if field.follows else field.default
    return values[field.name] == expected


def flag_text(field: ProblemField, value: Any) -> str:
    """A field's value as its flag is typed: "--causal", "--window 16,0", "--window 8", "--softcap 30"."""
    if field.kind == "flag":
        return field.flag
    if field.kind == "window":
        sides = ["none" if side is None else str(side) for side in value]
        return f"{field.flag} {sides[0] if value[0] == value[1] else ','.join(sides)}"
    if field.kind == "number":
        return f"{field.flag} {number_text(value)}"
    return f"{field.flag} {value}"


def command_flags(problem) -> list[str]:
    """The problem flags of `autotune search` (or `show`) that name this problem; defaults left out except the
    dtype, which a reader should not have to know."""
    values = user_values(problem)
    return [flag_text(field, values[field.name]) for field in FIELDS
            if field.required or field.kind == "choice" or not _is_default(field, values)]


def lookup_arguments(problem) -> str:
    """The arguments of `autotune.lookup` for this problem: the q and k shapes, the dtype, then every other field
    that is not at its default, as keywords (so the printed call finds exactly the stored key)."""
    values = user_values(problem)
    p = problem
    parts = [f"({p.batch}, {p.q_len}, {p.heads}, {p.head_dim})", f"({p.batch}, {p.kv_len}, {p.kv_heads}, {p.head_dim})",
             repr(p.dtype)]
    for field in FIELDS:
        if field.size or field.name == "dtype" or _is_default(field, values):
            continue
        value = bool(values[field.name]) if field.kind == "count" else values[field.name]
        parts.append(f"{field.name}={number_text(value) if field.kind == 'number' else repr(value)}")
    return ", ".join(parts)
