"""What we know of each device, in one place: platforms, GPU architecture and shared memory, TPU generation and VMEM.

The kernels (their defaults and memory checks), the compile targets and the runtime all read these facts here, so
they cannot disagree at an edge. A `device_kind` is what jax reports (`jax.devices()[0].device_kind`, e.g.
'NVIDIA H100 80GB HBM3', 'TPU v5 lite'), or None in interpret mode. Interpret mode is judged by the largest
current GPU (a Hopper) and by the smallest current TPU (16 MiB of VMEM): what runs there then runs on hardware
only where the device's own figures allow it, and the checks with the real device kind say so.
"""
from __future__ import annotations

INTERPRET = "cpu-interpret"  # the platform of a tuning key made where kernels only run in interpret mode
# jax's platform names -> ours; any other (the CPU) runs the kernels in interpret mode only
PLATFORMS = {"gpu": "gpu", "cuda": "gpu", "rocm": "gpu", "tpu": "tpu"}

MIB = 1 << 20


def platform_of(jax_platform: str) -> str:
    """Our platform ('gpu', 'tpu' or INTERPRET) for a jax device's `platform`."""
    return PLATFORMS.get(jax_platform, INTERPRET)


# ---- NVIDIA GPUs --------------------------------------------------------------------------------------------------

HOPPER = ("h100", "h200", "h800", "h20", "gh200")  # sm_90: 16-bit dots with 64+ rows (4+ warps) run on wgmma
# Opt-in shared memory per block (bytes) by GPU; an unknown GPU gets the smallest current figure (99 KiB: sm_86/89).
SMEM_PER_BLOCK = (
    (HOPPER, 232448),
    (("a100", "a800", "a30"), 166912),
    (("l4", "l40", "4090", "4080", "a10", "a40", "3090", "a6000", "ada"), 101376),
)
SMALL_SMEM = 101376


def _interpret_or_cpu(device_kind: str | None) -> bool:
    return device_kind is None or "cpu" in device_kind.lower()


def is_hopper(device_kind: str | None) -> bool:
    """Hopper (sm_90): Triton feeds 16-bit dots with 64+ rows to wgmma, and the kernels walk the key blocks in
    one loop; interpret mode (None, or a CPU's kind) is treated as Hopper, like its shared-memory limit."""
    if _interpret_or_cpu(device_kind):
        return True
    kind = device_kind.lower()
    return any(name in kind for name in HOPPER)


def smem_limit(device_kind: str | None) -> int:
    """Shared memory one program may use, in bytes; interpret mode (None or a CPU) is treated as Hopper."""
    if _interpret_or_cpu(device_kind):
        return SMEM_PER_BLOCK[0][1]
    kind = device_kind.lower()
    words = kind.replace("-", " ").split()
    for names, limit in SMEM_PER_BLOCK:
        if any(name in words or (len(name) > 3 and name in kind) for name in names):
            return limit
    return SMALL_SMEM


# ---- TPUs ---------------------------------------------------------------------------------------------------------

# Per TPU generation, measured with deviceless compiles (libtpu 0.0.42): the scoped VMEM limit the compiler applies
# when a kernel sets none, and the VMEM a kernel may use when it raises the limit (`vmem_limit_bytes`).
DEFAULT_SCOPED_VMEM = {"v4": 16 * MIB, "v5e": 16 * MIB, "v5p": 16 * MIB, "v6e": 32 * MIB, "7x": 32 * MIB}
# v5p's capacity is 62915 B short of 64 MiB ("Used 64.83M of 63.94M vmem").
VMEM_CAPACITY = {"v4": 16 * MIB, "v5e": 128 * MIB, "v5p": 67045949, "v6e": 128 * MIB, "7x": 64 * MIB}
SMALL_VMEM = 16 * MIB  # the smallest current TPU's: an unknown device or interpret mode is judged by it
_GENERATIONS = {"v4": "v4", "v5 lite": "v5e", "v5e": "v5e", "v5litepod": "v5e", "v5": "v5p", "v5p": "v5p",
                "v6 lite": "v6e", "v6e": "v6e", "7x": "7x", "v7x": "7x", "v7": "7x", "7": "7x"}


def tpu_generation(device_kind: str | None) -> str | None:
    """'v4', 'v5e', 'v5p', 'v6e' or '7x' from a device kind as jax reports it ('TPU v5 lite', 'TPU7x'...)."""
    kind = " ".join((device_kind or "").lower().replace("tpu", " ").split())
    return _GENERATIONS.get(kind)


def default_scoped_vmem(device_kind: str | None) -> int:
    """The scoped VMEM limit the compiler applies by default (16 MiB for an unknown device: the smallest)."""
    return DEFAULT_SCOPED_VMEM.get(tpu_generation(device_kind), SMALL_VMEM)


def vmem_limit(device_kind: str | None) -> int:
    """VMEM one kernel may use on the device (the kernels raise the scoped limit to their need, up to this);
    16 MiB, the smallest chip's, for an unknown device or interpret mode."""
    return VMEM_CAPACITY.get(tpu_generation(device_kind), SMALL_VMEM)
