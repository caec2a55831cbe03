"""What the runtime tells the user: each warning once, pointed at the user's own line, and the opt-in log of which
config each kernel call runs.

A warning is only useful at a line the user can change, so it points at the first frame outside jax, jaxlib, flax
and this project (the runtime reaches the kernels through shard_map, Flax NNX's attention module and jax's
autodiff, none of which the user wrote). The log (`AUTOTUNE_VERBOSE=1` or `autotune.configure(verbose=True)`) is
printed to stderr when a function is traced, once per kernel call traced, forward and backward.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import sys
import threading
import warnings
from typing import Any

_warned: set = set()
_lock = threading.Lock()


@functools.lru_cache(maxsize=1)
def _library_dirs() -> tuple[str, ...]:
    """The folders whose frames are not the user's: this project's packages, jax, jaxlib and flax (if installed)."""
    here = os.path.dirname(os.path.abspath(__file__))
    autotune_dir = os.path.dirname(os.path.dirname(here))
    dirs = [os.path.join(autotune_dir, "autotune"), os.path.join(autotune_dir, "kernels")]
    for name in ("jax", "jaxlib", "flax"):
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.submodule_search_locations:
            dirs += [os.path.abspath(location) for location in spec.submodule_search_locations]
    return tuple(d.rstrip(os.sep) + os.sep for d in dirs)


def _is_library(filename: str) -> bool:
    return os.path.abspath(filename).startswith(_library_dirs())


def user_frame(skip: int = 1):
    """(frame, stacklevel): the first frame outside the libraries, and its stacklevel as seen from the caller of this
    function (1: the caller itself). Falls back to the outermost frame when every frame is a library's."""
    frame, level = sys._getframe(skip), 1
    while frame.f_back is not None and _is_library(frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    return frame, level


def clear() -> None:
    """Forget which warnings were given (autotune.reload())."""
    with _lock:
        _warned.clear()


def warn_once(tag: Any, message: str) -> None:
    """One RuntimeWarning per tag per process, pointing at the user's line."""
    with _lock:
        if tag in _warned:
            return
        _warned.add(tag)
    _frame, level = user_frame(2)
    warnings.warn(message, RuntimeWarning, stacklevel=level + 1)


def log_choice(direction: str, problem_text: str, kernel: str, device_kind: str, config: dict, source: str,
               detail: str = "") -> None:
    """One line of the verbose log: the call's key, the config it runs with and where that came from, and the
    user's line that made the call."""
    frame, _level = user_frame(2)
    fields = " ".join(f"{name}={config[name]}" for name in sorted(config))
    why = f": {detail}" if detail else ""
    print(f"autotune: {direction:8} {problem_text} [{kernel} on {device_kind}] -> {fields} ({source}{why}) "
          f"at {frame.f_code.co_filename}:{frame.f_lineno}", file=sys.stderr, flush=True)
