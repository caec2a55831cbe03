"""The named compile targets: GPUs and TPUs that the real compilers can compile for on any machine.

A target names a device the kernels are tuned for and what the deviceless compile needs to stand in for it: the
device kind jax reports on the real device (what `Config.default` and `invalid_reasons` are given), the TPU
topology name or the GPU description XLA compiles against, and the limits the validity checks judge configs by.
The GPU descriptions are written here from published device figures (XLA's `GpuTargetConfigProto` text form, as in
XLA's own specs, xla/tools/hlo_opt/gpu_specs/*.txtpb, where it has one); the memory limits come from the kernels'
validity models (which read kernels.devices), so the catalogue and the checks cannot disagree.

A target's results apply on every device kind it covers (`device_kinds`: the strings jax reports for products that
compile to the same code with the same limits, e.g. the 40 GB and 80 GB A100); `target_for_device_kind` is the one
place a device kind is matched to a target.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from kernels.devices import smem_limit, vmem_limit

PLATFORMS = ("gpu", "tpu")


@dataclass(frozen=True)
class GpuSpec:
    """The device description XLA:GPU compiles against (published figures of one product)."""

    compute_capability: tuple[int, int]
    accelerated_features: bool  # sm_90a: wgmma and TMA instructions
    cores: int
    fpus_per_core: int
    shared_memory_per_core: int
    shared_memory_per_block_optin: int
    memory_bandwidth: int  # bytes/s
    l2_cache_size: int
    clock_rate_ghz: float
    device_memory_size: int
    dnn_version: tuple[int, int, int]


@dataclass(frozen=True)
class Target:
    """One named compile target; `memory_limit_bytes` is shared memory per block (GPU) or default scoped VMEM (TPU)."""

    name: str
    platform: str
    device_kind: str  # the kind jax reports on the product the target describes; its compile-only keys carry it
    description: str
    memory_limit_bytes: int
    peak_bf16_tflops: float  # dense, published
    hbm_gbytes_per_s: float  # published
    topology: str = ""  # TPU topology name for get_topology_desc
    gpu: GpuSpec | None = None
    also_covers: tuple[str, ...] = ()  # other device kinds whose compiles are the same (same chip, same limits)
    sources: str = ""  # where the published figures come from
    hardware: str = ""  # the performance model's entry (autotune/compile/model), if not the target's name

    @property
    def device_kinds(self) -> tuple[str, ...]:
        """Every device kind this target's results apply to, its own first."""
        return (self.device_kind, *self.also_covers)

    @property
    def model_hardware(self) -> str:
        """The name of the product in the performance model's hardware tables."""
        return self.hardware or self.name

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data.pop("gpu")
        data.pop("also_covers")
        data.pop("hardware")
        data["device_kinds"] = list(self.device_kinds)
        if self.gpu is not None:
            data["compute_capability"] = "sm_{}{}{}".format(*self.gpu.compute_capability,
                                                           "a" if self.gpu.accelerated_features else "")
        return data


XLA_SPECS = "XLA's published GPU specs (xla/tools/hlo_opt/gpu_specs/{}.txtpb)"
WHITEPAPER_H100 = "NVIDIA H100 Tensor Core GPU Architecture whitepaper (2022)"
DATASHEET_H100 = "NVIDIA H100 Tensor Core GPU datasheet"
DATASHEET_H200 = "NVIDIA H200 Tensor Core GPU datasheet (SXM column)"
DATASHEET_A100 = "NVIDIA A100 Tensor Core GPU datasheet"
TPU_DOCS = "Google Cloud TPU documentation, system architecture page of the generation"


def _gpu(name: str, kinds: tuple[str, ...], description: str, tflops: float, spec: GpuSpec, sources: str,
         hardware: str = "") -> Target:
    return Target(name=name, platform="gpu", device_kind=kinds[0], description=description,
                  memory_limit_bytes=smem_limit(kinds[0]), peak_bf16_tflops=tflops,
                  hbm_gbytes_per_s=spec.memory_bandwidth / 1e9, gpu=spec, also_covers=kinds[1:], sources=sources,
                  hardware=hardware)


def _tpu(name: str, kind: str, description: str, topology: str, tflops: float, hbm: float) -> Target:
    return Target(name=name, platform="tpu", device_kind=kind, description=description,
                  memory_limit_bytes=vmem_limit(kind), peak_bf16_tflops=tflops, hbm_gbytes_per_s=hbm,
                  topology=topology, sources=TPU_DOCS)


# The GPUs: compute capability, SMs, clocks, memory and caches as XLA's own specs give them (h100_sxm, h100_pcie,
# a100_sxm_80); the H200 has no XLA spec: it is the H100 SXM's chip (same SMs, clocks, caches) with the datasheet's
# HBM3e, so it compiles to the same code as the h100 target and only its memory figures differ.
_H100_SXM = GpuSpec(
    compute_capability=(9, 0), accelerated_features=True, cores=132, fpus_per_core=128,
    shared_memory_per_core=233472, shared_memory_per_block_optin=232448, memory_bandwidth=3352320000000,
    l2_cache_size=52428800, clock_rate_ghz=1.98, device_memory_size=84942979072, dnn_version=(9, 10, 0))
