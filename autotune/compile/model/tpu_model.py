"""Predict a TPU program's run time from its final bundles (`tpu_bundles`), the chip's figures (`hardware`) and
what the kernel's own block arithmetic says about skipped work (`KernelWork`).

Per trip of a program's outermost loop (for a Pallas kernel: one grid step) the time is the largest of
- issue: the bundles the core steps through (a bundle per cycle; predicated regions holding the MXU work weighted
  by the fraction of steps that run them, nested loops times their trips),
- MXU: the busiest MXU's vmatmuls times how long each occupies it (bundles issue them back to back),
- DMA: the bytes the step waits for over HBM bandwidth (the pipeline double-buffers, so it overlaps the rest),
plus a per-step overhead the bundles do not show (`hardware.FITTED_STEP_OVERHEAD_CYCLES_V5E`). Steps are split
over the TensorCores of a megacore device. XLA fusions and copies around the kernel are timed the same way (their
loops are DMA pipelines too); the top-level program adds its bundles and each program a launch cost. The result is
never below the roofline (useful flops over peak, bytes over bandwidth).
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from autotune.compile.model.hardware import LAUNCH_SECONDS, TpuHardware
from autotune.compile.model.prediction import TPU_MODEL_VERSION, Prediction
from autotune.compile.model.tpu_bundles import Bundle, Loop, Program


@dataclass(frozen=True)
class KernelWork:
    """What the kernel's block arithmetic says: useful flops and bytes (the roofline), the fraction of grid steps
    whose MXU work runs (causal, window, lengths), and whether its grid can be split over two TensorCores."""

    flops: float
    hbm_bytes: float
    compute_fraction: float = 1.0
    splits_over_cores: bool = True


@dataclass(frozen=True)
class ProgramTime:
    """One program's predicted parts (seconds): per-trip bounds summed over trips, outside-loop bundles, launch."""

    name: str
    kind: str
    trips: int
    issue: float
    mxu: float
    dma: float
    overhead: float
    prologue: float

    @property
    def seconds(self) -> float:
        return max(self.issue, self.mxu, self.dma) + self.overhead + self.prologue


def _mxu_weights(program: Program, compute_fraction: float) -> list[float]:
    """Per bundle: `compute_fraction` inside a predicated region that holds vmatmuls, 1 elsewhere."""
    weights = [1.0] * len(program.bundles)
    if compute_fraction >= 1.0:
        return weights
    for region in program.regions:
        if any(program.bundles[i].matmuls for i in range(region.start, region.end)):
            for i in range(region.start, region.end):
                weights[i] = compute_fraction
    return weights


def _waited_bytes(bundle: Bundle, hw: TpuHardware, predicated_weight: float) -> float:
    """Bytes a bundle waits for per run, its predicated waits weighted by how often they run."""
    always = bundle.dma_granules - bundle.predicated_dma_granules
    return (always + bundle.predicated_dma_granules * predicated_weight) * hw.dma_granule_bytes


def predicated_wait_weight(program: Program, hw: TpuHardware) -> float:
    """How often an XLA program's predicated DMA waits run, per trip. Its pipeline guards the write-back of an
    output tile with a predicate (the tile is written once, after the last step of its reduction), so over the
    program those waits move its output once: the program's output bytes over what they would move if every trip
    ran them (1 when the dump does not say). A v6e bf16 8192^3 matmul writes its 5.6 MB tile on 24 of 384 steps."""
    if program.output_bytes is None:
        return 1.0
    per_run = sum(b.predicated_dma_granules * _trips_of(program, i) for i, b in enumerate(program.bundles)
                  if b.predicated_dma_granules) * hw.dma_granule_bytes
    return min(1.0, program.output_bytes / per_run) if per_run else 1.0


def _trip_cost(program: Program, loop: Loop, weights: list[float], hw: TpuHardware,
               predicated_weight: float) -> tuple[float, Counter, float]:
    """(bundles, vmatmuls per MXU unit, bytes) for one trip of `loop`, nested loops included with their trips."""
    cycles, units, nbytes = 0.0, Counter(), 0.0
    inner = {i for child in loop.children for i in range(child.start, child.end)}
    for i in range(loop.start, loop.end):
        if i in inner:
            continue
        bundle, w = program.bundles[i], weights[i]
        cycles += w
        for unit in bundle.matmuls:
            units[unit] += w
        nbytes += _waited_bytes(bundle, hw, predicated_weight) * w
    for child in loop.children:
        trips = max(child.trips or 1, 1)
        c, u, b = _trip_cost(program, child, weights, hw, predicated_weight)
        cycles += c * trips
        nbytes += b * trips
        for unit, n in u.items():
            units[unit] += n * trips
    return cycles, units, nbytes


def _mxu_seconds(units: Counter, hw: TpuHardware) -> float:
    """The busiest MXU's occupancy; vmatmuls that name no unit are spread over all of them."""
    shared = units.get("", 0.0) / hw.mxus_per_core
    busiest = max((n for unit, n in units.items() if unit), default=0.0)
    return (busiest + shared) * hw.mxu_seconds_per_vmatmul


