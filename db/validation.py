"""Checks for the plain values the database stores, shared by the records, the store and the importer.

Each check raises ValueError whose message starts with the field's name, so the caller (or the importer, which
prefixes the record index) can say exactly what was wrong. Times are checked here once: no NaN, no infinity and no
negative number ever reaches a table, because a single NaN would make "keep the faster" comparisons meaningless.
Every value is also bounded to what is physically possible: a measured time of 5e-324 s would win every comparison
and make a speedup infinite, and an integer wider than PostgreSQL's INTEGER columns would fail only at the write.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any


INT32_MAX = 2**31 - 1  # every Integer column is 32 bits wide on PostgreSQL
INT64_MAX = 2**63 - 1  # integers inside JSON values (configs, run arguments): what every JSON reader can hold
MIN_TIME_S = 1e-9  # nothing measured on a device takes less than a nanosecond
MAX_TIME_S = 1e6  # about 11.6 days: longer than any one measurement, compile or claim lease
MAX_JSON_DEPTH = 16  # configs and run arguments are flat; deeper nesting is an attack or a mistake
MAX_TEXT = 10_000  # characters in a stored string (names, messages), so one row cannot bloat every report


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _finite_real(field: str, value: Any, *, optional: bool, kind: str, finite_kind: str,
                 too_large_kind: str) -> float | None:
    """`value` as a finite float (never a bool), or None if it is None and `optional`; errors name the field and
    what it should be (`kind`; `finite_kind` when not finite, `too_large_kind` for an integer past float range)."""
    if value is None:
        if optional:
            return None
        raise ValueError(f"{field} is required ({kind}), got None")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{field} must be {kind}, got {_describe(value)}")
    try:
        number = float(value)
    except OverflowError:
        raise ValueError(f"{field} must be {too_large_kind}, got an integer too large") from None
    if not math.isfinite(number):
        raise ValueError(f"{field} must be {finite_kind}, got {number!r}")
    return number


def check_time(field: str, value: Any, *, optional: bool = False, positive: bool = False) -> float | None:
    """A duration in seconds: a real number, finite, 0 to MAX_TIME_S (MIN_TIME_S up when `positive`); None if
    `optional`."""
    number = _finite_real(field, value, optional=optional, kind="a number of seconds",
                          finite_kind="a finite number of seconds", too_large_kind="a finite number of seconds")
    if number is None:
        return None
    if number < 0 or (positive and number < MIN_TIME_S):
        bound = f"at least {MIN_TIME_S:g}" if positive else "0 or more"
        raise ValueError(f"{field} must be {bound} seconds, got {number!r}")
    if number > MAX_TIME_S:
        raise ValueError(f"{field} must be at most {MAX_TIME_S:g} seconds, got {number!r}")
    return number


def is_physical_time(value: Any) -> bool:
    """Whether a stored value is a measured time this version would accept (older rows may hold anything)."""
    return (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
            and MIN_TIME_S <= value <= MAX_TIME_S)


def check_error_size(field: str, value: Any) -> float | None:
    """A measured error: a real number >= 0 or +inf. NaN means the output was not finite, so it is stored as +inf."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{field} must be a number, got {_describe(value)}")
    try:
        number = float(value)
    except OverflowError:
        return math.inf
    if math.isnan(number):
        return math.inf
    if number < 0:
        raise ValueError(f"{field} must be 0 or more, got {number!r}")
    return number


def check_int(field: str, value: Any, *, minimum: int | None = None, maximum: int = INT32_MAX,
              optional: bool = False) -> int | None:
    """An integer (never a bool, never a float that happens to be whole), `minimum` (if given) to `maximum`."""
    if value is None:
        if optional:
            return None
        raise ValueError(f"{field} is required (an integer), got None")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{field} must be an integer, got {_describe(value)}")
    number = int(value)
    if minimum is None and number < -maximum - 1:
        raise ValueError(f"{field} must be at least {-maximum - 1}, got {_short_int(number)}")
    if minimum is not None and number < minimum:
        raise ValueError(f"{field} must be at least {minimum}, got {_short_int(number)}")
    if number > maximum:
        raise ValueError(f"{field} must be at most {maximum}, got {_short_int(number)}")
    return number


def _short_int(number: int) -> str:
    """An integer for a message: a huge one by its size, not its thousands of digits."""
    return str(number) if abs(number) < 10**30 else f"an integer of {number.bit_length()} bits"


def check_bool(field: str, value: Any) -> bool:
    """A real bool: 0/1 or "true" are refused, since they usually mean a field was mixed up."""
    if not isinstance(value, bool):
        raise ValueError(f"{field} must be true or false, got {_describe(value)}")
    return value


