"""Which (query, key) pairs attention lets through, and which blocks of them a kernel must visit.

One description for the reference, both kernels, the cost estimate and the runtime: a `Band` (the window's sides
as offsets from the diagonal, causal folded in as right = 0) plus optional per-row lengths. Every function here
works on static values (Python or numpy ints, for loop bounds fixed at trace time, tests and cost counts) and on
traced int32 scalars (grid indices, run-time lengths) alike, so a kernel's block ranges are pure functions that
can be checked against the reference mask without running a kernel.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# jax.nn's finite "minus infinity" for float32 logits: a masked score never makes inf - inf = NaN in a softmax.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
# The logsumexp the kernels store for a query row that sees no key (and for padded rows): exp(s - EMPTY_ROW_LSE)
# is 0 for every score, so such a row has no gradient; the public lse turns it into -inf.
EMPTY_ROW_LSE = 1e30


@dataclass(frozen=True)
class Band:
    """Query i sees keys i - left .. i + right (None: no bound on that side). Causal is right = 0: window sides
    are never negative, so causal's bound is always the tighter one."""

    left: int | None = None
    right: int | None = None

    @classmethod
    def of(cls, *, causal: bool, window: tuple[int | None, int | None] | None = None) -> "Band":
        """The band of a checked window (left, right) or None, with causal's right bound folded in."""
        left, right = window if window is not None else (None, None)
        return cls(left=left, right=0 if causal else right)

    @property
    def bounded(self) -> bool:
        """Whether either side bounds the keys a query sees (so some tiles straddle an edge)."""
        return self.left is not None or self.right is not None

    @property
    def span(self) -> int | None:
        """Keys one query row sees through a band bounded on both sides (left + right + 1), else None."""
        return None if self.left is None or self.right is None else self.left + self.right + 1

    def mask(self, rows, cols):
        """Boolean mask of the band over broadcastable row and key positions, or None when it bounds nothing."""
        mask = None
        if self.right is not None:
            mask = cols <= (rows if self.right == 0 else rows + self.right)
        if self.left is not None:
            low = cols >= rows - self.left
            mask = low if mask is None else mask & low
        return mask

    def key_range(self, rows, kv_len):
        """(first, last) key each row sees (inclusive; last < first: none), clipped to 0..kv_len - 1; `kv_len`
        may be an array of per-row lengths broadcasting against `rows`."""
        first = 0 * rows if self.left is None else maximum(rows - self.left, 0)
        last = kv_len - 1 if self.right is None else minimum(rows + self.right, kv_len - 1)
        return first, last

    def pairs(self, q_len: int, kv_len: int) -> int:
        """How many (query, key) pairs the band lets through (no lengths: those are run-time data)."""
        first, last = self.key_range(np.arange(q_len, dtype=np.int64), kv_len)
        return int(np.maximum(last - first + 1, 0).sum())

    def kv_blocks(self, row_start, row_end, block_k: int):
        """[first, stop) key blocks of size `block_k` holding a key some row in [row_start, row_end) sees through
        the band; stop is None when the right side is unbounded. Not clipped to the sequence: callers cut at their
        own end (padded or not, static or run-time)."""
        first = 0 if self.left is None else floordiv(maximum(row_start - self.left, 0), block_k)
        stop = None if self.right is None else ceildiv(row_end + self.right, block_k)
        return first, stop

    def q_blocks(self, key_start, key_end, block_q: int):
        """[first, stop) query blocks of size `block_q` holding a row that sees a key in [key_start, key_end)
        (the mirror of `kv_blocks`); stop is None when the left side is unbounded."""
        first = 0 if self.right is None else floordiv(maximum(key_start - self.right, 0), block_q)
        stop = None if self.left is None else floordiv(key_end - 1 + self.left, block_q) + 1
        return first, stop

    def tile_conditions(self, row_start, rows: int, key_start, keys: int) -> list:
        """The conditions (all must hold) for a tile of `rows` queries from `row_start` and `keys` keys from
        `key_start` to meet the band; empty when the band bounds nothing."""
        conditions = []
        if self.right is not None:
            conditions.append(key_start <= row_start + (rows - 1 + self.right))
        if self.left is not None:
            conditions.append(key_start + (keys - 1 + self.left) >= row_start)
        return conditions


def visible(rows, cols, band: Band, *, q_len=None, kv_len=None):
    """The visible-pair rule: a mask over broadcastable row and key positions of the band, rows before `q_len`
    and keys before `kv_len` (each static or per-row, None: no bound). None when nothing is masked."""
    mask = band.mask(rows, cols)
    for bound in (None if q_len is None else rows < q_len, None if kv_len is None else cols < kv_len):
        if bound is not None:
            mask = bound if mask is None else mask & bound
    return mask


def is_static(*values) -> bool:
    """Whether every value is known at trace time (a Python or numpy int or array), not a traced jax value."""
    return not any(isinstance(x, jax.Array) for x in values)


def minimum(a, b):
    """min, static or traced; two Python ints stay a Python int (a statically empty loop is then left out)."""
    if isinstance(a, int) and isinstance(b, int):
        return min(a, b)
    return np.minimum(a, b) if is_static(a, b) else jnp.minimum(a, b)


def maximum(a, b):
    """max, static or traced (see `minimum`)."""
    if isinstance(a, int) and isinstance(b, int):
        return max(a, b)
    return np.maximum(a, b) if is_static(a, b) else jnp.maximum(a, b)


def floordiv(a, b: int):
    """a // b of a non-negative int (static, or traced: lax.div with an int32 divisor, since jnp's floor division
    lowers through the sign and a Python int is int64 under jax_enable_x64)."""
    return a // b if is_static(a) else lax.div(a, np.int32(b))


def ceildiv(a, b: int):
    """Ceil division of a non-negative int (static or traced) by a static int."""
    return -(-a // b) if is_static(a) else lax.div(a + np.int32(b - 1), np.int32(b))


def select(condition, a, b):
    """where(condition, a, b), static or traced."""
    if is_static(condition, a, b):
        return (a if condition else b) if np.ndim(condition) == 0 else np.where(condition, a, b)
    return jnp.where(condition, a, b)
