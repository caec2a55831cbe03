"""The GPU figures the static time model needs, each named with where it comes from.

Published figures (datasheets, whitepapers, the CUDA programming guide) are plain constants with a source string;
constants fitted to measurements are named `FITTED_...` and say which data they were fitted on, so a reader can tell
a chip's spec from a number this model chose. The clock under load is the one figure that is neither: tensor-heavy
kernels run below the boost clock (power limit), and the chips publish no sustained figure.
"""
from __future__ import annotations

from dataclasses import dataclass

WHITEPAPER_H100 = "NVIDIA H100 Tensor Core GPU Architecture whitepaper (2022)"
WHITEPAPER_A100 = "NVIDIA A100 Tensor Core GPU Architecture whitepaper (2020)"
DATASHEET_H100 = "NVIDIA H100 Tensor Core GPU datasheet (SXM5 / PCIe columns)"
DATASHEET_H200 = "NVIDIA H200 Tensor Core GPU datasheet"
DATASHEET_A100 = "NVIDIA A100 Tensor Core GPU datasheet (SXM4 40 GB / 80 GB columns)"
CUDA_GUIDE = "CUDA C++ Programming Guide: 'Arithmetic Instructions' throughput table and 'Technical Specifications'"
CHIPS_AND_CHEESE = "chipsandcheese.com microbenchmarks (H100 PCIe, 2023), approximate"


@dataclass(frozen=True)
class GpuHardware:
    """One GPU product. Rates per SM per clock unless the name says otherwise; `sources` names each figure's origin."""

    name: str
    arch: str  # ptxas -arch
    sms: int
    boost_clock_ghz: float  # maximum SM clock
    spec_tensor_clock_ghz: float  # the clock the published tensor peak implies (peak / (sms * flops per clock))
    tensor_flops_per_clock: int  # dense bf16/fp16 FLOP per SM per clock
    tf32_flops_per_clock: int  # dense tf32 FLOP per SM per clock
    peak_bf16_tflops: float  # dense, published
    peak_tf32_tflops: float  # dense, published
    hbm_bytes_per_s: float
    l2_bytes: int
    l2_bytes_per_clock: int  # L2 read bandwidth, whole chip
    registers_per_sm: int
    max_warps_per_sm: int
    max_blocks_per_sm: int
    shared_memory_per_sm: int  # bytes usable by blocks
    schedulers_per_sm: int  # warp schedulers; each issues one warp instruction per clock
    fp32_lanes_per_sm: int
    mufu_lanes_per_sm: int
    shared_bytes_per_clock: int  # shared memory bandwidth per SM
    sources: tuple[tuple[str, str], ...] = ()

    def source(self, field_name: str) -> str:
        """Where the figure `field_name` comes from."""
        return dict(self.sources).get(field_name, "")


_COMMON_SOURCES = (
    ("registers_per_sm", CUDA_GUIDE + ": 64K 32-bit registers per SM (cc 8.0, 9.0)"),
    ("max_warps_per_sm", CUDA_GUIDE + ": 64 resident warps per SM (cc 8.0, 9.0)"),
    ("max_blocks_per_sm", CUDA_GUIDE + ": 32 resident blocks per SM (cc 8.0, 9.0)"),
    ("schedulers_per_sm", "whitepapers: 4 SM sub-partitions, one warp scheduler each (1 warp instruction / clock)"),
    ("mufu_lanes_per_sm", CUDA_GUIDE + ": 16 results per clock per SM for exp2/rsqrt/rcp (cc 8.0, 9.0)"),
    ("shared_bytes_per_clock", "whitepapers: 128 bytes per clock per SM of shared memory bandwidth"),
)

