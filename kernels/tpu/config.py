"""Block sizes of the TPU kernel: the config type, its default, its search space and its validity rules.

The rules mirror what Mosaic accepts (last two block dims divisible by 8 and 128 unless they span the whole array)
plus a VMEM estimate, so the autotuner can discard a candidate before paying for a compile.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from kernels.configs import IntConfig
from kernels.devices import MIB, default_scoped_vmem, tpu_generation, vmem_limit
from kernels.problem import Problem

LANES = 128  # TPU vreg lane count: minor block dims are multiples of this
SUBLANES = 8  # TPU vreg sublane count: second-minor block dims are multiples of this


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


def round_up(x: int, unit: int) -> int:
    return -(-x // unit) * unit


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


def kernel_itemsize(problem: Problem) -> int:
    """Bytes per element the kernels see: float16 is widened to float32 before the kernels (no f16 MXU path)."""
    return {"float32": 4, "bfloat16": 2, "float16": 4}[problem.dtype]


def _tile(rows: int, cols: int, itemsize: int) -> int:
    """VMEM bytes of a [rows, cols] tile after padding to the native (sublane, lane) tiling."""
    sublanes = SUBLANES * max(1, 4 // itemsize)
    return round_up(rows, sublanes) * round_up(cols, LANES) * itemsize


# Temporaries per TPU generation, kernel (forward, dq, dk/dv) and kernel dtype (16-bit, 32-bit): coefficients of six
# sizes (`temporary_sizes`), fitted as upper bounds of the VMEM the compiler reports (libtpu 0.0.42) by a linear
# program (benchmarks/fit_tpu_vmem.py). v4 was refit on all its sweeps (2026-12-05; the resweep after the figures
# became the use within the scoped region): 96 forward and 59 dq and dk/dv kernels, each dtype apart (float32
# temporaries follow the operand tiles, bfloat16 ones the score tile); its forward had been 1.6-2.8x the need of
# large blocks and its dq below the need of two bfloat16 512-blocks. v5e and v6e keep the fits of the first sweeps
# (one set for both dtypes; the forward's sixth, a kv block walked in chunks, set by hand above those compiles), v5e
# raised where its estimate with the margin fell below a figure (bfloat16 forward d256 512-blocks by 1%, float32
# dk/dv d256 by 4%).
_V5E_V6E = ((0.05, 0.47, 0.05, 2.25, 0.05, 1.5), (0.05, 0.05, 0.13, 1.5, 0.05, 0.0),
            (0.05, 0.05, 0.05, 2.05, 0.05, 0.0))
FITTED_TEMPORARIES = {
    "v4": (((0.38, 1.07, 0.05, 1.23, 0.05, 0.05), (4.34, 0.05, 0.05, 0.05, 0.05, 0.05)),
           ((0.92, 0.56, 0.05, 1.83, 0.05, 0.05), (0.05, 1.32, 0.5, 3.41, 0.05, 0.05)),
           ((1.7, 0.48, 0.05, 0.65, 0.05, 0.05), (0.05, 0.05, 0.05, 0.05, 2.91, 0.05))),
    "v5e": (((0.14, 0.47, 0.05, 2.25, 0.05, 1.5), _V5E_V6E[0]), (_V5E_V6E[1], _V5E_V6E[1]),
            (_V5E_V6E[2], (0.05, 0.37, 0.05, 2.05, 0.05, 0.0))),
    "v6e": tuple((kernel, kernel) for kernel in _V5E_V6E),
}
# v5p and TPU7x report VMEM in proportion to the limit a kernel sets, not to its need, so they (and unknown devices)
# take the largest of the fitted generations' temporaries.


def temporary_sizes(problem: Problem, block_b: int, rows: int, cols: int, block_major: int,
                    chunks: int = 1) -> tuple[int, ...]:
    """The sizes temporaries scale with, for a [rows, cols] score tile: the score tile (scores, probabilities);
    the operand tiles in float32 (float32 matmuls are split into bfloat16 passes, casts); the major kv block in
    float32 (relayouts); the score tile again when segment ids, a window or lengths build masks (or a soft cap
    its tanh); a constant (MiB) for the compiler's own scratch; and the score tiles of the other chunks when a
    kernel walks its major block in `chunks` unrolled steps."""
    d = problem.head_dim
    score = _tile(rows, cols, 4)
    return (score, block_b * (_tile(rows, d, 4) + _tile(cols, d, 4)), block_b * _tile(block_major, d, 4),
            score if problem.segments or problem.window is not None or problem.lengths or problem.softcap else 0,
            MIB, block_b * score * (chunks - 1))


def temporary_coefficients(device_kind: str | None, kernel: int, itemsize: int) -> list[tuple[float, ...]]:
    """The fitted coefficients that bound a kernel's temporaries on the device (every fitted generation's for one
    that reports no need: the estimate is the largest)."""
    table = FITTED_TEMPORARIES.get(tpu_generation(device_kind))
    tables = [table] if table is not None else list(FITTED_TEMPORARIES.values())
    return [t[kernel][0 if itemsize == 2 else 1] for t in tables]


def _temporaries(device_kind: str | None, kernel: int, sizes: tuple[int, ...], itemsize: int) -> int:
    return int(max(sum(c * size for c, size in zip(coefficients, sizes))
                   for coefficients in temporary_coefficients(device_kind, kernel, itemsize)))


MARGIN = 1.10  # the fits are tight upper bounds of the problems they saw; other problems needed up to 3% more
# float32 kernels with 512-row blocks or more needed 8-29% more than the fits (v4 dk/dv 512x1024/512 d256; v5e dq
# and dk/dv with block_b 2 and 4; v6e dq with block_b 4): their temporaries grow faster than the tiles.
WIDE_F32_MARGIN = 1.35


def _margin(nbytes: int, problem: Problem | None = None, widest: int = 0) -> int:
    wide = problem is not None and kernel_itemsize(problem) == 4 and widest >= 512
    return int((WIDE_F32_MARGIN if wide else MARGIN) * nbytes)


ROLES = ("forward", "dq", "dkv")  # the kernels, in the order of TEMPORARIES' rows


@dataclass(frozen=True)
class VmemParts:
    """One kernel's VMEM before the fitted temporaries: its blocks (double-buffered by the pipeline) and scratch,
    exact; the sizes its temporaries scale with (`temporary_sizes`); the widest block (it picks the margin)."""

    fixed: int
    sizes: tuple[int, ...]
    widest: int


def vmem_parts(role: str, config: Config, problem: Problem) -> VmemParts:
    """The parts of the forward, dq or dkv kernel's VMEM (what `benchmarks/fit_tpu_vmem.py` fits against)."""
    it, d, bb = kernel_itemsize(problem), problem.head_dim, config.block_b
    if role == "forward":
        bq, bkm, bk = config.block_q, config.block_k_major, config.block_k
        # q, out; k, v; the logsumexp only when the backward needs it (the forward writes it only then: a forward
        # without it had been over-estimated by two [block_q, 128] float32 tiles per batch row)
        blocks = bb * (2 * _tile(bq, d, it) + 2 * _tile(bkm, d, it) + (_tile(bq, LANES, 4) if problem.backward else 0))
        if problem.segments:
            blocks += bb * (_tile(bq, LANES, 4) + _tile(SUBLANES, bkm, 4))
        scratch = bb * (2 * _tile(bq, LANES, 4) + _tile(bq, d, 4))  # running max and sum, accumulator
        sizes = temporary_sizes(problem, bb, bq, bk, bkm, bkm // bk)
    elif role == "dq":  # q, do, k, v, lse, delta (and ids) blocks and dq; an accumulator
        bq, bkm, bk = config.bwd_block_q, config.bwd_block_k_major, config.bwd_block_k
        blocks = bb * (3 * _tile(bq, d, it) + 2 * _tile(bkm, d, it) + 2 * _tile(bq, LANES, 4))
        if problem.segments:
            blocks += bb * (_tile(bq, LANES, 4) + _tile(SUBLANES, bkm, 4))
        scratch = bb * _tile(bq, d, 4)
        sizes = temporary_sizes(problem, bb, bq, bk, bkm, bkm // bk)
    elif role == "dkv":  # q, do, k, v, dk, dv, lse and delta rows (and ids); two accumulators over the kv block
        bq, bkm, bk = config.bwd_block_q, config.bwd_block_k_major, config.bwd_block_k
        blocks = bb * (2 * _tile(bq, d, it) + 4 * _tile(bkm, d, it) + 2 * _tile(SUBLANES, bq, 4))
        if problem.segments:
            blocks += bb * (_tile(SUBLANES, bq, 4) + _tile(bkm, LANES, 4))
        scratch = 2 * bb * _tile(bkm, d, 4)
        sizes = temporary_sizes(problem, bb, bk, bq, bkm, bkm // bk)
    else:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    return VmemParts(fixed=2 * blocks + scratch, sizes=sizes, widest=max(bq, bkm))


def kernel_vmem_bytes(role: str, config: Config, problem: Problem, device_kind: str | None = None) -> int:
    """VMEM of one program of the forward, dq or dkv kernel: exact blocks and scratch, fitted temporaries, margin."""
    parts = vmem_parts(role, config, problem)
    temporaries = _temporaries(device_kind, ROLES.index(role), parts.sizes, kernel_itemsize(problem))
    return _margin(parts.fixed + temporaries, problem, parts.widest)


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


def invalid_reasons(config: Config, problem: Problem, *, device_kind: str | None = None) -> list[str]:
    """Why `config` cannot run `problem` (empty if it can); backward blocks are checked when problem.backward."""
    if not isinstance(config, Config):
        raise TypeError(f"config must be a kernels.tpu.Config, got {type(config).__name__}")
    reasons = []
    if problem.batch % config.block_b:
        reasons.append(f"block_b ({config.block_b}) must divide the batch ({problem.batch})")
    reasons += _block_reasons("", config.block_q, config.block_k_major, config.block_k, problem)
    limit = vmem_limit(device_kind)
    need = forward_vmem_bytes(config, problem, device_kind)
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
