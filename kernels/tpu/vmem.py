"""The fitted part of the TPU kernels' VMEM model: the temporaries the compiler adds to the exact blocks and scratch.

`kernels.tpu.config` counts each kernel's blocks and scratch exactly (`vmem_parts`); the temporaries (scores,
probabilities, masks, casts, relayouts) are bounded here by a linear form in six sizes, with coefficients per TPU
generation, kernel and dtype fitted as upper bounds of the compiler's figures (benchmarks/fit_tpu_vmem.py), times a
margin for problems the fit did not see. Split out of config.py so the fits and their provenance sit in one place.
"""
from __future__ import annotations

from dataclasses import dataclass

from kernels.devices import MIB, tpu_generation
from kernels.problem import Problem

LANES = 128  # TPU vreg lane count: minor block dims are multiples of this
SUBLANES = 8  # TPU vreg sublane count: second-minor block dims are multiples of this


def round_up(x: int, unit: int) -> int:
    return -(-x // unit) * unit


def tile(rows: int, cols: int, itemsize: int) -> int:
    """VMEM bytes of a [rows, cols] tile after padding to the native (sublane, lane) tiling."""
    sublanes = SUBLANES * max(1, 4 // itemsize)
    return round_up(rows, sublanes) * round_up(cols, LANES) * itemsize


def kernel_itemsize(problem: Problem) -> int:
    """Bytes per element the kernels see: float16 is widened to float32 before the kernels (no f16 MXU path)."""
    return {"float32": 4, "bfloat16": 2, "float16": 4}[problem.dtype]


def temporary_sizes(problem: Problem, block_b: int, rows: int, cols: int, block_major: int, chunks: int = 1, *,
                    per_row: bool = False) -> tuple[int, ...]:
    """The sizes temporaries scale with, for a [rows, cols] score tile: the score tile (scores, probabilities);
    the operand tiles in float32 (float32 matmuls are split into bfloat16 passes, casts); the major kv block in
    float32 (relayouts); the score tile again when segment ids, a window or lengths build masks (or a soft cap
    its tanh); a constant (MiB) for the compiler's own scratch; and the score tiles of the other chunks when a
    kernel walks its major block in `chunks` unrolled steps.

    `per_row`: the sizes of one batch row. The kernels walk the rows of a batch block in a loop
    (`common.for_each`), so one row's temporaries are live at a time: on v4 the compiler's figures less the exact
    blocks and scratch do not grow with block_b, and a form that multiplies the operand sizes by it over-estimated
    block_b 2 and 4 by up to 25% (the old form stays for the generations fitted with it)."""
    d = problem.head_dim
    score = tile(rows, cols, 4)
    rows_of = 1 if per_row else block_b
    return (score, rows_of * (tile(rows, d, 4) + tile(cols, d, 4)), rows_of * tile(block_major, d, 4),
            score if problem.segments or problem.window is not None or problem.lengths or problem.softcap else 0,
            MIB, rows_of * score * (chunks - 1))


@dataclass(frozen=True)
class TemporaryFit:
    """One generation's fit: the form of its sizes (`per_row`), coefficients per kernel (forward, dq, dk/dv) and
    kernel dtype (16-bit, 32-bit), and the margins its validation calls for (`wide_f32_margin` for float32
    kernels whose widest block has 512 rows or more)."""

    coefficients: tuple[tuple[tuple[float, ...], tuple[float, ...]], ...]
    per_row: bool = False
    margin: float | tuple[float, float, float] = 1.10  # one, or one per kernel
    wide_f32_margin: float | tuple[float, float, float] = 1.35  # one, or one per kernel

    def estimate(self, fixed: int, sizes: tuple[int, ...], kernel: int, itemsize: int, widest: int) -> int:
        """Blocks and scratch (`fixed`) plus the fitted temporaries, times the margin."""
        coefficients = self.coefficients[kernel][0 if itemsize == 2 else 1]
        wide = itemsize == 4 and widest >= 512
        nbytes = fixed + sum(c * size for c, size in zip(coefficients, sizes))
        return int((_per_kernel(self.wide_f32_margin) if wide else _per_kernel(self.margin))[kernel] * nbytes)

    def margin_of(self, kernel: int, itemsize: int) -> float:
        """The margin a kernel of this dtype gets at its widest (what its validation must cover)."""
        return _per_kernel(self.wide_f32_margin if itemsize == 4 else self.margin)[kernel]


def _per_kernel(margin: float | tuple[float, float, float]) -> tuple[float, float, float]:
    """A margin per kernel (forward, dq, dk/dv) from one or three."""
    return margin if isinstance(margin, tuple) else (margin, margin, margin)


# v4: fitted per batch row (libtpu 0.0.42) on the compiles of the current kernels (the in-place layouts of
# kernels/tpu/layout.py; `layout-resweep`, 2026-12-06: every earlier v4 config again, the head_dim 80/96/192 and
# 1536/3072-token problems set apart as `layout-resweep-holdout` beside the `layout-holdout` run; `fit_tpu_vmem.py
# --target v4 --validate problem`). Margins per kernel from leaving each problem out of the fit in turn: 16-bit
# forward and dq needed up to 1/0.957 (1.10), dk/dv 1/0.873 = 1.15x; float32 forward 1/0.948 and dq 1/0.968 (1.10),
# dk/dv 1/0.759 = 1.32x (1.35). Earlier fits were of kernels that read a transposed copy.
# v5e: fitted per batch row the same way on its `layout-resweep` (2026-12-06), leaving out figures over
# fit_tpu_vmem.PREFETCHED times the kernel's blocks and scratch: with 128 MiB of VMEM, XLA's memory-space assignment
# may prefetch whole operands into free VMEM and the kernel's scoped figure then counts them (v5e float32 d256
# backward: q, k, v sliced into VMEM, 77 MB against 5.8 MB of blocks). Margins from leaving each problem out: every
# 16-bit kernel and float32 forward and dq within 1/0.927 (1.10), float32 dk/dv 1/0.847 = 1.18x (1.20).
# v6e keeps the fit of the first sweeps in the old form (one set for both dtypes; the forward's sixth, a kv block
# walked in chunks, set by hand above those compiles): its float32 figures of the current kernels run 1.3-1.9x
# the blocks and scratch beyond any form the sizes give (the same prefetches, partly), so they cannot refit it; no
# configuration it accepts was refused (compile-v6e.md). Old-form margins: the fits are tight upper bounds of the
# problems they saw, other problems needed up to 3% more; float32 kernels with 512-row blocks or more needed 8-29%
# more (v6e dq with block_b 4).
_V6E = ((0.05, 0.47, 0.05, 2.25, 0.05, 1.5), (0.05, 0.05, 0.13, 1.5, 0.05, 0.0), (0.05, 0.05, 0.05, 2.05, 0.05, 0.0))
FITS = {
    "v4": TemporaryFit((((0.58, 0.87, 0.05, 0.8, 0.05, 0.05), (1.02, 2.39, 0.05, 0.42, 0.05, 0.05)),
                        ((0.48, 1.16, 0.05, 0.84, 0.05, 0.05), (2.17, 0.05, 0.79, 1.9, 0.05, 0.05)),
                        ((1.81, 1.07, 0.05, 0.96, 0.05, 0.05), (1.74, 3.77, 0.05, 4.89, 0.05, 0.3))),
                       per_row=True, margin=(1.10, 1.10, 1.15), wide_f32_margin=(1.10, 1.10, 1.35)),
    "v5e": TemporaryFit((((0.94, 0.26, 0.05, 0.72, 0.05, 0.05), (1.63, 2.59, 0.05, 0.45, 0.05, 0.05)),
                         ((0.05, 0.45, 0.05, 0.05, 0.05, 0.05), (0.05, 0.05, 0.05, 0.53, 1.73, 0.05)),
                         ((0.29, 0.17, 0.05, 0.05, 0.05, 0.57), (4.93, 3.64, 0.05, 4.29, 0.24, 0.05))),
                        per_row=True, wide_f32_margin=(1.10, 1.10, 1.20)),
    "v6e": TemporaryFit(tuple((kernel, kernel) for kernel in _V6E)),
}


def fits_for(device_kind: str | None) -> list[TemporaryFit]:
    """The fits that bound a kernel's temporaries on the device: its generation's, or every fitted generation's
    for one that reports no need (v5p and TPU7x report VMEM in proportion to the limit a kernel sets, not to its
    need, and unknown devices): the estimate is then the largest."""
    fit = FITS.get(tpu_generation(device_kind))
    return [fit] if fit is not None else list(FITS.values())
