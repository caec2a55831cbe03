"""jax.nn's XLA attention predicted beside our kernel's configs on a TPU target, so a predicted winner can be "xla".

A compile-only search for a TPU target compiles XLA's attention for each problem once, deviceless like the kernel
configs, and the static model predicts it from the same bundle dump (every program is XLA's own). Its one trial
sits under a key of its own (kernel `xla_attention`, the version of `kernels/xla_attention.py`), so nothing that
reads the kernel's configs ever sees it. The predicted winner follows the final re-timing's rule: XLA wins only
when it is faster than the kernel's predicted best by more than the margin. GPU targets have no such prediction:
the GPU model reads our kernels' SASS only, and cuDNN compiles to an opaque library call.
"""
from __future__ import annotations

from pathlib import Path

from autotune.compile.model.prediction import Prediction
from autotune.compile.ranking import prediction_of
from autotune.compile.results import COMPILED, XLA_KERNEL
from autotune.options import DEFAULT_MARGIN
from db import Store, TuningKey
from kernels import xla_attention as xla_module
from kernels.versioning import source_version

XLA_VERSION = source_version(Path(xla_module.__file__))


def xla_key(key: TuningKey) -> TuningKey:
    """The compile-only key of XLA's attention for the problem, target and jax version of `key` (a kernel's)."""
    return TuningKey(**{**key.to_dict(), "kernel": XLA_KERNEL, "kernel_version": XLA_VERSION})


def stored_xla_prediction(store: Store, key: TuningKey) -> Prediction | None:
    """XLA's predicted time for the problem of compile-only `key` (None when none was compiled and predicted)."""
    found = [p for t in store.trials(xla_key(key)) if t.status == COMPILED and (p := prediction_of(t)) is not None]
    return found[-1] if found else None


def xla_wins(xla: Prediction | None, kernel_best: Prediction, margin: float = DEFAULT_MARGIN) -> bool:
    """Whether XLA is the predicted winner: predicted faster than the kernel's predicted best by more than `margin`
    (under the same model version; a prediction of another model is not comparable)."""
    return (xla is not None and xla.model_version == kernel_best.model_version
            and xla.seconds * (1.0 + margin) < kernel_best.seconds)
