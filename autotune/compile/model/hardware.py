"""TPU hardware constants for the static time model, each a named value with where it comes from.

Figures are per device as JAX sees it (the compile-only device a deviceless compile targets): a v4 or v5p megacore
device is one chip with two TensorCores that a Pallas grid's parallel dimensions are split over; a TPU7x device is
one of the chip's two TensorCores (`get_topology_desc("tpu7x:1x1x1")` lists 2 devices of 1 core each), so it gets
half the chip's published peak and bandwidth. Clocks that are not published are derived from the published peak
and the MXU shape the compiler's own vmatmul size shows; they say so. Fitted constants are named FITTED_*.
"""
from __future__ import annotations

from dataclasses import dataclass

# One bf16 vmatmul pushes one packed vreg (16 rows x 128 contraction lanes) through an MXU: 16 x K x N MACs.
# Measured from the compiler's output: a 4096^3 bf16 XLA matmul issues 2^37 / (2 * 16 * 128 * 128) vmatmuls on
# v4/v5e/v5p and 2^37 / (2 * 16 * 256 * 256) on v6e/TPU7x (benchmarks/predicted_vs_measured_tpu.py, part a).
_FLOPS_PER_VMATMUL_128 = 2 * 16 * 128 * 128
_FLOPS_PER_VMATMUL_256 = 2 * 16 * 256 * 256

# What one granule of a `dma.done.wait` count is, per generation. Read off the compiler's output, not fitted: a
# Pallas copy kernel moving (512, 128) f32 blocks (256 KiB) waits 8192 granules per block on v5e, v5p, v6e and
# TPU7x (32 B each) and 512 on v4 (512 B each); likewise XLA's f32 x*2+1 over 256 MiB waits 125312 granules per
# step on v5e but 7712 per step on v4 with the same 4 MiB steps (benchmarks/results/predicted-vs-measured-tpu.md).
DMA_GRANULE_BYTES = {"v4": 512, "v5e": 32, "v5p": 32, "v6e": 32, "tpu7x": 32}

# Fitted on JAX's TPU flash attention at the jax-ml/jax#24633 shape on v5e (batch 32, heads 8, d64, bf16, 128
# blocks, non-causal; published 2.36 / 9.49 / 37.61 / 144.97 ms at 512..4096 tokens): the time per grid step that
# the bundles do not show (pipeline DMA issue/wait and semaphore round trips). 4 points, one constant, least squares
# of log ratio (390 cycles: predicted/measured 0.985 / 0.983 / 1.005 / 1.029); see benchmarks/results/predicted-vs-measured-tpu.md. Scaled by clock for the other generations.
FITTED_STEP_OVERHEAD_CYCLES_V5E = 390.0
# Fixed cost of starting one program (kernel launch from the top-level program, semaphore setup). Not fitted:
# the order of a few microseconds that XLA's TPU profiles show between ops.
LAUNCH_SECONDS = 2e-6


@dataclass(frozen=True)
class TpuHardware:
    """One TPU target's figures for the model (per JAX device)."""

    name: str
    clock_hz: float
    clock_source: str
    mxus_per_core: int  # MXU issue slots per bundle (the compiler's static-per-bundle-utilization capacity)
    mxu_shape: tuple[int, int]
    flops_per_vmatmul: int
    peak_flops: float  # bf16 dense, per device (all its cores)
    peak_source: str
    hbm_bytes_per_s: float  # per device
    hbm_source: str
    cores: int  # TensorCores a Pallas grid's parallel dimensions are split over
    cores_source: str
    step_overhead_cycles: float  # per grid step, beyond the bundles
    dma_granule_bytes: int  # bytes per granule of a DMA wait's count (DMA_GRANULE_BYTES)

    @property
    def core_peak_flops(self) -> float:
        return self.peak_flops / self.cores

    @property
    def mxu_seconds_per_vmatmul(self) -> float:
        """How long one vmatmul occupies its MXU: its flops over one MXU's share of the core's peak."""
        return self.flops_per_vmatmul / (self.core_peak_flops / self.mxus_per_core)

    @property
    def step_overhead_seconds(self) -> float:
        return self.step_overhead_cycles / self.clock_hz


