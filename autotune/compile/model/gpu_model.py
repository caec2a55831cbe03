"""Predicted GPU run time of a compiled kernel from its SASS: per loop iteration, then over the grid and the SMs.

Per iteration of a loop, a CTA needs tensor-core cycles (its MMAs' FLOPs over the SM's rate) and issue cycles for
everything else (one warp instruction per scheduler per clock; exponentials and, on A100, FP32 math take longer
per instruction), shared-memory and L2 cycles for the tiles it moves. When several CTAs share an SM (occupancy from
registers, shared memory and threads) these resources are shared; what one CTA cannot hide is its own dependence
chain: on Hopper the S product is waited on at once (`WARPGROUP.DEPBAR.LE gsb0, 0x0`), on Ampere the HMMA writes
the registers the softmax reads, so tensor time and the rest run one after the other; a barrier per iteration keeps
the warps in lockstep, and a scheduler with few warps issues below one instruction per clock (dependent chains).
An iteration takes the larger of the shared resources and that chain. Programs (each with its own trip counts from
the kernel's block arithmetic) are then scheduled over the SMs' slots in launch order, which gives waves and the
causal tail. The prediction is held above the roofline (useful FLOPs over the peak, bytes over HBM bandwidth).
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

from autotune.compile.model.gpu_blocks import Work
from autotune.compile.model.gpu_hardware import FITTED, Fitted, GpuHardware
from autotune.compile.model.gpu_sass import Block, KernelSass
from autotune.compile.model.prediction import GPU_MODEL_VERSION, Prediction


@dataclass(frozen=True)
class IterationCost:
    """Cycles of one loop iteration of one CTA while `occupancy` CTAs share the SM, and what each resource needs."""

    cycles: float
    tensor: float  # all resident CTAs' tensor-core cycles
    issue: float  # the busiest scheduler's cycles (issue, exponentials, FP32 pipe)
    memory: float  # shared memory and L2 cycles
    chain: float  # one CTA's own dependence chain

    @property
    def bound(self) -> str:
        top = max(self.tensor, self.issue, self.memory, self.chain)
        if top == self.chain and self.chain > max(self.tensor, self.issue, self.memory):
            return "latency"
        return "memory" if top == self.memory else "compute"


def occupancy(hw: GpuHardware, kernel: KernelSass) -> int:
    """CTAs per SM: the tightest of threads, registers (256 per warp granule), shared memory (1 KiB reserved each)."""
    warps = kernel.warps
    by_warps = hw.max_warps_per_sm // warps
    regs_per_warp = -(-max(kernel.registers, 1) * 32 // 256) * 256
    by_regs = hw.registers_per_sm // (regs_per_warp * warps)
    by_smem = hw.shared_memory_per_sm // (kernel.shared_memory + 1024) if kernel.shared_memory else hw.max_blocks_per_sm
    return max(1, min(hw.max_blocks_per_sm, by_warps, by_regs, by_smem))


def _tensor_cycles(hw: GpuHardware, kernel: KernelSass, block: Block) -> float:
    """One CTA's tensor-core cycles for `block`: HGMMA runs per warpgroup on all 4 tensor cores, HMMA per warp on its
    sub-partition's one (so fewer than 4 warps leave tensor cores idle)."""
    cycles = 0.0
    busiest = -(-kernel.warps // hw.schedulers_per_sm)
    for mma in block.mmas:
        rate = hw.tf32_flops_per_clock if mma.tf32 else hw.tensor_flops_per_clock
        if mma.op == "HGMMA":
            cycles += mma.flops * max(1, kernel.warps // 4) / rate
        else:
            cycles += mma.flops * busiest / (rate / hw.schedulers_per_sm)
    return cycles


def iteration_cost(hw: GpuHardware, kernel: KernelSass, block: Block, resident: int,
                   fitted: Fitted = FITTED) -> IterationCost:
    """The cost of one iteration of `block` for each of `resident` CTAs on an SM."""
    warps = kernel.warps
    per_sched = -(-warps // hw.schedulers_per_sm)  # one CTA's warps on its busiest scheduler
    lanes = 32 * hw.schedulers_per_sm
    c = block.counts
    mufu = c.get("mufu", 0) * per_sched * lanes / hw.mufu_lanes_per_sm
    fp32 = c.get("fp32", 0) * per_sched * lanes / hw.fp32_lanes_per_sm
    # a scheduler issues one instruction per clock, but only when some warp is ready: with few warps on it, each
    # warp's own dependent instructions space its issue out
    own = max(block.instructions * max(per_sched, fitted.warp_issue_cycles), mufu, fp32)
    shared_issue = max(block.instructions * max(resident * per_sched, fitted.warp_issue_cycles), resident * mufu,
                       resident * fp32)
    tensor = _tensor_cycles(hw, kernel, block)
    shared = block.shared_bytes * warps / hw.shared_bytes_per_clock
    l2 = block.global_bytes * warps / (hw.l2_bytes_per_clock / hw.sms)
    bars = c.get("bar", 0)
    serial = block.full_waits or any(m.op == "HMMA" for m in block.mmas)
    if serial:  # the MMA result is used in the same iteration (wgmma waited on at once; HMMA writes registers)
        chain = tensor + own + block.full_waits * fitted.wait_cycles + bars * fitted.barrier_cycles
    else:
        chain = max(tensor, own) + bars * fitted.barrier_cycles
    all_tensor, all_issue, all_memory = resident * tensor, shared_issue, resident * max(shared, l2)
    cycles = max(all_tensor, all_issue, all_memory, chain)
    return IterationCost(cycles=cycles, tensor=all_tensor, issue=all_issue, memory=all_memory, chain=chain)


def _schedule(durations: list[float], slots: int) -> float:
    """Finish time of programs started in order on `slots` slots, each taking the next free one."""
    if len(set(durations)) == 1:
        waves = -(-len(durations) // slots)
        return waves * durations[0]
    free = [0.0] * min(slots, len(durations))
    heapq.heapify(free)
    end = 0.0
    for d in durations:
        start = heapq.heappop(free)
        end = max(end, start + d)
        heapq.heappush(free, start + d)
    return end


def predict_kernel(hw: GpuHardware, kernel: KernelSass, work: Work | None, fitted: Fitted = FITTED) -> Prediction:
    """Predicted seconds of one launch of `kernel`; `work` gives trips per grid x index (None: a loop-free kernel,
    or one whose loops run once per program) and the useful FLOPs and bytes for the roofline."""
    resident = occupancy(hw, kernel)
    clock = fitted.clock_ghz(hw) * 1e9
    per_sched = -(-kernel.warps // hw.schedulers_per_sm)
    prologue = fitted.program_cycles + kernel.rest.instructions * per_sched * resident
    costs = [iteration_cost(hw, kernel, b, resident, fitted) for b in kernel.loops]
    main = max(range(len(costs)), key=lambda i: costs[i].tensor + costs[i].issue, default=None)
    per_x = []
    weights = {"tensor": 0.0, "issue": 0.0, "memory": 0.0, "chain": 0.0}
    rows = work.trips if work is not None and len(work.trips) == kernel.grid[0] else \
        ((1,) * len(costs),) * kernel.grid[0]
    for trips in rows:
        cycles = prologue
        if len(trips) != len(costs):  # the loops do not line up with the ranges: all trips on the main loop
            trips = tuple(sum(trips) if i == main else 0 for i in range(len(costs)))
        for n, cost in zip(trips, costs):
            cycles += n * cost.cycles
            for part in weights:
                weights[part] += n * getattr(cost, part) / max(resident, 1)
        per_x.append(cycles)
    copies = kernel.grid[1] * kernel.grid[2]
    durations = per_x * copies  # launch order: x fastest, then y, z
    slots = hw.sms * resident
    body = _schedule(durations, slots) / clock
    flops = work.flops if work is not None else 0.0
    min_bytes = work.min_bytes if work is not None else 0.0
    hbm = min_bytes / hw.hbm_bytes_per_s
    roofline = max(flops / (hw.peak_bf16_tflops * 1e12), hbm)
    seconds = max(body, hbm) + fitted.launch_seconds
    per_sm = copies / hw.sms / clock
    parts = {
        "tensor_core": weights["tensor"] * per_sm, "issue": weights["issue"] * per_sm,
        "shared_l2": weights["memory"] * per_sm, "dependence_chain": weights["chain"] * per_sm,
        "prologue_epilogue": prologue * len(durations) / slots / clock, "hbm": hbm,
        "launch": fitted.launch_seconds, "schedule": body, "occupancy": float(resident),
        "roofline_compute": flops / (hw.peak_bf16_tflops * 1e12), "roofline_memory": hbm,
    }
    if hbm >= body:
        bound = "memory"
    elif parts["prologue_epilogue"] + fitted.launch_seconds > 0.5 * seconds:
        bound = "overhead"
    else:
        top = max(("tensor_core", "issue", "shared_l2"), key=parts.get)
        if parts["dependence_chain"] > 1.25 * parts[top]:  # a CTA's own serial chain, not a shared unit, limits
            top = "dependence_chain"
        bound = {"tensor_core": "compute", "issue": "compute", "shared_l2": "memory",
                 "dependence_chain": "latency"}[top]
    return Prediction(seconds=max(seconds, roofline, 1e-9), roofline_seconds=roofline, bound=bound, parts=parts,
                      model_version=GPU_MODEL_VERSION)


def combine(predictions: list[Prediction]) -> Prediction:
    """Kernels launched one after another: times, rooflines and parts add; the longest kernel names the bound."""
    if not predictions:
        raise ValueError("no kernel predictions to combine")
    parts: dict[str, float] = {}
    for p in predictions:
        for key, value in p.parts.items():
            if key != "occupancy":
                parts[key] = parts.get(key, 0.0) + value
    longest = max(predictions, key=lambda p: p.seconds)
    parts["occupancy"] = longest.parts.get("occupancy", 0.0)  # CTAs per SM of the longest kernel
    return Prediction(seconds=sum(p.seconds for p in predictions),
                      roofline_seconds=sum(p.roofline_seconds for p in predictions), bound=longest.bound,
                      parts=parts, model_version=GPU_MODEL_VERSION)