def check_text(field: str, value: Any, *, optional: bool = False, allow_empty: bool = False) -> str | None:
    """A string (non-empty unless `allow_empty`)."""
    if value is None:
        if optional:
            return None
        raise ValueError(f"{field} is required (a string), got None")
    if not isinstance(value, str):
        raise ValueError(f"{field} must be a string, got {_describe(value)}")
    if not value and not allow_empty:
        raise ValueError(f"{field} must not be empty")
    if len(value) > MAX_TEXT:
        raise ValueError(f"{field} must be at most {MAX_TEXT} characters, got {len(value)}")
    return value


def check_positive_number(field: str, value: Any, *, optional: bool = False) -> float | None:
    """A real number > 0 and finite (an integer is taken as a float), never a bool; None if `optional`."""
    number = _finite_real(field, value, optional=optional, kind="a positive finite number",
                          finite_kind="a positive finite number", too_large_kind="a finite number")
    if number is not None and number <= 0:
        raise ValueError(f"{field} must be a positive finite number, got {number!r}")
    return number


def clean_text(field: str, value: Any, *, limit: int) -> str | None:
    """A free text written by the program (a miss's reason), made safe to store and print rather than refused:
    control characters become spaces, runs of blanks one space, and it is cut to `limit` characters (ending in
    "..."); None or nothing left gives None. Only a value that is not a string at all is refused."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{field} must be a string or None, got {_describe(value)}")
    text = " ".join("".join(char if char.isprintable() else " " for char in value[:limit * 4]).split())
    if len(text) > limit:
        text = text[:limit - 3].rstrip() + "..."
    return text or None


def check_name(field: str, value: Any, *, limit: int = 200) -> str:
    """A short non-empty name printed in tables (kernel, device kind): no control characters (terminal escapes)."""
    text = check_text(field, value)
    if len(text) > limit:
        raise ValueError(f"{field} must be at most {limit} characters, got {len(text)}")
    bad = next((char for char in text if not char.isprintable()), None)
    if bad is not None:
        raise ValueError(f"{field} must not hold control characters, got {text!r}")
    return text


def check_choice(field: str, value: Any, choices: Sequence[str]) -> str:
    """One of a fixed set of strings."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{field} must be one of {', '.join(choices)}; got {_describe(value)}")
    return value


def _plain_json(path: str, value: Any, depth: int = 0) -> Any:
    """A copy of `value` made of JSON types only (tuples become lists); refuses NaN, infinity, integers wider than
    64 bits, nesting deeper than MAX_JSON_DEPTH and odd types."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return check_text(path, value, allow_empty=True)
    if isinstance(value, numbers.Integral):
        return check_int(path, value, minimum=-INT64_MAX - 1, maximum=INT64_MAX)
    if isinstance(value, numbers.Real):
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise ValueError(f"{path} must be finite, got {number!r}")
        return number
    if isinstance(value, (Mapping, list, tuple)) and depth >= MAX_JSON_DEPTH:
        raise ValueError(f"{path} is nested more than {MAX_JSON_DEPTH} levels deep")
    if isinstance(value, Mapping):
        copy = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{path} has a non-string key {_describe(key)}")
            copy[key] = _plain_json(f"{path}[{key!r}]", item, depth + 1)
        return copy
    if isinstance(value, (list, tuple)):
        return [_plain_json(f"{path}[{index}]", item, depth + 1) for index, item in enumerate(value)]
    raise ValueError(f"{path} holds {_describe(value)}, which is not a JSON value")


def check_json_object(field: str, value: Any) -> dict[str, Any]:
    """A JSON object (dict with string keys and JSON values), returned as a plain copy."""
    if not isinstance(value, Mapping):
        raise ValueError(f"{field} must be an object (dict), got {_describe(value)}")
    return _plain_json(field, value)


def check_datetime(field: str, value: Any) -> datetime:
    """A datetime or an ISO 8601 string; naive values are taken as UTC. Returned in UTC."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"{field} must be an ISO 8601 date and time, got {value!r}") from None
    if not isinstance(value, datetime):
        raise ValueError(f"{field} must be a date and time, got {_describe(value)}")
    return as_utc(value)


def as_utc(moment: datetime) -> datetime:
    """The same instant in UTC; a naive datetime is taken to be UTC already."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


def utc_now() -> datetime:
    """Now, timezone-aware in UTC (every timestamp the database writes)."""
    return datetime.now(timezone.utc)
