"""What a real compile says about each kernel, read from its logs and dumps; and what kind of failure an error is.

Shared memory per GPU kernel is in XLA's thunk sequence dump; registers, stack and spills are in the ptxas log XLA
writes at verbose level 2 (`TF_CPP_VMODULE=subprocess_compilation=2`); a TPU kernel's scoped VMEM is in the
`used_scoped_memory_configs` of its `tpu_custom_call` in the after-codegen HLO dump. Plain functions over text,
so they are tested without any compiler installed.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from db.figures import FAILURE_KINDS, RESOURCE_EXHAUSTED, ROLES  # noqa: F401  (the stored schema: db/figures.py)

# A GPU config that spills is never the predicted best nor a device search's start (which skips it), and the
# model's second ptxas run over a spilling kernel costs as much as its compile (16 H100 configs of a d128 backward,
# 14 spilling: 81.5 s of predicting on 100.4 s of compiling), so it is left unpredicted.
SPILLS_NOT_PREDICTED = "not predicted: it spills registers (never the predicted best; the model would run ptxas again)"


@dataclass(frozen=True)
class KernelFigures:
    """One compiled kernel: its role (forward, dq, dkv), the compiler's name for it, and its real figures."""

    role: str
    name: str
    memory_bytes: int  # shared memory (GPU) or used scoped VMEM (TPU)
    registers: int | None = None  # GPU only, per thread
    spill_store_bytes: int | None = None
    spill_load_bytes: int | None = None
    stack_bytes: int | None = None
    threads: int | None = None  # GPU only, per block
    operands_in_vmem: int = 0  # TPU: bytes of the kernel's operands XLA prefetched whole into VMEM (counted in
    # memory_bytes, so that figure is then more than the kernel's own need)

    @property
    def spills(self) -> bool:
        return bool(self.spill_store_bytes or self.spill_load_bytes)


def kernel_role(name: str) -> str | None:
    """forward / dq / dkv from a kernel's name (ours are named ..._fwd, ..._dq, ..._dkv); None for XLA's own."""
    low = name.lower()
    if "fusion" in low or "flash_attention" not in low:
        return None
    if "dkv" in low or "dk_dv" in low or "_dk" in low:
        return "dkv"
    if "dq" in low:
        return "dq"
    if "fwd" in low or "forward" in low:
        return "forward"
    return None


_PTXAS = re.compile(
    r"Function properties for (?P<name>[\w.$]+)\s*\n\s*(?P<stack>\d+) bytes stack frame, (?P<stores>\d+) bytes spill "
    r"stores, (?P<loads>\d+) bytes spill loads\s*\n[^\n]*?Used (?P<regs>\d+) registers"
)
_THUNK = re.compile(
    r"kCustomKernel[^\n]*?\]\s+(?P<name>[\w.$]+)\s+grid:[^\n]*?threads: \[(?P<tx>\d+), (?P<ty>\d+), (?P<tz>\d+)\]"
    r"\s+shared_memory: (?P<smem>\d+) bytes"
)


def gpu_kernels(ptxas_log: str, thunk_sequence: str) -> tuple[KernelFigures, ...]:
    """Our kernels in a GPU compile: shared memory and threads from the thunk sequence, the rest from ptxas."""
    ptxas = {m["name"]: m for m in _PTXAS.finditer(ptxas_log)}
    found: dict[str, KernelFigures] = {}
    for m in _THUNK.finditer(thunk_sequence):
        role = kernel_role(m["name"])
        if role is None or m["name"] in found:
            continue
        p = ptxas.get(m["name"])
        found[m["name"]] = KernelFigures(
            role=role, name=m["name"], memory_bytes=int(m["smem"]),
            registers=int(p["regs"]) if p else None,
            spill_store_bytes=int(p["stores"]) if p else None, spill_load_bytes=int(p["loads"]) if p else None,
            stack_bytes=int(p["stack"]) if p else None, threads=int(m["tx"]) * int(m["ty"]) * int(m["tz"]),
        )
    return tuple(sorted(found.values(), key=lambda k: ROLES.index(k.role)))


_TPU_CALL = re.compile(r'^\s*(?:ROOT\s+)?%(?P<name>[\w.\-]+) = [^\n]*custom_call_target="tpu_custom_call"[^\n]*$', re.M)
_USED = re.compile(r'"used_scoped_memory_configs":\[(?P<body>[^\]]*)\]')
_CONFIG = re.compile(r'\{[^{}]*"size":"(?P<size>\d+)"[^{}]*\}')
_OFFSET = re.compile(r'"offset":"(\d+)"')