def _hw(name: str, clock: float, clock_source: str, mxus: int, shape: int, peak_tf: float, peak_source: str,
        hbm_gb: float, hbm_source: str, cores: int, cores_source: str) -> TpuHardware:
    return TpuHardware(name=name, clock_hz=clock, clock_source=clock_source, mxus_per_core=mxus,
                       mxu_shape=(shape, shape),
                       flops_per_vmatmul=_FLOPS_PER_VMATMUL_128 if shape == 128 else _FLOPS_PER_VMATMUL_256,
                       peak_flops=peak_tf * 1e12, peak_source=peak_source, hbm_bytes_per_s=hbm_gb * 1e9,
                       hbm_source=hbm_source, cores=cores, cores_source=cores_source,
                       step_overhead_cycles=FITTED_STEP_OVERHEAD_CYCLES_V5E, dma_granule_bytes=DMA_GRANULE_BYTES[name])


_MEGACORE = "megacore: one JAX device drives both TensorCores; Pallas splits parallel grid dims over them"
TPU_HARDWARE: dict[str, TpuHardware] = {h.name: h for h in (
    _hw("v4", 1.05e9, "1050 MHz, Jouppi et al., 'TPU v4', ISCA 2023, Table 1", 4, 128, 275.0 / 2,
        "cloud.google.com/tpu/docs/v4: 275 TFLOPS bf16 per chip; halved: the deviceless v4 topology has 2 "
        "one-core devices per chip (a 4096^3 XLA matmul's dump holds all its vmatmuls on one core)", 1228.0 / 2,
        "cloud.google.com/tpu/docs/v4: 1228 GB/s HBM per chip (autotune/compile/targets.py), halved per device", 1,
        "libtpu 0.0.42's v4:1x1x1 compile-only device has num_cores 1 (not megacore)"),
    _hw("v5e", 1.5e9, "derived: 197 TFLOPS / (4 MXU x 128 x 128 x 2); not published", 4, 128, 197.0,
        "cloud.google.com/tpu/docs/v5e: 197 TFLOPS bf16 per chip", 819.0,
        "cloud.google.com/tpu/docs/v5e: 819 GB/s HBM", 1, "one TensorCore per chip"),
    _hw("v5p", 1.75e9, "derived: 459 TFLOPS / (2 cores x 4 MXU x 128 x 128 x 2); not published", 4, 128, 459.0,
        "cloud.google.com/tpu/docs/v5p: 459 TFLOPS bf16 per chip", 2765.0,
        "cloud.google.com/tpu/docs/v5p: 2765 GB/s HBM", 2, _MEGACORE),
    _hw("v6e", 1.75e9, "derived, not published: the compiler issues one 16x256x256 vmatmul per MXU every 8 "
        "bundles (XLA's 8192^3 bf16 matmul), and 918 TFLOPS over 2 MXUs at that rate is 1.75 GHz", 2, 256, 918.0, "cloud.google.com/tpu/docs/v6e: 918 TFLOPS bf16 per chip", 1640.0,
        "cloud.google.com/tpu/docs/v6e: 1640 GB/s HBM", 1, "one TensorCore per chip"),
    _hw("tpu7x", 1.9e9, "assumed: not published", 2, 256, 2307.0 / 2,
        "cloud.google.com/tpu/docs/tpu7x: 2307 TFLOPS bf16 per chip, 2 TensorCores = 2 JAX devices", 7380.0 / 2,
        "cloud.google.com/tpu/docs/tpu7x: 7380 GB/s HBM per chip, halved per device", 1,
        "each TensorCore is its own JAX device"),
)}


def tpu_hardware(target_name: str) -> TpuHardware:
    """The figures for a TPU target named as in autotune.compile.targets (v4, v5e, v5p, v6e, tpu7x)."""
    if target_name not in TPU_HARDWARE:
        raise ValueError(f"no TPU hardware figures for {target_name!r}; known: {sorted(TPU_HARDWARE)}")
    return TPU_HARDWARE[target_name]
