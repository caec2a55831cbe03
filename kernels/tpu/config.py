"""Block sizes of the TPU kernel: the config type, its default, its search space and its validity rules.

The rules mirror what Mosaic accepts (last two block dims divisible by 8 and 128 unless they span the whole array)
plus a VMEM estimate, so the autotuner can discard a candidate before paying for a compile.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


from kernels.configs import IntConfig
from kernels.problem import Problem

LANES = 128  # TPU vreg lane count: minor block dims are multiples of this
SUBLANES = 8  # TPU vreg sublane count: second-minor block dims are multiples of this
MIB = 1 << 20
DEFAULT_VMEM_LIMIT = 16 * MIB  # the scoped VMEM default of the smallest current TPUs


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
    def default(cls, problem: Problem) -> "Config":
        """A heuristic config that is valid for the problem: big blocks, shrunk until the VMEM estimate fits."""
        q_full = _round_up(problem.q_len, SUBLANES)
        kv_full = _round_up(problem.kv_len, LANES)
        block_q, block_k_major = min(512, q_full), min(512, kv_full)
        # backward: 256-blocks, or one block when the sequence fits in 512 (less padding than 256-blocks)
        bwd_q = q_full if q_full <= 512 else 256
        bwd_k_major = kv_full if kv_full <= 512 else 256
        config = cls(1, block_q, block_k_major, block_k_major, bwd_q, bwd_k_major, bwd_k_major)
        fits_forward = lambda c: forward_vmem_bytes(c, problem) <= DEFAULT_VMEM_LIMIT  # noqa: E731
        fits_backward = lambda c: backward_vmem_bytes(c, problem) <= DEFAULT_VMEM_LIMIT  # noqa: E731
        config = _shrink(config, fits_forward, "block_q", "block_k_major", "block_k")
        return _shrink(config, fits_backward, "bwd_block_q", "bwd_block_k_major", "bwd_block_k")


def _round_up(x: int, unit: int) -> int:
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
    return max(LANES, _round_up(block // 2, LANES))


def search_space(problem: Problem) -> dict[str, tuple[int, ...]]:
    """Candidate values per field, capped near the padded lengths; backward fields only when the problem has one."""

    def q_blocks(cap: int) -> tuple[int, ...]:
        full = _round_up(problem.q_len, SUBLANES)
        values = {b for b in (128, 256, 512, 1024) if b < full and b <= cap}
        if full <= cap:
            values.add(full)  # one block over the whole (padded) query length
        return tuple(sorted(values))

    def kv_blocks(cap: int) -> tuple[int, ...]:
        full = _round_up(problem.kv_len, LANES)
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


def vmem_limit(device_kind: str | None) -> int:
    """Scoped VMEM the compiler grants by default: 16 MiB unless the device is known to grant 32 MiB."""
    kind = (device_kind or "").lower()
    if any(tag in kind for tag in ("v6", "v7", "v5p")) or kind.strip() == "tpu v5":
        return 32 * MIB
    return DEFAULT_VMEM_LIMIT


def kernel_itemsize(problem: Problem) -> int:
    """Bytes per element the kernels see: float16 is widened to float32 before the kernels (no f16 MXU path)."""
    return {"float32": 4, "bfloat16": 2, "float16": 4}[problem.dtype]


def _tile(rows: int, cols: int, itemsize: int) -> int:
    """VMEM bytes of a [rows, cols] tile after padding to the native (sublane, lane) tiling."""
    sublanes = SUBLANES * max(1, 4 // itemsize)
    return _round_up(rows, sublanes) * _round_up(cols, LANES) * itemsize


def forward_vmem_bytes(config: Config, problem: Problem) -> int:
    """Estimated VMEM of one forward grid step: double-buffered blocks, scratch and [block_q, block_k] temporaries."""
    it, d, bb = kernel_itemsize(problem), problem.head_dim, config.block_b
    bq, bkm, bk = config.block_q, config.block_k_major, config.block_k
    blocks = bb * (2 * _tile(bq, d, it) + 2 * _tile(bkm, d, it))  # q, out; k, v
    if problem.backward:
        blocks += bb * _tile(bq, LANES, 4)  # logsumexp
    if problem.segments:
        blocks += bb * (_tile(bq, LANES, 4) + _tile(SUBLANES, bkm, 4))
    scratch = bb * (2 * _tile(bq, LANES, 4) + _tile(bq, d, 4))
    temporaries = 4 * _tile(bq, bk, 4)
    return 2 * blocks + scratch + temporaries


def backward_vmem_bytes(config: Config, problem: Problem) -> int:
    """Estimated VMEM of the larger of the two backward kernels (dq, and dk/dv)."""
    it, d, bb = kernel_itemsize(problem), problem.head_dim, config.block_b
    bq, bkm, bk = config.bwd_block_q, config.bwd_block_k_major, config.bwd_block_k
    inputs = bb * (2 * _tile(bq, d, it) + 2 * _tile(bkm, d, it) + 2 * _tile(bq, LANES, 4))  # q, do; k, v; lse, di
    if problem.segments:
        inputs += bb * (_tile(bq, LANES, 4) + _tile(SUBLANES, bkm, 4))
    temporaries = 6 * _tile(bq, bk, 4)
    dq = 2 * (inputs + bb * _tile(bq, d, it)) + bb * _tile(bq, d, 4) + temporaries
    dkv = 2 * (inputs + 2 * bb * _tile(bkm, d, it)) + 2 * bb * _tile(bkm, d, 4) + temporaries
    return max(dq, dkv)


def _block_reasons(prefix: str, bq: int, bkm: int, bk: int, problem: Problem) -> list[str]:
    reasons = []
    q_unit = LANES if prefix else SUBLANES  # the dk/dv kernel lays query rows along lanes
    q_cap, kv_cap = _round_up(problem.q_len, LANES), _round_up(problem.kv_len, LANES)
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
    need = forward_vmem_bytes(config, problem)
    if need > limit:
        reasons.append(f"forward needs about {need / MIB:.1f} MiB of VMEM, over the {limit / MIB:.0f} MiB limit")
    if problem.backward:
        reasons += _block_reasons("bwd_", config.bwd_block_q, config.bwd_block_k_major, config.bwd_block_k, problem)
        need = backward_vmem_bytes(config, problem)
        if need > limit:
            reasons.append(f"backward needs about {need / MIB:.1f} MiB of VMEM, over the {limit / MIB:.0f} MiB limit")
    return reasons
