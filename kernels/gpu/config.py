"""Tunable parameters of the GPU kernel, their search space, and the checks that reject configs before compiling.

Triton needs power-of-two tiles of at least 16 for its dots, and a program whose tiles do not fit in shared memory
fails only at compile time. Rejecting such configs here is cheap and keeps the search from wasting compiles.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp

from kernels.configs import IntConfig
from kernels.devices import is_hopper, smem_limit
from kernels.problem import Problem

WARPS = (1, 2, 4, 8)
STAGES = (1, 2, 3, 4)
MAX_STAGES = 8
MIN_BLOCK = 16
KIB = 1024
WGMMA_WARPS = 4  # Hopper's wgmma runs on whole warpgroups: with fewer warps Triton lays dots out as on Ampere
# Warps beyond what a tile's rows can hold compute the same products, measured in the SASS of deviceless compiles
# (bf16, head_dim 64/128; `benchmarks/kernel_efficiency_gpu.py --sweep`): 8 warps on a forward block_q of 64:
# 1.5x the tensor-core work on H100, 2x on A100, 2x the exponentials; on a backward bwd_block_q of 32 or 64: 1.67x
# (dq) and 1.5x (dk/dv) on H100 (32 HGMMA.64x32x16 per dq iteration for 12 useful 64x64x16), up to 2x on A100,
# whose dk/dv also needs bwd_block_k >= 128 (1.5x at 128x64). At 128 rows each warpgroup owns 64: exactly the
# useful work. 4 warps on 16-wide backward tiles: 1.5-1.67x at 16x16 on both GPUs, up to 2.5x (dk/dv) at 16x64 and
# 64x16 on A100 (exact on H100); 32x32 and up are exact.
WIDE_WARPS = 8
WIDE_ROWS = 128
BWD_SMALL_WARPS = 4
BWD_SMALL_SIDE = 32


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (n >= 1)."""
    return 1 << (int(n) - 1).bit_length()


def floor_pow2(n: int) -> int:
    """Largest power of two <= n (n >= 1)."""
    return 1 << (int(n).bit_length() - 1)


def padded_head_dim(head_dim: int) -> int:
    """head_dim as the kernels see it: zero-padded to a power of two, at least 16 (Triton dot operands)."""
    return max(MIN_BLOCK, next_pow2(head_dim))


def block_cap(length: int) -> int:
    """Largest useful block for a sequence: its padded length (a bigger block only adds masked work)."""
    return max(MIN_BLOCK, next_pow2(length))