H100 = GpuHardware(
    name="h100", arch="sm_90a", sms=132, boost_clock_ghz=1.98, spec_tensor_clock_ghz=1.83,
    tensor_flops_per_clock=4096, tf32_flops_per_clock=2048, peak_bf16_tflops=989.4, peak_tf32_tflops=494.7,
    hbm_bytes_per_s=3.35e12, l2_bytes=50 * 2**20, l2_bytes_per_clock=8192, registers_per_sm=65536,
    max_warps_per_sm=64, max_blocks_per_sm=32, shared_memory_per_sm=233472, schedulers_per_sm=4,
    fp32_lanes_per_sm=128, mufu_lanes_per_sm=16, shared_bytes_per_clock=128,
    sources=_COMMON_SOURCES + (
        ("sms", WHITEPAPER_H100 + ": H100 SXM5 has 132 SMs"),
        ("boost_clock_ghz", "nvidia-smi max SM clock of an H100 SXM5 (1980 MHz); also autotune.compile.targets"),
        ("spec_tensor_clock_ghz", "derived: 989.4 TFLOP/s / (132 SMs * 4096 FLOP/clock)"),
        ("tensor_flops_per_clock", WHITEPAPER_H100 + ": 2048 dense FP16/BF16 FMA per clock per SM"),
        ("tf32_flops_per_clock", WHITEPAPER_H100 + ": 1024 dense TF32 FMA per clock per SM"),
        ("peak_bf16_tflops", DATASHEET_H100 + ": BF16 Tensor Core 1979 TFLOPS with sparsity, 989.4 dense"),
        ("peak_tf32_tflops", DATASHEET_H100 + ": TF32 Tensor Core 989 TFLOPS with sparsity, 494.7 dense"),
        ("hbm_bytes_per_s", DATASHEET_H100 + ": 3.35 TB/s HBM3"),
        ("l2_bytes", WHITEPAPER_H100 + ": 50 MB L2"),
        ("l2_bytes_per_clock", "assumed, not published: a 128x256x64-tile bf16 matmul at the ~800 TFLOP/s measured "
                               "on H100 reads 48 KB per SM per 1024-cycle k-step, so L2 gives >= 6.2 KB/clock "
                               "(" + CHIPS_AND_CHEESE + " saw 5.5-7 TB/s on the smaller PCIe part)"),
        ("shared_memory_per_sm", WHITEPAPER_H100 + ": 228 KB shared memory per SM"),
        ("fp32_lanes_per_sm", WHITEPAPER_H100 + ": 128 FP32 cores per SM"),
    ))

H200 = GpuHardware(
    **{**{f: getattr(H100, f) for f in H100.__dataclass_fields__}, "name": "h200", "hbm_bytes_per_s": 4.8e12,
       "sources": H100.sources + (("hbm_bytes_per_s", DATASHEET_H200 + ": 4.8 TB/s HBM3e; compute as H100 SXM"),)})

H100_PCIE = GpuHardware(
    **{**{f: getattr(H100, f) for f in H100.__dataclass_fields__}, "name": "h100_pcie", "sms": 114,
       "boost_clock_ghz": 1.755, "spec_tensor_clock_ghz": 1.62, "peak_bf16_tflops": 756.0,
       "peak_tf32_tflops": 378.0, "hbm_bytes_per_s": 2.0e12,
       "sources": H100.sources + (
           ("sms", WHITEPAPER_H100 + ": H100 PCIe has 114 SMs"),
           ("boost_clock_ghz", WHITEPAPER_H100 + ": H100 PCIe boost clock 1755 MHz"),
           ("spec_tensor_clock_ghz", "derived: 756 TFLOP/s / (114 SMs * 4096 FLOP/clock)"),
           ("peak_bf16_tflops", DATASHEET_H100 + ": PCIe BF16 1513 TFLOPS with sparsity, 756 dense"),
           ("hbm_bytes_per_s", DATASHEET_H100 + ": PCIe 2.0 TB/s HBM2e"),
       )})

