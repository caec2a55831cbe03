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
    margin: float = 1.10
    wide_f32_margin: float = 1.35

    def estimate(self, fixed: int, sizes: tuple[int, ...], kernel: int, itemsize: int, widest: int) -> int:
        """Blocks and scratch (`fixed`) plus the fitted temporaries, times the margin."""
        coefficients = self.coefficients[kernel][0 if itemsize == 2 else 1]
        wide = itemsize == 4 and widest >= 512
        nbytes = fixed + sum(c * size for c, size in zip(coefficients, sizes))
        return int((self.wide_f32_margin if wide else self.margin) * nbytes)


# v4: fitted per batch row (libtpu 0.0.42) on all its sweeps (sample, near-limit, resweep: 96 forward, 59 dq and
# 59 dk/dv kernels, each dtype apart; `fit_tpu_vmem.py --target v4 --validate problem`). Validated by leaving each
# problem (head_dim, features) out of the fit in turn: the worst held-out 16-bit kernel needed 1/0.928 = 1.08x its
# fit (the 1.10 margin), the worst float32 one (dk/dv) 1/0.887 = 1.13x (so 1.15; leaving each label out instead:
# 1/0.893). The old form's held-out float32 kernels needed up to 1/0.788 = 1.27x (it took the 1.35 margin). Out of
# sample (the `holdout` run, 2026-12-06: head_dim 80/96/192, lengths 1536/3072, one feature at a time) every
# compiled kernel's estimate was at least its figure (the closest 1.02x) and the one refusal was rejected.
# v5e and v6e keep the fits of the first sweeps in the old form (one set for both dtypes; the forward's sixth, a kv
# block walked in chunks, set by hand above those compiles), v5e raised where its estimate with the margin fell
# below a figure (bfloat16 forward d256 512-blocks by 1%, float32 dk/dv d256 by 4%). Old-form margins: the fits are
# tight upper bounds of the problems they saw, other problems needed up to 3% more; float32 kernels with 512-row
# blocks or more needed 8-29% more (v5e dq and dk/dv with block_b 2 and 4; v6e dq with block_b 4).
_V5E_V6E = ((0.05, 0.47, 0.05, 2.25, 0.05, 1.5), (0.05, 0.05, 0.13, 1.5, 0.05, 0.0),
            (0.05, 0.05, 0.05, 2.05, 0.05, 0.0))
FITS = {
    "v4": TemporaryFit((((0.18, 2.95, 0.05, 1.26, 0.05, 0.05), (1.47, 2.93, 0.05, 0.05, 0.05, 0.05)),
                        ((0.88, 1.18, 0.05, 1.04, 0.05, 0.05), (0.05, 1.01, 0.05, 4.3, 0.47, 0.05)),
                        ((2.39, 0.3, 0.05, 0.05, 0.05, 0.05), (0.26, 4.54, 0.05, 0.81, 0.05, 0.05))),
                       per_row=True, wide_f32_margin=1.15),
    "v5e": TemporaryFit((((0.14, 0.47, 0.05, 2.25, 0.05, 1.5), _V5E_V6E[0]), (_V5E_V6E[1], _V5E_V6E[1]),
                         (_V5E_V6E[2], (0.05, 0.37, 0.05, 2.05, 0.05, 0.0)))),
    "v6e": TemporaryFit(tuple((kernel, kernel) for kernel in _V5E_V6E)),
}


def fits_for(device_kind: str | None) -> list[TemporaryFit]:
    """The fits that bound a kernel's temporaries on the device: its generation's, or every fitted generation's
    for one that reports no need (v5p and TPU7x report VMEM in proportion to the limit a kernel sets, not to its
    need, and unknown devices): the estimate is then the largest."""
    fit = FITS.get(tpu_generation(device_kind))
    return [fit] if fit is not None else list(FITS.values())
