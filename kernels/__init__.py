"""Pallas flash-attention kernels and the einsum reference they are checked against.

Pure JAX: nothing here knows about the results database or the search. Each kernel lives in its own subpackage
(`kernels.gpu`: Triton lowering; `kernels.tpu`: Mosaic TPU lowering) and offers the same surface, the
`autotune.kernel_protocol.KernelModule` protocol (checked whenever a kernel is loaded): `NAME`, `VERSION`,
`Config` (with `default(problem, *, device_kind)`, `to_dict`, `from_dict`), `search_space(problem)`,
`invalid_reasons(config, problem, *, device_kind)` and `flash_attention(q, k, v, ...)`. `device_kind` is the
real device's kind (`jax.devices()[0].device_kind`), or None in interpret mode. Both kernels (and the runtime)
start with `prepare` (kernels.entry: every argument checked once) and take which pairs are visible, and which
blocks to visit, from `kernels.masking`.
"""
import kernels.environment  # noqa: F401  (first: environment defaults before jax is imported)
from kernels.entry import Prepared, prepare
from kernels.masking import Band
from kernels.problem import DTYPES, Problem, canonical_dtype, check_inputs, resolve_scale
from kernels.reference import attention_mask, attention_reference, tolerance

__all__ = [
    "DTYPES", "Band", "Prepared", "Problem", "attention_mask", "attention_reference", "canonical_dtype",
    "check_inputs", "prepare", "resolve_scale", "tolerance",
]
