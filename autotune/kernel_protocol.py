"""Which kernel module tunes which platform, what a kernel module must offer, and loading one by name.

A kernel module is any module with the surface `KernelModule` describes (the built-in `kernels.gpu` and
`kernels.tpu`, a user's own kernel, a test's). `load_kernel` is the one place a kernel is loaded: `gpu`, `tpu` or a
dotted module path, checked against the protocol before anything uses it, with an error naming what is missing.
"""
from __future__ import annotations

import functools
import importlib
import inspect
from types import ModuleType
from typing import Any, Callable, ClassVar, Mapping, Protocol, Sequence, runtime_checkable

from kernels import Problem

BUILTIN = {"gpu": "kernels.gpu", "tpu": "kernels.tpu"}


@runtime_checkable
class KernelConfig(Protocol):
    """A kernel's tunable parameters: a frozen value that round-trips through a plain dict (how it is stored)."""

    @classmethod
    def default(cls, problem: Problem, *, device_kind: str | None) -> "KernelConfig": ...

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "KernelConfig": ...

    def to_dict(self) -> dict[str, Any]: ...


class KernelModule(Protocol):
    """What the search, the runtime and the commands use of a kernel module.

    `device_kind` is the real device's kind (`jax.devices()[0].device_kind`), or None in interpret mode: the
    default config and the validity check may depend on it (shared memory, VMEM, generation).
    """

    NAME: ClassVar[str]
    VERSION: ClassVar[str]
    Config: ClassVar[type[KernelConfig]]

    def search_space(self, problem: Problem) -> Mapping[str, Sequence[int]]: ...

    def invalid_reasons(self, config: Any, problem: Problem, *, device_kind: str | None = None) -> list[str]: ...

    def flash_attention(self, q, k, v, *, causal: bool = False, segment_ids=None, sm_scale: float | None = None,
                        config: Any = None, interpret: bool = False): ...


class TargetKernelModule(KernelModule, Protocol):
    """What compiling for a named target (`autotune.compile`: `search --target`, `compile_many`) needs besides:
    the memory each kernel is expected to need, set beside the compiler's figure, and `flash_attention` for a
    device that is not `jax.devices()[0]` (a compile-only device). Within `kernels.entry.unchecked_configs()` the
    kernel takes configs its checks reject (the compiler is the judge there)."""

    def memory_estimate(self, config: Any, problem: Problem, *, device_kind: str | None = None) -> Mapping[str, int]:
        """Bytes by kernel role ('forward', and 'dq' and 'dkv' for a backward problem), in the unit the compiler
        reports: shared memory per block (GPU) or scoped VMEM (TPU)."""
        ...

    def flash_attention(self, q, k, v, *, causal: bool = False, segment_ids=None, sm_scale: float | None = None,
                        config: Any = None, interpret: bool = False, device_kind: str | None = None): ...


def _takes_keyword(function: Callable, name: str) -> bool:
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return True  # a builtin or C function: nothing to check
    return any(p.kind is p.VAR_KEYWORD or (p.name == name and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))
               for p in parameters)


def protocol_gaps(module: Any) -> list[str]:
    """What a module lacks of `KernelModule`, in words (empty when it has it all)."""
    gaps = []
    for name in ("NAME", "VERSION"):
        if not isinstance(getattr(module, name, None), str) or not getattr(module, name):
            gaps.append(f"{name} (a non-empty string)")
    config = getattr(module, "Config", None)
    if not isinstance(config, type):
        gaps.append("Config (a class)")
    else:
        for method in ("default", "from_dict", "to_dict"):
            if not callable(getattr(config, method, None)):
                gaps.append(f"Config.{method}")
        if callable(getattr(config, "default", None)) and not _takes_keyword(config.default, "device_kind"):
            gaps.append("Config.default(problem, *, device_kind) (it takes no device_kind keyword)")
    for function, keywords in (("search_space", ()), ("invalid_reasons", ("device_kind",)),
                               ("flash_attention", ("causal", "segment_ids", "config", "interpret"))):
        value = getattr(module, function, None)
        if not callable(value):
            gaps.append(f"{function}()")
            continue
        lacking = [k for k in keywords if not _takes_keyword(value, k)]
        if lacking:
            gaps.append(f"{function}() keyword(s) {', '.join(lacking)}")
    return gaps


def target_gaps(module: Any) -> list[str]:
    """What a module lacks of `TargetKernelModule` (the compile targets' surface), in words."""
    gaps = protocol_gaps(module)
    estimate = getattr(module, "memory_estimate", None)
    if not callable(estimate):
        gaps.append("memory_estimate()")
    elif not _takes_keyword(estimate, "device_kind"):
        gaps.append("memory_estimate() keyword(s) device_kind")
    if callable(getattr(module, "flash_attention", None)) and not _takes_keyword(module.flash_attention,
                                                                                 "device_kind"):
        gaps.append("flash_attention() keyword(s) device_kind")
    return gaps


@functools.lru_cache(maxsize=None)
def load_target_kernel(platform: str) -> TargetKernelModule:
    """The built-in kernel of a compile target's platform, checked against `TargetKernelModule` (once: the estimates
    of every compile job go through it)."""
    path = BUILTIN[kernel_for_platform(platform)]
    module = load_kernel(path)
    gaps = target_gaps(module)
    if gaps:
        raise ValueError(f"kernel module {path!r} cannot be compiled for targets (autotune.kernel_protocol."
                         f"TargetKernelModule): missing or wrong {'; '.join(gaps)}")
    return module  # type: ignore[return-value]


def check_kernel(module: Any, path: str) -> KernelModule:
    """The module, if it offers the kernel surface; ValueError naming each missing piece otherwise."""
    gaps = protocol_gaps(module)
    if gaps:
        raise ValueError(f"kernel module {path!r} does not offer the kernel surface (autotune.kernel_protocol."
                         f"KernelModule): missing or wrong {'; '.join(gaps)}")
    return module  # type: ignore[return-value]


def load_kernel(name: str) -> KernelModule:
    """The kernel module for `gpu`, `tpu` or a dotted module path; ValueError if it cannot be imported or lacks the
    kernel surface."""
    path = BUILTIN.get(name, name)
    try:
        module: ModuleType = importlib.import_module(path)
    except ImportError as exc:
        raise ValueError(f"kernel must be 'gpu', 'tpu' or an importable module path, got {name!r} ({exc})") from None
    return check_kernel(module, path)


def refusals(kernel: KernelModule, problem: Problem, *, device_kind: str | None) -> list[str]:
    """Why `kernel` cannot run `problem` at all: its default config (where a search starts, what the runtime falls
    back to) is invalid for it (e.g. head_dim 2048 needs more shared memory than any block size leaves). Empty when
    it can. Such a problem is never recorded as a miss, and `search --misses` skips it: tuning cannot help."""
    try:
        config = kernel.Config.default(problem, device_kind=device_kind)
        return list(kernel.invalid_reasons(config, problem, device_kind=device_kind))
    except (ValueError, TypeError) as exc:
        return [str(exc)]


def kernel_for_platform(platform: str) -> str:
    """The built-in kernel that serves a platform: the Mosaic kernel on TPU, the Triton one elsewhere."""
    return "tpu" if platform == "tpu" else "gpu"


def device_kind_of(device) -> str | None:
    """The device kind a kernel's default and validity check are given: the real device's, None in interpret mode."""
    return None if device.interpret else device.device_kind
