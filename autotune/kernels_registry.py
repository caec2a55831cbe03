"""Which kernel module tunes which platform, and how a module is named on the command line.

A kernel module offers the surface described in `kernels/__init__.py`. Besides the built-in `gpu` and `tpu`, any
importable module with that surface can be tuned by its dotted path (for a user's own kernel, or a test's).
"""
from __future__ import annotations

import importlib
from types import ModuleType

BUILTIN = {"gpu": "kernels.gpu", "tpu": "kernels.tpu"}
REQUIRED = ("NAME", "VERSION", "Config", "search_space", "invalid_reasons", "flash_attention")


def load_kernel(name: str) -> ModuleType:
    """The kernel module for `gpu`, `tpu` or a dotted module path; ValueError if it lacks the kernel surface."""
    path = BUILTIN.get(name, name)
    try:
        module = importlib.import_module(path)
    except ImportError as exc:
        raise ValueError(f"kernel must be 'gpu', 'tpu' or an importable module path, got {name!r} ({exc})") from None
    missing = [attr for attr in REQUIRED if not hasattr(module, attr)]
    if missing:
        raise ValueError(f"kernel module {path!r} lacks {missing}; a kernel module must define {list(REQUIRED)}")
    return module


def kernel_for_platform(platform: str) -> str:
    """The built-in kernel that serves a platform: the Mosaic kernel on TPU, the Triton one elsewhere."""
    return "tpu" if platform == "tpu" else "gpu"