TARGETS: dict[str, Target] = {t.name: t for t in (
    _gpu("h100", ("NVIDIA H100 80GB HBM3",), "NVIDIA H100 SXM 80 GB (Hopper, sm_90a)", 989.0, _H100_SXM,
         XLA_SPECS.format("h100_sxm") + "; " + DATASHEET_H100 + " (SXM: 989 dense BF16 TFLOP/s)"),
    _gpu("h100-pcie", ("NVIDIA H100 PCIe",), "NVIDIA H100 PCIe 80 GB (Hopper, sm_90a)", 756.0, GpuSpec(
        compute_capability=(9, 0), accelerated_features=True, cores=114, fpus_per_core=128,
        shared_memory_per_core=233472, shared_memory_per_block_optin=232448, memory_bandwidth=2039040000000,
        l2_cache_size=52428800, clock_rate_ghz=1.755, device_memory_size=84942979072, dnn_version=(9, 10, 0)),
         XLA_SPECS.format("h100_pcie") + "; " + DATASHEET_H100 + " (PCIe: 756 dense BF16 TFLOP/s)",
         hardware="h100_pcie"),
    _gpu("h200", ("NVIDIA H200",), "NVIDIA H200 SXM 141 GB (Hopper, sm_90a)", 989.0, dataclasses.replace(
        _H100_SXM, memory_bandwidth=4800000000000, device_memory_size=141 * 10**9),
         DATASHEET_H200 + " (141 GB HBM3e, 4.8 TB/s, 989 dense BF16 TFLOP/s); the rest as "
         + XLA_SPECS.format("h100_sxm") + " (" + WHITEPAPER_H100 + ": the same GH100 chip)"),
    _gpu("a100", ("NVIDIA A100-SXM4-80GB", "NVIDIA A100-SXM4-40GB", "NVIDIA A100 80GB PCIe", "NVIDIA A100-PCIE-40GB"),
         "NVIDIA A100 SXM 80 GB (Ampere, sm_80)", 312.0, GpuSpec(
             compute_capability=(8, 0), accelerated_features=False, cores=108, fpus_per_core=64,
             shared_memory_per_core=167936, shared_memory_per_block_optin=166912, memory_bandwidth=2039040000000,
             l2_cache_size=41943040, clock_rate_ghz=1.41, device_memory_size=85100068864, dnn_version=(8, 9, 4)),
         XLA_SPECS.format("a100_sxm_80") + "; " + DATASHEET_A100 + " (312 dense BF16 TFLOP/s; the 40 GB and PCIe "
         "parts have the same 108 SMs and shared memory)"),
    _tpu("v4", "TPU v4", "TPU v4 (one chip, megacore)", "v4:1x1x1", 275.0, 1228.0),
    _tpu("v5e", "TPU v5 lite", "TPU v5e (one chip)", "v5e:1x1", 197.0, 819.0),
    _tpu("v5p", "TPU v5", "TPU v5p (one chip, megacore)", "v5p:1x1x1", 459.0, 2765.0),
    _tpu("v6e", "TPU v6 lite", "TPU v6e Trillium (one chip)", "v6e:1x1", 918.0, 1640.0),
    _tpu("tpu7x", "TPU7x", "TPU7x Ironwood (one chip)", "tpu7x:1x1x1", 2307.0, 7380.0),
)}


def get_target(name: str) -> Target:
    """The target called `name`; ValueError listing the known names otherwise."""
    if not isinstance(name, str) or name not in TARGETS:
        raise ValueError(f"target must be one of {sorted(TARGETS)}, got {name!r}")
    return TARGETS[name]


def target_for_device_kind(kind: str) -> Target | None:
    """The target whose results apply on a device that jax reports as `kind` (one of its `device_kinds`, compared
    without regard to case and surrounding spaces); None when no target covers it (an L4, a CPU)."""
    wanted = " ".join(str(kind).split()).lower()
    for target in TARGETS.values():
        if any(wanted == covered.lower() for covered in target.device_kinds):
            return target
    return None


def gpu_target_config(target: Target) -> str:
    """XLA's GpuTargetConfigProto, text form, describing a GPU target for a deviceless compile."""
    if target.gpu is None:
        raise ValueError(f"target {target.name!r} is not a GPU target")
    g = target.gpu
    info = {
        "threads_per_block_limit": 1024, "threads_per_warp": 32, "shared_memory_per_block": 49152,
        "shared_memory_per_core": g.shared_memory_per_core, "threads_per_core_limit": 2048,
        "core_count": g.cores, "fpus_per_core": g.fpus_per_core, "block_dim_limit_x": 2147483647,
        "block_dim_limit_y": 65535, "block_dim_limit_z": 65535, "memory_bandwidth": g.memory_bandwidth,
        "l2_cache_size": g.l2_cache_size, "clock_rate_ghz": g.clock_rate_ghz,
        "device_memory_size": g.device_memory_size, "shared_memory_per_block_optin": g.shared_memory_per_block_optin,
    }
    lines = ["gpu_device_info {"] + [f"  {key}: {value}" for key, value in info.items()]
    feature = "ACCELERATED_FEATURES" if g.accelerated_features else "NONE"
    lines += [
        "  cuda_compute_capability {", f"    major: {g.compute_capability[0]}",
        f"    minor: {g.compute_capability[1]}", f"    feature_extension: {feature}", "  }",
        "  registers_per_core_limit: 65536", "  registers_per_block_limit: 65536",
        "  thread_dim_limit_x: 1024", "  thread_dim_limit_y: 1024", "  thread_dim_limit_z: 64", "}",
        'platform_name: "CUDA"',
        "dnn_version_info {", f"  major: {g.dnn_version[0]}", f"  minor: {g.dnn_version[1]}",
        f"  patch: {g.dnn_version[2]}", "}",
        f'device_description_str: "{target.device_kind}"',
    ]
    return "\n".join(lines) + "\n"
