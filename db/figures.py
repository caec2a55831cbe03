"""The schema of what a compile-only trial stores: its flat config and the compiler's `figures` (autotune/compile).

The compile path writes `{"target": name, "kernels": [per-kernel figures], ...}`, a failure adds its kind and the
bytes the compiler named, and a performance model may add its `prediction`. Everything that stores figures (the
compile search, `import`) checks them here first, so no other shape ever reaches the table, and every size is
bounded (a figures object is a few kilobytes at most). Readers (`show --target`, `report`, the device search's
ahead-of-time skips) go through `readable_figures`, so a row stored by an older version or a hand edit is read as
"no figures" instead of crashing them.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from db.records import RESOURCE_EXHAUSTED
from db.validation import check_choice, check_int, check_name, check_time

log = logging.getLogger(__name__)

ROLES = ("forward", "dq", "dkv")  # the kernels of one compile, in this order
FAILURE_KINDS = (RESOURCE_EXHAUSTED, "lowering_error", "timeout", "other")
_LEGACY_FAILURE_KINDS = {"resources_exhausted": RESOURCE_EXHAUSTED}  # what versions before 2026-12 stored


def canonical_failure_kind(kind: Any) -> Any:
    """A stored failure kind in today's spelling (older rows and documents spell RESOURCE_EXHAUSTED otherwise)."""
    return _LEGACY_FAILURE_KINDS.get(kind, kind) if isinstance(kind, str) else kind
MAX_KERNELS = 16  # kernels in one compile: ours have at most three
MAX_PARTS = 64  # named parts of a prediction
MAX_BYTES = 2**40  # a memory, spill or stack figure: far past any chip's shared memory or VMEM
MAX_REGISTERS = 1 << 16
MAX_THREADS = 1 << 20
MAX_CONFIG_FIELDS = 64
MAX_NAME = 64  # characters of a config field, target, part or model name

_KERNEL_FIELDS = {  # name -> (maximum, optional): the fields of autotune.compile.figures.KernelFigures but two
    "memory_bytes": (MAX_BYTES, False), "registers": (MAX_REGISTERS, True), "spill_store_bytes": (MAX_BYTES, True),
    "spill_load_bytes": (MAX_BYTES, True), "stack_bytes": (MAX_BYTES, True), "threads": (MAX_THREADS, True),
    "operands_in_vmem": (MAX_BYTES, True)}
KERNEL_FIELDS = ("role", "name", *_KERNEL_FIELDS)
_FAILURE_FIELDS = ("failure_kind", "requested_bytes", "limit_bytes")
FIGURES_FIELDS = ("target", "kernels", *_FAILURE_FIELDS, "prediction")
PREDICTION_FIELDS = ("seconds", "roofline_seconds", "bound", "parts", "model_version")


def _fields(path: str, value: Any, allowed: tuple[str, ...], required: tuple[str, ...]) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{path} must be an object, got {type(value).__name__}")
    unknown = sorted(str(name) for name in value if name not in allowed)[:5]
    if unknown:
        raise ValueError(f"{path} has unknown field(s) {unknown}; expected some of {list(allowed)}")
    missing = [name for name in required if name not in value]
    if missing:
        raise ValueError(f"{path} lacks {missing}")
    return value


def _prediction(value: Any) -> dict[str, Any]:
    """A performance model's prediction (autotune/compile/model/prediction.py's `Prediction.to_dict`)."""
    data = _fields("figures['prediction']", value, PREDICTION_FIELDS, PREDICTION_FIELDS)
    parts = data["parts"]
    if not isinstance(parts, Mapping) or len(parts) > MAX_PARTS:
        raise ValueError(f"figures['prediction']['parts'] must be an object of at most {MAX_PARTS} named seconds")
    return {"seconds": check_time("figures['prediction']['seconds']", data["seconds"], positive=True),
            "roofline_seconds": check_time("figures['prediction']['roofline_seconds']", data["roofline_seconds"]),
            "bound": check_name("figures['prediction']['bound']", data["bound"], limit=MAX_NAME),
            "parts": {check_name("a part name of figures['prediction']['parts']", name, limit=MAX_NAME):
                      check_time(f"figures['prediction']['parts'][{name!r:.70}]", seconds)
                      for name, seconds in parts.items()},
            "model_version": check_name("figures['prediction']['model_version']", data["model_version"],
                                        limit=MAX_NAME)}


def _kernel(index: int, value: Any) -> dict[str, Any]:
    path = f"figures['kernels'][{index}]"
    data = _fields(path, value, KERNEL_FIELDS, ("role", "name", "memory_bytes"))
    kernel = {"role": check_choice(f"{path}['role']", data["role"], ROLES),
              "name": check_name(f"{path}['name']", data["name"])}
    for name, (maximum, optional) in _KERNEL_FIELDS.items():
        kernel[name] = check_int(f"{path}[{name!r}]", data.get(name), minimum=0, maximum=maximum,
                                 optional=optional)
    return kernel


def check_figures(value: Any) -> dict[str, Any]:
    """`value` as the figures the compile path writes (a plain copy), or ValueError naming the first wrong part."""
    data = _fields("figures", value, FIGURES_FIELDS, ("target", "kernels"))
    kernels = data["kernels"]
    if not isinstance(kernels, list) or len(kernels) > MAX_KERNELS:
        raise ValueError(f"figures['kernels'] must be a list of at most {MAX_KERNELS} kernels' figures, got "
                         f"{type(kernels).__name__}{f' of {len(kernels)}' if isinstance(kernels, list) else ''}")
    figures: dict[str, Any] = {"target": check_name("figures['target']", data["target"], limit=MAX_NAME),
                               "kernels": [_kernel(index, kernel) for index, kernel in enumerate(kernels)]}
    if any(name in data for name in _FAILURE_FIELDS):
        figures["failure_kind"] = check_choice("figures['failure_kind']",
                                               canonical_failure_kind(data.get("failure_kind")), FAILURE_KINDS)
        for name in ("requested_bytes", "limit_bytes"):
            figures[name] = check_int(f"figures[{name!r}]", data.get(name), minimum=0, maximum=MAX_BYTES,
                                      optional=True)
    if "prediction" in data:
        figures["prediction"] = _prediction(data["prediction"])
    return figures


def check_flat_config(value: Any) -> dict[str, int]:
    """A compile trial's config as the compile path writes it (a kernel Config's `to_dict`): an object of at most
    MAX_CONFIG_FIELDS short names, each an integer."""
    if not isinstance(value, Mapping) or len(value) > MAX_CONFIG_FIELDS:
        raise ValueError(f"config must be an object of at most {MAX_CONFIG_FIELDS} fields, got "
                         f"{type(value).__name__}")
    return {check_name("a config field name", name, limit=MAX_NAME):
            check_int(f"config[{name!r}]", number, minimum=-2**31) for name, number in value.items()}


def readable_figures(value: Any, trial_id: int | None = None) -> dict[str, Any] | None:
    """Stored figures as a reader may trust them, or None (with a log line) when they do not fit the schema."""
    if value is None:
        return None
    try:
        return check_figures(value)
    except (ValueError, TypeError) as exc:
        log.warning("ignoring the figures of autotune_trials row %s: %s", trial_id, exc)
        return None


def is_config_object(value: Any) -> bool:
    """Whether a stored config is a JSON object (string keys), as every config path writes; a reader of anything
    else (a list, a number: a hand edit) would fail on it."""
    return isinstance(value, Mapping) and all(isinstance(name, str) for name in value)