def program_time(program: Program, hw: TpuHardware, *, compute_fraction: float = 1.0, cores: int = 1,
                 sharing: int = 1, predicated_weight: float = 1.0) -> ProgramTime:
    """Time one program; `cores` > 1 splits its outermost loops' trips (a megacore kernel's parallel grid),
    `sharing` cores stream from HBM at once (XLA's own programs on a megacore device: the dump shows one core's
    share of the work, and both cores run it); `predicated_weight`: how often predicated DMA waits run."""
    weights = _mxu_weights(program, compute_fraction)
    in_loops = {i for lp in program.loops for i in range(lp.start, lp.end)}
    prologue = sum(1 for i in range(len(program.bundles)) if i not in in_loops) / hw.clock_hz
    issue = mxu = dma = overhead = 0.0
    total_trips = 0
    for loop in program.loops:
        trips = max(loop.trips or 1, 1)
        per_core = math.ceil(trips / cores)
        cycles, units, nbytes = _trip_cost(program, loop, weights, hw, predicated_weight)
        # the slowest bound of each step decides it: sum the per-step maxima, split into named parts
        step_issue, step_mxu = cycles / hw.clock_hz, _mxu_seconds(units, hw)
        step_dma = nbytes * max(sharing, min(cores, trips)) / hw.hbm_bytes_per_s  # the cores share HBM
        step = max(step_issue, step_mxu, step_dma)
        issue += per_core * (step if step == step_issue else 0.0)
        mxu += per_core * (step if step == step_mxu and step != step_issue else 0.0)
        dma += per_core * (step if step == step_dma and step not in (step_issue, step_mxu) else 0.0)
        overhead += per_core * hw.step_overhead_seconds
        total_trips += trips
    return ProgramTime(program.name, program.kind, total_trips, issue, mxu, dma, overhead, prologue)


def predict_programs(programs: list[Program], hw: TpuHardware, work: KernelWork | None = None) -> Prediction:
    """A prediction for one compile's programs (kernels, fusions, copies, TLP); `work` describes the kernels."""
    times: list[ProgramTime] = []
    for program in programs:
        if program.kind == "other":
            continue
        # the compiler already splits a megacore device's work: a Pallas grid loop shows one core's trips
        # (prod(grid) / 2 + 2 on v5p) and an XLA fusion one core's share, so only HBM is shared between cores
        if program.kind == "kernel" and work is not None:
            sharing = hw.cores if work.splits_over_cores else 1
            times.append(program_time(program, hw, compute_fraction=work.compute_fraction, sharing=sharing))
        else:
            times.append(program_time(program, hw, sharing=hw.cores,
                                      predicated_weight=predicated_wait_weight(program, hw)))
    parts: dict[str, float] = Counter()
    for t in times:
        key = {"kernel": "kernel", "tlp": "top_level"}.get(t.kind, "xla_ops")
        parts[f"{key}_issue"] += t.issue
        parts[f"{key}_mxu"] += t.mxu
        parts[f"{key}_dma"] += t.dma
        parts[f"{key}_step_overhead"] += t.overhead
        parts[f"{key}_prologue"] += t.prologue
    launches = sum(1 for t in times if t.kind != "tlp") * LAUNCH_SECONDS
    parts["launch"] = launches
    total = sum(t.seconds for t in times) + launches
    if work is not None:
        flops, nbytes = work.flops, work.hbm_bytes
    else:  # a plain XLA program: every vmatmul is useful work, every waited byte crosses HBM
        flops = sum(len(b.matmuls) * _trips_of(p, i) for p in programs for i, b in enumerate(p.bundles)
                    if b.matmuls) * hw.flops_per_vmatmul
        nbytes = sum(_waited_bytes(b, hw, predicated_wait_weight(p, hw)) * _trips_of(p, i)
                     for p in programs for i, b in enumerate(p.bundles) if b.dma_granules)
    compute_roof, memory_roof = flops / hw.peak_flops, nbytes / hw.hbm_bytes_per_s
    roofline = max(compute_roof, memory_roof)
    parts["roofline_compute"] = compute_roof
    parts["roofline_memory"] = memory_roof
    seconds = max(total, roofline, 1e-9)
    return Prediction(seconds=seconds, roofline_seconds=roofline, bound=_bound(parts, roofline, total),
                      parts={k: float(v) for k, v in parts.items() if v}, model_version=TPU_MODEL_VERSION)


def _trips_of(program: Program, index: int) -> int:
    """How often bundle `index` runs: the product of the trips of the loops holding it."""
    count, loops = 1, program.loops
    while True:
        loop = next((lp for lp in loops if lp.start <= index < lp.end), None)
        if loop is None:
            return count
        count *= max(loop.trips or 1, 1)
        loops = loop.children


def _bound(parts: dict[str, float], roofline: float, total: float) -> str:
    """What dominates: the roofline's side when the prediction sits on it, else the largest group of parts."""
    if roofline >= total:
        return "compute" if parts["roofline_compute"] >= parts["roofline_memory"] else "memory"
    groups = {"compute": 0.0, "memory": 0.0, "overhead": 0.0}
    for name, value in parts.items():
        if name.startswith("roofline"):
            continue
        if name.endswith(("_issue", "_mxu")):
            groups["compute"] += value
        elif name.endswith("_dma"):
            groups["memory"] += value
        else:
            groups["overhead"] += value
    return max(groups, key=groups.get)
