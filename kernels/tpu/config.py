"""Block sizes of the TPU kernel: the config type, its default, its search space and its validity rules.

The rules mirror what Mosaic accepts (last two block dims divisible by 8 and 128 unless they span the whole array)
plus a VMEM estimate, so the autotuner can discard a candidate before paying for a compile.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from kernels.configs import IntConfig
from kernels.devices import MIB, default_scoped_vmem, tpu_generation, vmem_limit  # noqa: F401  (re-exported)
from kernels.problem import Problem
from kernels.tpu.layout import Layout
from kernels.tpu.vmem import LANES, SUBLANES, fits_for, kernel_itemsize, round_up, temporary_sizes
from kernels.tpu.vmem import tile as _tile


@dataclass(frozen=True)
class Config(IntConfig):
    """Forward blocks (batch, query rows, kv rows per grid step, kv rows per inner step) and backward blocks."""

    block_b: int
    block_q: int
    block_k_major: int
    block_k: int
    bwd_block_q: int
    bwd_block_k_major: int
    bwd_block_k: int

    positive = True

    @classmethod
    def default(cls, problem: Problem, *, device_kind: str | None = None) -> "Config":
        """A heuristic config that is valid for the problem: big blocks, shrunk until the VMEM estimate fits the
        device's limit (the smallest chip's when `device_kind` is None)."""
        q_full = round_up(problem.q_len, SUBLANES)
        kv_full = round_up(problem.kv_len, LANES)
        cap = window_block_cap(problem) or 512  # a narrow window wants blocks about as wide as itself
        block_q, block_k_major = min(512, q_full, cap), min(512, kv_full, cap)
        # backward: 256-blocks, or one block when the sequence fits in 512 (less padding than 256-blocks)
        bwd_q = min(q_full if q_full <= 512 else 256, cap)
        bwd_k_major = min(kv_full if kv_full <= 512 else 256, cap)
        config = cls(1, block_q, block_k_major, block_k_major, bwd_q, bwd_k_major, bwd_k_major)
        limit = vmem_limit(device_kind)
        fits_forward = lambda c: forward_vmem_bytes(c, problem, device_kind) <= limit  # noqa: E731
        fits_backward = lambda c: backward_vmem_bytes(c, problem, device_kind) <= limit  # noqa: E731
        config = _shrink(config, fits_forward, "block_q", "block_k_major", "block_k")
        return _shrink(config, fits_backward, "bwd_block_q", "bwd_block_k_major", "bwd_block_k")


def window_span(problem: Problem) -> int | None:
    """Keys one query row can see through the window (left + right + 1; causal caps right at 0), or None when a
    side is unbounded (no window, or a one-sided one without causal)."""
    return problem.band.span


def window_block_cap(problem: Problem) -> int | None:
    """The largest block worth using under a narrow window: the window's span rounded up to a power of two (at
    least 128, a lane tile), or None when the window does not bound it (wider than 512 tokens, or none): larger
    blocks only add masked work, since the kernels skip the blocks outside the band."""
    span = window_span(problem)
    if span is None or span > 512:
        return None
    cap = LANES
    while cap < span:
        cap *= 2
    return cap


def _shrink(config: Config, fits, q_name: str, kv_name: str, k_name: str) -> Config:
    """Halve the larger of the query and kv blocks until `fits(config)`, or until both are down to 128."""
    while not fits(config) and max(getattr(config, q_name), getattr(config, kv_name)) > LANES:
        if getattr(config, q_name) >= getattr(config, kv_name):
            config = dataclasses.replace(config, **{q_name: _halve(getattr(config, q_name))})
        else:
            half = _halve(getattr(config, kv_name))
            config = dataclasses.replace(config, **{kv_name: half, k_name: half})
    return config


def _halve(block: int) -> int:
    """Half a block, kept a multiple of 128 (blocks above 128 here are always multiples of 128 or small)."""
    return max(LANES, round_up(block // 2, LANES))


def search_space(problem: Problem) -> dict[str, tuple[int, ...]]:
    """Candidate values per field, capped near the padded lengths (and, under a narrow window, at twice the
    window's span: wider blocks only add masked work); backward fields only when the problem has one."""
    narrow = window_block_cap(problem)
    limit = (lambda cap: cap) if narrow is None else (lambda cap: min(cap, 2 * narrow))  # noqa: E731

    def q_blocks(cap: int) -> tuple[int, ...]:
        cap = limit(cap)
        full = round_up(problem.q_len, SUBLANES)
        values = {b for b in (128, 256, 512, 1024) if b < full and b <= cap}
        if full <= cap:
            values.add(full)  # one block over the whole (padded) query length
        return tuple(sorted(values))

    def kv_blocks(cap: int) -> tuple[int, ...]:
        cap = limit(cap)
        full = round_up(problem.kv_len, LANES)
        values = {b for b in (128, 256, 512, 1024, 2048) if b < full and b <= cap}
        if full <= cap:
            values.add(full)
        return tuple(sorted(values))

    space = {
        "block_b": tuple(b for b in (1, 2, 4, 8) if problem.batch % b == 0),
        "block_q": q_blocks(1024),
        "block_k_major": kv_blocks(2048),
        "block_k": kv_blocks(512),
    }
    if problem.backward:
        space.update(bwd_block_q=q_blocks(512), bwd_block_k_major=kv_blocks(1024), bwd_block_k=kv_blocks(512))
    return space


ROLES = ("forward", "dq", "dkv")  # the kernels, in the order of the fits' coefficients (kernels.tpu.vmem)


@dataclass(frozen=True)
class VmemParts:
    """One kernel's VMEM before the fitted temporaries: its blocks (double-buffered by the pipeline) and scratch,
    exact; the sizes its temporaries scale with (`temporary_sizes`: over the batch block, and of one batch row);
    the widest block (it picks the margin)."""

    fixed: int
    sizes: tuple[int, ...]
    widest: int
    row_sizes: tuple[int, ...]

    def sizes_for(self, per_row: bool) -> tuple[int, ...]:
        return self.row_sizes if per_row else self.sizes


def vmem_parts(role: str, config: Config, problem: Problem) -> VmemParts:
    """The parts of the forward, dq or dkv kernel's VMEM (what `benchmarks/fit_tpu_vmem.py` fits against)."""
    it, d, bb = kernel_itemsize(problem), problem.head_dim, config.block_b
    # a pair tile (kernels.tpu.layout) holds two heads: their per-row statistics and score tiles, in one program
    n = Layout.of(problem.heads, problem.kv_heads, d).per_tile
    if role == "forward":
        bq, bkm, bk = config.block_q, config.block_k_major, config.block_k
        # q, out; k, v; the logsumexp only when the backward needs it (the forward writes it only then: v4's
        # forward-only compiles reported less than their blocks and scratch with a double-buffered lse block; a
        # forward with `return_lse`, which no Problem names, is checked with it in kernels.tpu.attention)
        blocks = bb * (2 * _tile(bq, d, it) + 2 * _tile(bkm, d, it)
                       + (n * _tile(bq, LANES, 4) if problem.backward else 0))
        if problem.segments:
            blocks += bb * (_tile(bq, LANES, 4) + _tile(SUBLANES, bkm, 4))
        scratch = bb * (2 * n * _tile(bq, LANES, 4) + _tile(bq, d, 4))  # running max and sum, accumulator
        score = (bq, bk, bkm, bkm // bk)  # the score tile [rows, cols], the major block, its chunks
    elif role == "dq":  # q, do, k, v, lse, delta (and ids) blocks and dq; an accumulator
        bq, bkm, bk = config.bwd_block_q, config.bwd_block_k_major, config.bwd_block_k
        blocks = bb * (3 * _tile(bq, d, it) + 2 * _tile(bkm, d, it) + 2 * n * _tile(bq, LANES, 4))
        if problem.segments:
            blocks += bb * (_tile(bq, LANES, 4) + _tile(SUBLANES, bkm, 4))
        scratch = bb * _tile(bq, d, 4)
        score = (bq, bk, bkm, bkm // bk)  # the score tile [rows, cols], the major block, its chunks
    elif role == "dkv":  # q, do, k, v, dk, dv, lse and delta rows (and ids); two accumulators over the kv block
        bq, bkm, bk = config.bwd_block_q, config.bwd_block_k_major, config.bwd_block_k
        blocks = bb * (2 * _tile(bq, d, it) + 4 * _tile(bkm, d, it) + 2 * n * _tile(SUBLANES, bq, 4))
        if problem.segments:
            blocks += bb * (_tile(SUBLANES, bq, 4) + _tile(bkm, LANES, 4))
        scratch = 2 * bb * _tile(bkm, d, 4)
        score = (bk, bq, bkm, bkm // bk)  # kv rows by query columns
    else:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    return VmemParts(fixed=2 * blocks + scratch, sizes=_per_head(temporary_sizes(problem, bb, *score), n),
                     widest=max(bq, bkm), row_sizes=_per_head(temporary_sizes(problem, bb, *score, per_row=True), n))


def _per_head(sizes: tuple[int, ...], heads: int) -> tuple[int, ...]:
    """Temporary sizes for a tile of `heads` heads: the score-tile terms (scores, masks, other chunks) once per
    head, the operand tiles once (a pair shares its 128 lanes)."""
    return tuple(heads * size if i in (0, 3, 5) else size for i, size in enumerate(sizes))


def kernel_vmem_bytes(role: str, config: Config, problem: Problem, device_kind: str | None = None) -> int:
    """VMEM of one program of the forward, dq or dkv kernel: exact blocks and scratch, fitted temporaries, margin."""
    parts, kernel, itemsize = vmem_parts(role, config, problem), ROLES.index(role), kernel_itemsize(problem)
    return max(fit.estimate(parts.fixed, parts.sizes_for(fit.per_row), kernel, itemsize, parts.widest)
               for fit in fits_for(device_kind))


def forward_vmem_bytes(config: Config, problem: Problem, device_kind: str | None = None) -> int:
    """VMEM of one forward program."""
    return kernel_vmem_bytes("forward", config, problem, device_kind)


def dq_vmem_bytes(config: Config, problem: Problem, device_kind: str | None = None) -> int:
    """VMEM of one dq program."""
    return kernel_vmem_bytes("dq", config, problem, device_kind)


def dkv_vmem_bytes(config: Config, problem: Problem, device_kind: str | None = None) -> int:
    """VMEM of one dk/dv program."""
    return kernel_vmem_bytes("dkv", config, problem, device_kind)


def backward_vmem_bytes(config: Config, problem: Problem, device_kind: str | None = None) -> int:
    """VMEM of the larger of the two backward kernels (dq, and dk/dv)."""
    return max(dq_vmem_bytes(config, problem, device_kind), dkv_vmem_bytes(config, problem, device_kind))


def memory_estimate(config: Config, problem: Problem, *, device_kind: str | None = None) -> dict[str, int]:
    """VMEM each kernel of the problem needs, in bytes, by role: the forward, and dq and dkv when the problem has a
    backward (what the checks judge, and what compile targets set beside the compiler's figure)."""
    found = {"forward": forward_vmem_bytes(config, problem, device_kind)}
    if problem.backward:
        found.update(dq=dq_vmem_bytes(config, problem, device_kind), dkv=dkv_vmem_bytes(config, problem, device_kind))
    return found


def _block_reasons(prefix: str, bq: int, bkm: int, bk: int, problem: Problem) -> list[str]:
    reasons = []
    q_unit = LANES if prefix else SUBLANES  # the dk/dv kernel lays query rows along lanes
    q_cap, kv_cap = round_up(problem.q_len, LANES), round_up(problem.kv_len, LANES)
    if bkm % bk:
        reasons.append(f"{prefix}block_k ({bk}) must divide {prefix}block_k_major ({bkm})")
    whole_kv = bk == bkm >= problem.kv_len  # one block over the whole padded kv: any size tiles
    if not whole_kv:
        for name, value in (("block_k_major", bkm), ("block_k", bk)):
            if value % LANES:
                reasons.append(
                    f"{prefix}{name} ({value}) must be a multiple of {LANES} (TPU lanes) "
                    f"unless {prefix}block_k == {prefix}block_k_major spans the whole kv length ({problem.kv_len})"
                )
    if bq % q_unit and bq < problem.q_len:
        reasons.append(
            f"{prefix}block_q ({bq}) must be a multiple of {q_unit} (TPU {'lanes' if prefix else 'sublanes'}) "
            f"unless it spans the whole query length ({problem.q_len})"
        )
    if bq > q_cap:
        reasons.append(f"{prefix}block_q ({bq}) exceeds the query length rounded up to {LANES} ({q_cap})")
    if bkm > kv_cap:
        reasons.append(f"{prefix}block_k_major ({bkm}) exceeds the kv length rounded up to {LANES} ({kv_cap})")
    return reasons


def invalid_reasons(config: Config, problem: Problem, *, device_kind: str | None = None,
                    return_lse: bool = False) -> list[str]:
    """Why `config` cannot run `problem` (empty if it can); backward blocks are checked when problem.backward, and
    the forward with its log-sum-exp block when the call returns it (`return_lse`, which no Problem names)."""
    if not isinstance(config, Config):
        raise TypeError(f"config must be a kernels.tpu.Config, got {type(config).__name__}")
    reasons = []
    if problem.batch % config.block_b:
        reasons.append(f"block_b ({config.block_b}) must divide the batch ({problem.batch})")
    reasons += _block_reasons("", config.block_q, config.block_k_major, config.block_k, problem)
    limit = vmem_limit(device_kind)
    need = forward_vmem_bytes(config, problem.replace(backward=True) if return_lse else problem, device_kind)
    if need > limit:
        reasons.append(f"forward needs about {need / MIB:.1f} MiB of VMEM, over the {limit / MIB:.0f} MiB limit")
    if problem.backward:
        reasons += _block_reasons("bwd_", config.bwd_block_q, config.bwd_block_k_major, config.bwd_block_k, problem)
        need = backward_vmem_bytes(config, problem, device_kind)
        if need > limit:
            reasons.append(f"backward needs about {need / MIB:.1f} MiB of VMEM, over the {limit / MIB:.0f} MiB limit")
    return reasons


def vmem_limit_bytes(config: Config, problem: Problem, *, device_kind: str | None = None) -> int | None:
    """The scoped VMEM limit to compile `config` with: None (the compiler's default) when twice its estimated need
    (the larger of forward and backward when the problem has one) fits that default, else twice the need, at most
    the device's limit; so a config the checks accept is not refused by the default scoped limit, and a small one
    does not reserve more VMEM than the default (a scoped reservation is VMEM that XLA cannot prefetch into)."""
    need = forward_vmem_bytes(config, problem, device_kind)
    if problem.backward:
        need = max(need, backward_vmem_bytes(config, problem, device_kind))
    if LIMIT_HEADROOM * need <= default_scoped_vmem(device_kind):
        return None
    return int(min(LIMIT_HEADROOM * need, vmem_limit(device_kind)))


# The scoped limit a kernel sets is twice its estimate (at most the capacity): an estimate a little low then costs
# nothing below the capacity, where the compiler would otherwise refuse a config that fits the chip.
LIMIT_HEADROOM = 2
