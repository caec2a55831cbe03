"""The one result type every static time model returns (TPU and GPU), so stores and reports need not care which.

A prediction is never a measurement: it carries the model version that made it, so a later model can tell old
predictions apart and no printed figure can be mistaken for a timed one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

TPU_MODEL_VERSION = "tpu-2"
GPU_MODEL_VERSION = "gpu-1"
BOUNDS = ("compute", "memory", "overhead", "latency")


@dataclass(frozen=True)
class Prediction:
    """A predicted run time (seconds) with the roofline it is held above and the parts it was summed from.

    `bound` names what dominates: 'compute' (MXU / tensor cores), 'memory' (HBM bytes), 'overhead' (per-step and
    launch costs) or 'latency' (dependent instruction chains). `parts` maps part names to seconds (they need not sum
    to `seconds`: overlapped parts are maxed, not added).
    """

    seconds: float
    roofline_seconds: float
    bound: str
    parts: dict[str, float] = field(default_factory=dict)
    model_version: str = ""

    def __post_init__(self) -> None:
        if self.bound not in BOUNDS:
            raise ValueError(f"bound must be one of {BOUNDS}, got {self.bound!r}")
        if not (math.isfinite(self.seconds) and self.seconds > 0):
            raise ValueError(f"seconds must be a positive finite number, got {self.seconds!r}")
        if not (math.isfinite(self.roofline_seconds) and self.roofline_seconds >= 0):
            raise ValueError(f"roofline_seconds must be a finite number >= 0, got {self.roofline_seconds!r}")
        if not self.model_version:
            raise ValueError("model_version must name the model that made the prediction")

    @property
    def roofline_fraction(self) -> float:
        """Roofline time over predicted time: 1.0 means the prediction sits on the roofline."""
        return self.roofline_seconds / self.seconds

    def to_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "roofline_seconds": self.roofline_seconds, "bound": self.bound,
                "parts": dict(self.parts), "model_version": self.model_version}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Prediction:
        return cls(seconds=float(data["seconds"]), roofline_seconds=float(data["roofline_seconds"]),
                   bound=str(data["bound"]), parts={str(k): float(v) for k, v in dict(data.get("parts", {})).items()},
                   model_version=str(data["model_version"]))
