"""The base of every kernel's Config: a frozen dataclass of ints that round-trips through JSON.

Configs are stored in the results database as plain dicts and come back from files a user may have edited, so
building one from a dict names every unknown, missing or non-int field instead of failing later in a compile.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class IntConfig:
    """Fields are ints (bools refused); `positive` subclasses also refuse zero and negatives."""

    positive = False

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"Config.{field.name} must be an int, got {value!r}")
            if self.positive and value <= 0:
                raise ValueError(f"Config.{field.name} must be positive, got {value}")
            object.__setattr__(self, field.name, int(value))

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """Build from a dict with exactly the config's fields; ValueError names unknown, missing or non-int ones."""
        if not isinstance(data, dict):
            raise ValueError(f"a Config needs a dict, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f"unknown Config field(s) {unknown}; expected {names}")
        missing = [n for n in names if n not in data]
        if missing:
            raise ValueError(f"missing Config field(s) {missing}")
        return cls(**{n: data[n] for n in names})
