"""The runtime's use of predictions: a key with no measured best on a device kind that a compile-only search
(`search --target`) ranked runs the predicted best instead of the heuristic default, and `lookup(device_kind=...)`
shows what the runtime would pick on hardware this machine does not have.

A measured best always wins: this is asked only when the key has none. The predicted best is re-checked by the
kernel's rules for the key's device kind, as any stored config is, and it is never called tuned: its source is
"predicted" and its detail names the model version and the predicted time.
"""
from __future__ import annotations

import socket
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import jax

from autotune.compile.model.prediction import Prediction
from autotune.compile.ranking import describe_prediction, predicted_ranking
from autotune.compile.xla_prediction import stored_xla_prediction, xla_wins
from autotune.compile.targets import TARGETS, target_for_device_kind
from autotune.device import DeviceInfo, current_device
from autotune.kernel_protocol import BUILTIN
from db import Store, TuningKey


@dataclass(frozen=True)
class PredictedChoice:
    """The predicted best of a key, as the kernel's Config, with what the runtime says of it."""

    config: Any
    prediction: Prediction
    detail: str
    implementation: str = "pallas"  # "xla" where jax.nn's XLA attention is predicted faster by more than the margin


def device_for_kind(device_kind: str | None, kernel: str | None = None) -> DeviceInfo:
    """The device a lookup is made for: this machine's (None, or its own kind), else the compile target whose
    device kind is `device_kind`; ValueError naming the known kinds otherwise."""
    here = current_device()
    if device_kind is None or device_kind == here.device_kind:
        return here
    if not isinstance(device_kind, str):
        raise ValueError(f"device_kind must be a device kind string (e.g. 'TPU v5 lite'), got "
                         f"{type(device_kind).__name__}")
    target = target_for_device_kind(device_kind)
    if target is None:
        kinds = ", ".join(repr(t.device_kind) for t in TARGETS.values())
        raise ValueError(f"device_kind must be this machine's ({here.device_kind!r}) or a compile target's "
                         f"({kinds}), got {device_kind!r}")
    if kernel in BUILTIN and kernel != target.platform:
        raise ValueError(f"kernel {kernel!r} does not run on {device_kind} (a {target.platform.upper()}); use "
                         f"kernel={target.platform!r} or leave kernel out")
    return DeviceInfo(target.platform, target.device_kind, jax.__version__, socket.gethostname())


def predicted_choice(store: Store, kernel: ModuleType, key: TuningKey, check) -> PredictedChoice | None:
    """The predicted best for `key` if a compile-only search ranked its problem on its device kind and the kernel
    can run that config here (`check(config_dict)` gives (Config, "") or (None, why)); None otherwise."""
    ranking = predicted_ranking(store, key)
    best = None if ranking is None else ranking.best
    if best is None:
        return None
    config, _invalid = check(best.config)
    if config is None:
        return None
    target = target_for_device_kind(ranking.key.device_kind)
    detail = (f"no measured config for this problem on {key.device_kind}: the predicted best of "
              f"{len(ranking.entries)} configs compiled for it "
              f"({target.name if target else ranking.key.platform} compile-only search, jax "
              f"{ranking.key.jax_version}), {describe_prediction(best.prediction)}")
    xla = stored_xla_prediction(store, ranking.key)
    if xla_wins(xla, best.prediction):
        return PredictedChoice(config, xla, f"{detail}; jax.nn's XLA attention is predicted faster: "
                                            f"{describe_prediction(xla)}", implementation="xla")
    return PredictedChoice(config, best.prediction, detail)


def predicted_warning(detail: str, command: str) -> str:
    """The one warning a key that runs its predicted best gives (forward, backward, or both through --backward)."""
    return f"{detail}: using that predicted config (not timed here). Measure it on the device with: {command}"