@dataclass(frozen=True)
class Config(IntConfig):
    """Forward tiles and Triton launch parameters, and the same for the two backward kernels."""

    block_q: int
    block_k: int
    num_warps: int
    num_stages: int
    bwd_block_q: int
    bwd_block_k: int
    bwd_num_warps: int
    bwd_num_stages: int

    @classmethod
    def default(cls, problem: Problem, *, device_kind: str | None = None) -> "Config":
        """Heuristic config: big tiles for long sequences, shrunk to the sequence and to the shared memory."""
        warps = 4 if problem.head_dim <= 64 else 8
        bwd_block = 64 if problem.head_dim <= 64 else 32
        # A narrow window: a q block reaches block_q + span - 1 keys in block_k steps, so tiles much wider than the
        # span compute mostly masked scores; both shrink to half the span (not below 32: tensor-core tiles).
        span = window_span(problem)
        band = 1 << 30 if span is None else max(32, floor_pow2(span) // 2)
        fwd = _fit(
            min(128, band, block_cap(problem.q_len)), min(64, band, block_cap(problem.kv_len)), 2,
            lambda bq, bk, s: forward_smem_bytes(bq, bk, s, problem, device_kind, warps), device_kind,
        )
        bwd = _fit(
            min(bwd_block, band, block_cap(problem.q_len)), min(bwd_block, band, block_cap(problem.kv_len)), 2,
            lambda bq, bk, s: backward_smem_bytes(bq, bk, s, problem, device_kind, warps), device_kind,
        )
        fwd_warps = warps if not _narrow_for_warps(warps, fwd[0], None) else WIDE_WARPS // 2
        bwd_warps = next(w for w in (warps, 4, 2, 1) if w <= warps and not _narrow_for_warps(w, *bwd[:2], device_kind))
        return cls(
            block_q=fwd[0], block_k=fwd[1], num_warps=fwd_warps, num_stages=fwd[2],
            bwd_block_q=bwd[0], bwd_block_k=bwd[1], bwd_num_warps=bwd_warps, bwd_num_stages=bwd[2],
        )


def _narrow_for_warps(warps: int, block_q: int, block_k: int | None, device_kind: str | None = None) -> bool:
    """Whether `warps` would duplicate work on these tiles (see WIDE_ROWS); `block_k` None: the forward, whose
    key block is no dot's M."""
    if block_k is not None and warps >= BWD_SMALL_WARPS:  # Hopper: 16x64 and 64x16 measured exact, 16x16 not
        side = max(block_q, block_k) if is_hopper(device_kind) else min(block_q, block_k)
        if side < BWD_SMALL_SIDE:
            return True
    if warps < WIDE_WARPS:
        return False
    return block_q < WIDE_ROWS or (block_k is not None and not is_hopper(device_kind) and block_k < WIDE_ROWS)


def _fit(block_q: int, block_k: int, stages: int, smem, device_kind: str | None) -> tuple[int, int, int]:
    """Halve block_k, then block_q, then the stages until the tiles fit (best effort: may still not fit)."""
    limit = smem_limit(device_kind)
    while smem(block_q, block_k, stages) > limit:
        if block_k > MIN_BLOCK and block_k >= block_q:
            block_k //= 2
        elif block_q > MIN_BLOCK:
            block_q //= 2
        elif stages > 1:
            stages -= 1
        else:
            break
    return block_q, block_k, stages


def window_span(problem: Problem) -> int | None:
    """Keys a query row can see under a window bounded on both sides (causal bounds the right at 0), else None."""
    return problem.band.span


def search_space(problem: Problem) -> dict[str, tuple[int, ...]]:
    """Candidate values per Config field; backward fields only when the problem needs gradients. Under a narrow
    window, no block wider than the window's span (at least 32) is offered: it would only add masked work."""
    span = window_span(problem)
    band = None if span is None else max(32, floor_pow2(span))

    def _blocks(length: int, *, big: bool) -> tuple[int, ...]:
        found = _plain_blocks(length, big=big)
        return found if band is None else tuple(b for b in found if b <= band)

    space = {
        "block_q": _blocks(problem.q_len, big=True),
        "block_k": _blocks(problem.kv_len, big=True),
        "num_warps": WARPS,
        "num_stages": STAGES,
    }
    if problem.backward:
        space.update(
            bwd_block_q=_blocks(problem.q_len, big=False),
            bwd_block_k=_blocks(problem.kv_len, big=False),
            bwd_num_warps=WARPS,
            bwd_num_stages=STAGES,
        )
    return space


def _plain_blocks(length: int, *, big: bool) -> tuple[int, ...]:
    """Powers of two from 16 up to the padded length, at most 128 (256 for long sequences if `big`)."""
    top = 256 if big and length >= 1024 else 128
    cap = min(top, block_cap(length))
    return tuple(b for b in (16, 32, 64, 128, 256) if b <= cap)


def _tile_bytes(problem: Problem) -> int:
    """Bytes of one row of a q/k/v tile: padded head_dim in the input dtype."""
    return padded_head_dim(problem.head_dim) * jnp.dtype(problem.dtype).itemsize


def _smem(fixed_rows: int, streamed_rows: int, m_rows: int, block_q: int, block_k: int, stages: int,
          problem: Problem, device_kind: str | None, warps: int, *, forward: bool = False, dkv: bool = False) -> int:
    """Shared memory of one kernel as Triton lays it out (calibrated on deviceless compiles for sm_90a and sm_80):

    - `fixed_rows` of q/k/v-like tiles stay for the whole program; `streamed_rows` are loaded per loop step;
    - on Hopper with 4 or more warps (wgmma runs on whole warpgroups; with 1 or 2 Triton lays the dots out as on
      Ampere, and so does this model: measured on sm_90a), 16-bit dots whose M (`m_rows`) is 64 or more run on
      wgmma, which reads both operands from shared memory: the pipeline keeps `stages` buffers of the streamed
      tiles, and dk/dv stages one [block_q, block_k] tile for its transposed operand;
    - elsewhere (Ampere's mma, float32, small M) it keeps `stages - 1` buffers (dk/dv on Hopper: at least 2); a
      single-stage loop of the forward or dq stages one of k and v at a time; a [block_q, block_k] probability tile
      goes through shared memory on its way to the second dot (none in a single-stage Hopper float32 forward, one
      in other Hopper float32 forwards, two in its float32 dq and dk/dv and in a causal or windowed 16-bit dq
      below wgmma's rows; on Ampere's forward for block_q <= 64, or 128 at head_dim 256), plus 1 KiB of barriers
      and small scratch; on Hopper a float32 forward with 2 stages double-buffers k (not v), and a float32 dk/dv
      with 3 stages keeps 3 buffers; a float32 backward on mma (Ampere, or Hopper with 1-2 warps) keeps one dk/dv
      buffer and one of k and v per dq stage, and no tile;
    - dk/dv also buffers the float32 lse and delta of its streamed query rows; with segment ids, the int32 ids of
      the streamed rows are buffered `stages` deep.
    """
    row = _tile_bytes(problem)
    itemsize = jnp.dtype(problem.dtype).itemsize
    hopper = is_hopper(device_kind) and warps >= WGMMA_WARPS
    wgmma = hopper and itemsize == 2 and m_rows >= 64
    tile = block_q * block_k * itemsize
    stats = 2 * block_q * 4 if dkv else 0
    extra_k = 0
    mma_f32_backward = not hopper and itemsize == 4 and not forward
    if wgmma:
        buffers = 2 if dkv and stages == 1 and block_q < 64 else stages
    elif hopper and dkv and itemsize == 4:
        buffers = max(min(stages, 3), stages - 1, 2)  # 3 stages keep 3 buffers (d128 64x64: 280 KiB)
    elif mma_f32_backward:
        # float32 backward on mma: dk/dv keeps one buffer of its streamed rows at any depth (d64 128x64, 4 stages:
        # 100.5 KiB), dq one of k and v per stage (d128 32x64, 4 stages: 161 KiB); neither stages a score tile
        buffers = 1 if dkv else stages
        if not dkv:
            streamed_rows //= 2
    else:
        buffers = max(stages - 1, 2 if dkv and hopper else 1)
        if hopper and forward and itemsize == 4 and stages == 2:
            extra_k = block_k  # k double-buffered, v not (d256 64x64: 256 KiB; d128 256x32: 176 KiB)
    if stages == 1 and not dkv and not wgmma and not mma_f32_backward and (forward or itemsize == 4):
        streamed_rows //= 2  # one of k and v at a time
    if mma_f32_backward:
        tiles = 0  # no probability tile through shared memory
    elif wgmma:
        tiles = 1 if dkv else 0
    elif hopper and forward and itemsize == 4:
        tiles = 0 if stages == 1 else 1
    elif hopper and itemsize == 4:
        tiles = 0 if stages == 1 and not dkv else 2
    elif hopper:  # a masked 16-bit dq below wgmma's 64 rows stages one more (32x32 causal, 4 warps: +2 KiB)
        tiles = 2 if not dkv and (problem.causal or problem.window is not None) else 1
    elif forward:  # head_dim 256 stages it at block_q 128 too (bf16 128x64, 3 stages: 208 KiB)
        tiles = 1 if block_q <= 64 or (block_q <= 128 and row >= 256 * itemsize) else 0
    else:
        tiles = 1
    ids = 4 * (block_q if dkv else block_k) * stages if problem.segments else 0  # streamed segment ids
    stat_buffers = 2 if mma_f32_backward else buffers  # its lse and delta rows stay double-buffered
    return (fixed_rows + streamed_rows * buffers + extra_k) * row + stats * stat_buffers + tile * tiles + ids + KIB


def forward_smem_bytes(block_q: int, block_k: int, stages: int, problem: Problem,
                       device_kind: str | None = None, warps: int = WGMMA_WARPS) -> int:
    """The forward kernel: q stays, k and v stream."""
    return _smem(block_q, 2 * block_k, block_q, block_q, block_k, stages, problem, device_kind, warps, forward=True)


def dq_smem_bytes(block_q: int, block_k: int, stages: int, problem: Problem, device_kind: str | None = None,
                  warps: int = WGMMA_WARPS) -> int:
    """The dq kernel: q and do stay, k and v stream."""
    return _smem(2 * block_q, 2 * block_k, block_q, block_q, block_k, stages, problem, device_kind, warps)


def dkv_smem_bytes(block_q: int, block_k: int, stages: int, problem: Problem, device_kind: str | None = None,
                   warps: int = WGMMA_WARPS) -> int:
    """The dk/dv kernel: k and v stay; q, do and their lse and delta rows stream; M of its dots is block_k."""
    return _smem(2 * block_k, 2 * block_q, block_k, block_q, block_k, stages, problem, device_kind, warps, dkv=True)


def backward_smem_bytes(block_q: int, block_k: int, stages: int, problem: Problem,
                        device_kind: str | None = None, warps: int = WGMMA_WARPS) -> int:
    """The larger of the two backward kernels (dq, and dk/dv)."""
    return max(dq_smem_bytes(block_q, block_k, stages, problem, device_kind, warps),
               dkv_smem_bytes(block_q, block_k, stages, problem, device_kind, warps))


def memory_estimate(config: Config, problem: Problem, *, device_kind: str | None = None) -> dict[str, int]:
    """Shared memory per block each kernel of the problem needs, in bytes, by role: the forward, and dq and dkv when
    the problem has a backward (what the checks judge, and what compile targets set beside the compiler's figure)."""
    found = {"forward": forward_smem_bytes(config.block_q, config.block_k, config.num_stages, problem, device_kind,
                                           config.num_warps)}
    if problem.backward:
        args = (config.bwd_block_q, config.bwd_block_k, config.bwd_num_stages, problem, device_kind,
                config.bwd_num_warps)
        found.update(dq=dq_smem_bytes(*args), dkv=dkv_smem_bytes(*args))
    return found


def invalid_reasons(config: Config, problem: Problem, *, device_kind: str | None = None) -> list[str]:
    """Why `config` cannot (or should not) run `problem`; empty when it can."""
    reasons: list[str] = []
    lengths = {"block_q": problem.q_len, "block_k": problem.kv_len,
               "bwd_block_q": problem.q_len, "bwd_block_k": problem.kv_len}
    for prefix in ("", "bwd_"):
        check_sizes = prefix == "" or problem.backward
        for name in (f"{prefix}block_q", f"{prefix}block_k"):
            block = getattr(config, name)
            if block < MIN_BLOCK or block & (block - 1):
                reasons.append(f"{name}={block} is not a power of two >= {MIN_BLOCK} (Triton dot tiles)")
            elif check_sizes and block > block_cap(lengths[name]):
                seq = "q_len" if name.endswith("q") else "kv_len"
                reasons.append(
                    f"{name}={block} exceeds {block_cap(lengths[name])}, the padded {seq}={lengths[name]}: "
                    "only masked work"
                )
        warps = getattr(config, f"{prefix}num_warps")
        if warps not in WARPS:
            reasons.append(f"{prefix}num_warps={warps} is not one of {WARPS}")
        stages = getattr(config, f"{prefix}num_stages")
        if not 1 <= stages <= MAX_STAGES:
            reasons.append(f"{prefix}num_stages={stages} is not in 1..{MAX_STAGES}")
    if reasons:
        return reasons
    limit = smem_limit(device_kind)
    need = memory_estimate(config, problem, device_kind=device_kind)
    used = need["forward"]
    if used > limit:
        reasons.append(
            f"forward tiles need about {used // KIB} KiB of shared memory (block_q={config.block_q}, "
            f"block_k={config.block_k}, num_stages={config.num_stages}), over the {limit // KIB} KiB limit"
        )
    if problem.backward:
        used = max(need["dq"], need["dkv"])
        if used > limit:
            reasons.append(
                f"backward tiles need about {used // KIB} KiB of shared memory (bwd_block_q={config.bwd_block_q}, "
                f"bwd_block_k={config.bwd_block_k}, bwd_num_stages={config.bwd_num_stages}), "
                f"over the {limit // KIB} KiB limit"
            )
    if _narrow_for_warps(config.num_warps, config.block_q, None):
        reasons.append(f"num_warps={config.num_warps} needs block_q >= {WIDE_ROWS} (got {config.block_q}): with "
                       "fewer rows the warpgroups compute the same products (1.5-2x the tensor-core work)")
    if problem.backward and _narrow_for_warps(config.bwd_num_warps, config.bwd_block_q, config.bwd_block_k,
                                              device_kind):
        warps, side = config.bwd_num_warps, min(config.bwd_block_q, config.bwd_block_k)
        if warps < WIDE_WARPS or side < BWD_SMALL_SIDE:
            need = f"{'one of' if is_hopper(device_kind) else 'both'} bwd_block_q, bwd_block_k >= {BWD_SMALL_SIDE}"
        else:
            need = f"bwd_block_q{'' if is_hopper(device_kind) else ' and bwd_block_k'} >= {WIDE_ROWS}"
        reasons.append(f"bwd_num_warps={warps} needs {need} (got {config.bwd_block_q}x{config.bwd_block_k}): "
                       "with fewer rows the warps compute the same scores twice (1.5-2.5x the tensor-core work)")
    return reasons