def scoped_use(configs: str) -> int:
    """The VMEM a kernel uses within its scoped region: XLA may place the region at an offset (32, 64, 96 MiB)
    and then reports its end, offset + use; the use is what the kernel needs."""
    use = 0
    for m in _CONFIG.finditer(configs):
        size = int(m["size"])
        offset = _OFFSET.search(m.group(0))
        start = int(offset[1]) if offset else 0
        use = max(use, size - start if 0 < start < size else size)
    return use


_DEFINITION = re.compile(r'^\s*(?:ROOT\s+)?%(?P<name>[\w.\-]+) = (?P<dtype>[a-z]+\d*)\[(?P<dims>[\d,]*)\]\{[^}]*S\(1\)', re.M)
_OPERANDS = re.compile(r'custom-call\((?P<args>[^)]*)\)')
_ITEMSIZE = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s8": 1, "u8": 1, "pred": 1, "f64": 8, "s64": 8}


def _in_vmem(after_codegen: str) -> dict[str, int]:
    """Bytes of every array XLA placed in VMEM (memory space S(1)), by instruction name."""
    found = {}
    for m in _DEFINITION.finditer(after_codegen):
        count = 1
        for dim in filter(None, m["dims"].split(",")):
            count *= int(dim)
        found[m["name"]] = count * _ITEMSIZE.get(m["dtype"], 4)
    return found


def tpu_kernels(after_codegen: str) -> tuple[KernelFigures, ...]:
    """Our kernels in a TPU compile, with the scoped VMEM each really uses (within its region), and the bytes of
    its operands XLA prefetched whole into VMEM (on chips with VMEM to spare; the figure then counts them)."""
    found: dict[str, KernelFigures] = {}
    vmem = _in_vmem(after_codegen)
    for m in _TPU_CALL.finditer(after_codegen):
        role = kernel_role(m["name"])
        used = _USED.search(m.group(0))
        if role is None:
            continue
        size = scoped_use(used["body"]) if used else 0  # none listed: no scoped VMEM of its own (operands in VMEM)
        operands = _OPERANDS.search(m.group(0))
        names = [a.split("*/")[-1].strip().lstrip("%") for a in operands["args"].split(",")] if operands else []
        prefetched = sum(vmem.get(name, 0) for name in names)
        previous = found.get(role)
        if previous is None or size > previous.memory_bytes:
            found[role] = KernelFigures(role=role, name=m["name"], memory_bytes=size, operands_in_vmem=prefetched)
    return tuple(sorted(found.values(), key=lambda k: ROLES.index(k.role)))


_GPU_SMEM = re.compile(r"Shared memory size limit exceeded: requested (\d+), available:? (\d+)")
_TPU_SCOPED = re.compile(r"[Ss]coped allocation with size ([\d.]+)([KMG]?)(?:i?B)? and limit ([\d.]+)([KMG]?)")
_TPU_USED_OF = re.compile(r"Used ([\d.]+)([KMG]?) of ([\d.]+)([KMG]?) vmem")
_TPU_ALLOCATION = re.compile(r"Allocation \(size=(\d+)\) would exceed memory \(size=(\d+)\)")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def _bytes(number: str, unit: str) -> int:
    return int(round(float(number) * _UNITS[unit.upper()]))


def classify_failure(message: str) -> tuple[str, int | None, int | None]:
    """(kind, requested bytes, limit bytes) of a compile error; bytes are None when the message names none."""
    for pattern in (_GPU_SMEM, _TPU_ALLOCATION):
        m = pattern.search(message)
        if m:
            return RESOURCE_EXHAUSTED, int(m[1]), int(m[2])
    for pattern in (_TPU_SCOPED, _TPU_USED_OF):
        m = pattern.search(message)
        if m:
            return RESOURCE_EXHAUSTED, _bytes(m[1], m[2]), _bytes(m[3], m[4])
    if "RESOURCE_EXHAUSTED" in message or "CompileTimeScopedVmemOom" in message or "out of memory" in message:
        return RESOURCE_EXHAUSTED, None, None
    lowering = ("Mosaic", "MLIR", "lowering", "Lowering", "NotImplementedError", "Triton", "triton",
                "not supported", "Unsupported", "unsupported")
    if any(word in message for word in lowering):
        return "lowering_error", None, None
    return "other", None, None
