"""Where the kernels find each head's rows in HBM: in the caller's layout where Mosaic's tiling allows it.

The caller's q, k, v, o (and their gradients) are [batch, seq, heads, head_dim]. Viewed as [batch, seq,
heads * head_dim] (a free reshape) one head's rows are a [rows, head_dim] tile at lanes h * head_dim, which Mosaic
accepts as a block when its width is a multiple of 128 lanes (or spans the array), so:

- `heads`: head_dim a multiple of 128: one head per tile, read and written in place.
- `pairs`: head_dim 64: two neighbouring heads per 128-lane tile, in place. The kernels score each head of the pair
  with the other head's lanes zeroed (on a 128-wide MXU a 64-deep contraction costs as much as a 128-deep one) and
  keep one accumulator whose halves are the two heads. The two heads must read the kv heads at the same lanes of a
  kv tile, or one tile's two halves: with groups of 1 (kv pair = query pair) or of an even size (both heads share
  one kv head, moved to the other half by one lane rotation where needed). Heads and kv heads must be even so that
  both arrays hold whole pairs.
- `transposed`: any other head_dim or grouping: a [batch, heads, seq, head_dim] copy (XLA fuses the sequence
  padding into it). A tile narrower than 128 lanes that is not the whole minor dimension is refused by Mosaic, and
  the pair scheme cannot serve an odd group (its two heads may need kv heads from two different tiles) or an odd
  head count.

The kernels see every q/k/v/o block as [block_b, rows, width] whatever the layout (width: head_dim, or 128 for
pairs); the log-sum-exp and the other per-row statistics keep their own [batch, heads, seq, 128] layout.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels.tpu.vmem import LANES

SQUEEZED = getattr(pl, "squeezed", None)  # a block dim of size 1, dropped from the kernel's view
PAIR_HEAD_DIM = LANES // 2


def layout_mode(heads: int, kv_heads: int, head_dim: int) -> str:
    """"heads", "pairs" or "transposed" (see the module docstring for why)."""
    if head_dim % LANES == 0 or (heads == 1 and kv_heads == 1):
        return "heads"
    groups = heads // kv_heads
    if head_dim == PAIR_HEAD_DIM and heads % 2 == 0 and kv_heads % 2 == 0 and (groups == 1 or groups % 2 == 0):
        return "pairs"
    return "transposed"


@dataclass(frozen=True)
class Layout:
    """How q, k, v, o and their gradients are laid out for the kernels (hashable: part of the kernels' statics)."""

    mode: str
    head_dim: int

    @classmethod
    def of(cls, heads: int, kv_heads: int, head_dim: int) -> "Layout":
        return cls(layout_mode(heads, kv_heads, head_dim), head_dim)

    @property
    def in_place(self) -> bool:
        return self.mode != "transposed"

    @property
    def per_tile(self) -> int:
        """Heads in one tile."""
        return 2 if self.mode == "pairs" else 1

    @property
    def width(self) -> int:
        """Lanes of one tile as the kernels see it."""
        return LANES if self.mode == "pairs" else self.head_dim

    @property
    def seq_axis(self) -> int:
        return 1 if self.in_place else 2

    def to_kernel(self, x: jax.Array, length: int, dtype) -> jax.Array:
        """[b, s, h, d] -> the kernels' array, the sequence zero-padded to `length`, in `dtype` (a copy only when
        padding, widening or transposing)."""
        x = x.astype(dtype)
        if length > x.shape[1]:
            x = jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))
        if self.in_place:
            return x.reshape(x.shape[0], x.shape[1], x.shape[2] * x.shape[3])
        return jnp.swapaxes(x, 1, 2)

    def from_kernel(self, x: jax.Array, length: int, dtype) -> jax.Array:
        """The kernels' array -> [b, length, h, d] in `dtype`."""
        if self.in_place:
            b, s, hd = x.shape
            return x.reshape(b, s, hd // self.head_dim, self.head_dim)[:, :length].astype(dtype)
        return jnp.swapaxes(x[:, :, :length], 1, 2).astype(dtype)

    def resize(self, x: jax.Array, true_len: int, length: int) -> jax.Array:
        """Re-pad the sequence axis of a kernels' array from one block padding to another."""
        axis = self.seq_axis
        if x.shape[axis] == length:
            return x
        x = jax.lax.slice_in_dim(x, 0, true_len, axis=axis)
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, length - true_len)
        return jnp.pad(x, widths)

    def dims(self, x: jax.Array) -> tuple[int, int, int]:
        """(batch, heads, padded length) of a kernels' array."""
        if self.in_place:
            return x.shape[0], x.shape[2] // self.head_dim, x.shape[1]
        return x.shape[0], x.shape[1], x.shape[2]

    def row_sums(self, a: jax.Array, b: jax.Array) -> jax.Array:
        """sum(a * b) over head_dim in float32, as [batch, heads, length] (the backward's delta).

        In place, the sum over each head's lanes is a product with a [heads * head_dim, heads] block of ones:
        summing a [b, s, h, d] view instead would relayout the float32 product (a [b, s, h * d] array is tiled
        over (s, h * d) in HBM, a [b, s, h, d] one over (h, d)), and the dot writes [b, h, s] directly."""
        prod = a.astype(jnp.float32) * b.astype(jnp.float32)
        if not self.in_place:
            return jnp.sum(prod, axis=-1)
        heads = self.dims(a)[1]
        lanes = jnp.arange(heads * self.head_dim) // self.head_dim
        ones = (lanes[:, None] == jnp.arange(heads)[None, :]).astype(jnp.float32)
        return jnp.einsum("bsx,xh->bhs", prod, ones, precision=jax.lax.Precision.HIGHEST)

    def spec(self, block_b: int, rows: int, where: Callable) -> pl.BlockSpec:
        """The BlockSpec of a [block_b, rows, width] block; where(*grid, *prefetch) -> (batch block, tile, row
        block), the tile counted in heads (or pairs)."""
        if self.in_place:
            return pl.BlockSpec((block_b, rows, self.width), lambda *idx: _in_place(where(*idx)))
        return pl.BlockSpec((block_b, SQUEEZED, rows, self.width), lambda *idx: _transposed(where(*idx)))


def _in_place(index):
    b, tile, row = index
    return b, row, tile


def _transposed(index):
    b, tile, row = index
    return b, tile, row, 0
