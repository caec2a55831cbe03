"""What the forward and backward kernels share: static parameters, masking, block skipping and call options."""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.tpu.config import LANES, SUBLANES

# A finite "minus infinity": masked scores never produce inf - inf = NaN in the online softmax.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
# Logsumexp stored for a query row that sees no key: exp(s - lse) is 0 for it in the backward pass.
NO_KEY_LSE = 1e30

SQUEEZED = getattr(pl, "squeezed", None)  # a block dim of size 1, dropped from the kernel's view


@dataclass(frozen=True)
class Static:
    """Everything a kernel needs to know besides block shapes; hashable, so it can key jax's caches."""

    causal: bool
    scale: float
    q_len: int  # true lengths: rows and keys beyond them are padding
    kv_len: int
    groups: int  # query heads per kv head
    segments: bool
    highest: bool  # float32 in the kernels (float32 or widened float16 inputs): full-precision MXU passes
    interpret: bool
    device_kind: str | None = None  # the TPU compiled for (None: unknown, judged by the conservative limit)
    vmem_limit: int | None = None  # scoped VMEM limit the kernels are compiled with (None: compiler default)

    @property
    def precision(self):
        return jax.lax.Precision.HIGHEST if self.highest else None


def dot_nt(a: jax.Array, b: jax.Array, st: Static) -> jax.Array:
    """a @ b.T in float32: [m, d] x [n, d] -> [m, n]."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=st.precision,
                               preferred_element_type=jnp.float32)


def dot_nn(a: jax.Array, b: jax.Array, st: Static) -> jax.Array:
    """a @ b in float32: [m, k] x [k, n] -> [m, n]."""
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=st.precision,
                               preferred_element_type=jnp.float32)


def chunk_needed(st: Static, q_last_row, k_start: jax.Array, kv_pad: bool):
    """Whether the kv chunk starting at k_start can hold a visible key (a traced bool), or None if it always can.

    Causal: some key j <= the last query row. Padding: the chunk starts before the true kv length.
    """
    cond = None
    if st.causal:
        cond = k_start <= q_last_row
    if kv_pad:
        inside = k_start < st.kv_len
        cond = inside if cond is None else jnp.logical_and(cond, inside)
    return cond


def visible(st: Static, q_start, k_start, shape: tuple[int, int], q_ids=None, kv_ids=None, kv_pad: bool = False,
            q_axis: int = 0):
    """Boolean mask of visible keys over a score tile, or None when every key is visible.

    The tile is [queries, keys] (q_axis 0) or [keys, queries] (q_axis 1); q_ids and kv_ids come already
    oriented to broadcast over it (one a column, the other a row).
    """
    mask = None
    if st.causal or kv_pad:
        keys = jax.lax.broadcasted_iota(jnp.int32, shape, 1 - q_axis) + k_start
        if st.causal:
            mask = keys <= jax.lax.broadcasted_iota(jnp.int32, shape, q_axis) + q_start
        if kv_pad:
            inside = keys < st.kv_len
            mask = inside if mask is None else jnp.logical_and(mask, inside)
    if q_ids is not None:
        same = q_ids == kv_ids
        mask = same if mask is None else jnp.logical_and(mask, same)
    return mask


def kv_block_clamp(st: Static, qi, j, block_q: int, block_k_major: int, n_kv: int):
    """The kv block to fetch at grid step (qi, j): past the causal diagonal, repeat the last needed one (no DMA)."""
    if not st.causal:
        return j
    return jnp.minimum(j, jnp.minimum(div(qi * block_q + block_q - 1, block_k_major), n_kv - 1))


def q_block_clamp(st: Static, qi, j, block_q: int, block_k_major: int, n_q: int):
    """The query block to fetch for kv block j: before the causal diagonal, repeat the first needed one."""
    if not st.causal:
        return qi
    return jnp.maximum(qi, jnp.minimum(div(j * block_k_major, block_q), n_q - 1))


def div(a, b: int):
    """Integer division of non-negative grid indices (lax.div: jnp's floor division lowers via sign).

    The divisor is made an int32 like the grid indices: a Python int would be int64 under jax_enable_x64, and
    lax.div refuses mixed dtypes.
    """
    return jax.lax.div(a, np.int32(b))


def rem(a, b: int):
    """Remainder of non-negative grid indices (int32 divisor, as in `div`)."""
    return jax.lax.rem(a, np.int32(b))


def interpret_param(interpret: bool):
    """pallas_call's `interpret`: TPU interpret mode (runs the Mosaic semantics on the CPU) or compiled."""
    return pltpu.InterpretParams() if interpret else False


def compiler_params(interpret: bool, vmem_limit: int | None = None) -> pltpu.CompilerParams:
    """Grid (batch, head, outer block, reduction block): only the last axis carries state between steps.

    `vmem_limit` (bytes) replaces the compiler's default scoped VMEM limit, so blocks that fit the chip are not
    refused by a default meant for small kernels.
    TPU interpret mode gets no dimension semantics: in jax 0.10.2 its grid walk does not account for the grid
    axis that vmap prepends (the compiled lowering does), and sequential order is what an unmarked grid means.
    """
    if interpret:
        return pltpu.CompilerParams()
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"),
                                vmem_limit_bytes=vmem_limit)


def lane_layout(x: jax.Array) -> jax.Array:
    """[..., n] -> [..., n, 128]: a per-row value broadcast along lanes, so any 8-row block is a legal tile.

    Read in a kernel as ref[...][:, :1], a column that broadcasts over a [rows, cols] tile.
    """
    return jnp.broadcast_to(x[..., None], (*x.shape, LANES))


def sublane_layout(x: jax.Array) -> jax.Array:
    """[..., n] -> [..., 8, n]: a per-column value broadcast along sublanes, so any 128-wide block is legal.

    Read in a kernel as ref[0:1, ...], a row that broadcasts over a [rows, cols] tile.
    """
    return jnp.broadcast_to(x[..., None, :], (*x.shape[:-1], SUBLANES, x.shape[-1]))


def for_each(n: int):
    """Decorator that runs fn(i) for i in range(n) as one loop in the kernel (not n unrolled copies of fn)."""

    def run(fn) -> None:
        if n == 1:
            fn(0)
        else:
            jax.lax.fori_loop(0, n, lambda i, carry: (fn(i), carry)[1], 0)

    return run


def when(cond, fn) -> None:
    """Run fn now if cond is None (always), else under pl.when."""
    if cond is None:
        fn()
    else:
        pl.when(cond)(fn)