A100 = GpuHardware(
    name="a100", arch="sm_80", sms=108, boost_clock_ghz=1.41, spec_tensor_clock_ghz=1.41,
    tensor_flops_per_clock=2048, tf32_flops_per_clock=1024, peak_bf16_tflops=312.0, peak_tf32_tflops=156.0,
    hbm_bytes_per_s=2.039e12, l2_bytes=40 * 2**20, l2_bytes_per_clock=5120, registers_per_sm=65536,
    max_warps_per_sm=64, max_blocks_per_sm=32, shared_memory_per_sm=167936, schedulers_per_sm=4,
    fp32_lanes_per_sm=64, mufu_lanes_per_sm=16, shared_bytes_per_clock=128,
    sources=_COMMON_SOURCES + (
        ("sms", WHITEPAPER_A100 + ": A100 has 108 SMs"),
        ("boost_clock_ghz", WHITEPAPER_A100 + ": boost clock 1410 MHz"),
        ("spec_tensor_clock_ghz", "derived: 312 TFLOP/s / (108 SMs * 2048 FLOP/clock) = 1.41 GHz"),
        ("tensor_flops_per_clock", WHITEPAPER_A100 + ": 1024 dense FP16/BF16 FMA per clock per SM"),
        ("tf32_flops_per_clock", WHITEPAPER_A100 + ": 512 dense TF32 FMA per clock per SM"),
        ("peak_bf16_tflops", DATASHEET_A100 + ": BF16 Tensor Core 312 TFLOPS dense"),
        ("peak_tf32_tflops", DATASHEET_A100 + ": TF32 Tensor Core 156 TFLOPS dense"),
        ("hbm_bytes_per_s", DATASHEET_A100 + ": 80 GB SXM4 2039 GB/s HBM2e"),
        ("l2_bytes", WHITEPAPER_A100 + ": 40 MB L2"),
        ("l2_bytes_per_clock", WHITEPAPER_A100 + ": L2 read bandwidth 5120 bytes per clock"),
        ("shared_memory_per_sm", WHITEPAPER_A100 + ": 164 KB shared memory per SM"),
        ("fp32_lanes_per_sm", WHITEPAPER_A100 + ": 64 FP32 cores per SM"),
    ))

A100_40GB = GpuHardware(
    **{**{f: getattr(A100, f) for f in A100.__dataclass_fields__}, "name": "a100_40gb", "hbm_bytes_per_s": 1.555e12,
       "sources": A100.sources + (("hbm_bytes_per_s", DATASHEET_A100 + ": 40 GB SXM4 1555 GB/s HBM2"),)})

HARDWARE: dict[str, GpuHardware] = {h.name: h for h in (H100, H200, H100_PCIE, A100, A100_40GB)}

# Fitted constants: chosen by benchmarks/predicted_vs_measured_gpu.py's calibration (a grid search for the median
# log ratio nearest 0 with the least spread) on tokamax 0.0.17's measured winners for H100
# (nvidia_h100_80gb_hbm3/pallas_triton_flash_attention.json, the keys JAX's mha can express), compiling JAX 0.10.2's
# mha with each winner's blocks. A100 and the Mosaic GPU table were never used to fit them.
# GHz; the fit chose the spec tensor clock (1.70 and 1.98 fitted worse); other GPUs run at their boost clock
FITTED_CLOCK_UNDER_LOAD = {"h100": 1.83, "h200": 1.83, "h100_pcie": 1.62}
FITTED_WAIT_CYCLES = 300  # a warpgroup-wide wgmma wait (S product waited on at once): pipeline latency exposed
FITTED_BARRIER_CYCLES = 40  # one CTA-wide barrier per loop iteration: the slowest warp's skew
FITTED_WARP_ISSUE_CYCLES = 3  # a lone warp issues about one instruction per this many cycles (dependent chains)
FITTED_PROGRAM_CYCLES = 8000  # per program: first loads from HBM, the final store, CTA launch
FITTED_LAUNCH_SECONDS = 3.0e-6  # per kernel launch (tokamax times whole calls)


@dataclass(frozen=True)
class Fitted:
    """The fitted constants as one value, so the calibration can try others without touching the module."""

    clock_under_load: tuple[tuple[str, float], ...] = tuple(FITTED_CLOCK_UNDER_LOAD.items())
    wait_cycles: float = FITTED_WAIT_CYCLES
    barrier_cycles: float = FITTED_BARRIER_CYCLES
    program_cycles: float = FITTED_PROGRAM_CYCLES
    warp_issue_cycles: float = FITTED_WARP_ISSUE_CYCLES
    launch_seconds: float = FITTED_LAUNCH_SECONDS

    def clock_ghz(self, hw: GpuHardware) -> float:
        """The SM clock a tensor-heavy kernel runs at (fitted for Hopper, the boost clock elsewhere)."""
        return dict(self.clock_under_load).get(hw.name, hw.boost_clock_ghz)


FITTED = Fitted()


def get_hardware(name: str) -> GpuHardware:
    """The GPU called `name` (a target name such as 'h100' or 'a100'); ValueError listing the known ones."""
    if name not in HARDWARE:
        raise ValueError(f"GPU must be one of {sorted(HARDWARE)}, got {name!r}")
    return HARDWARE[name]
