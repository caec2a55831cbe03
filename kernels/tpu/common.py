"""What the forward and backward kernels share: static parameters, masking, block skipping and call options."""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels import masking
from kernels.cost import estimate
from kernels.masking import EMPTY_ROW_LSE, MASK_VALUE, Band  # noqa: F401 (MASK_VALUE: the kernels')
from kernels.tpu.config import LANES, SUBLANES
from kernels.tpu.layout import PAIR_HEAD_DIM, Layout

NO_KEY_LSE = EMPTY_ROW_LSE


@dataclass(frozen=True)
class Static:
    """Everything a kernel needs to know besides block shapes; hashable, so it can key jax's caches."""

    band: Band  # the (query, key) pairs the window and causal let through
    scale: float
    q_len: int  # true lengths: rows and keys beyond them are padding
    kv_len: int
    groups: int  # query heads per kv head
    segments: bool
    highest: bool  # float32 in the kernels (float32 or widened float16 inputs): full-precision MXU passes
    interpret: bool
    device_kind: str | None = None  # the TPU compiled for (None: unknown, judged by the conservative limit)
    vmem_limit: int | None = None  # scoped VMEM limit the kernels are compiled with (None: compiler default)
    softcap: float | None = None  # scores become softcap * tanh(scores / softcap)
    lengths: bool = False  # per-row q and kv lengths come as scalar-prefetch operands (runtime data)
    return_lse: bool = False  # the forward also returns its log-sum-exp
    layout: Layout = Layout("transposed", 0)  # where q, k, v, o live in HBM (kernels.tpu.layout)

    @property
    def precision(self):
        return jax.lax.Precision.HIGHEST if self.highest else None

    @property
    def left(self) -> int | None:
        """How far left of its row a query sees (None: no bound)."""
        return self.band.left

    @property
    def right(self) -> int | None:
        """How far right of its row a query sees (None: no bound; causal: 0)."""
        return self.band.right


def dot_nt(a: jax.Array, b: jax.Array, st: Static) -> jax.Array:
    """a @ b.T in float32: [m, d] x [n, d] -> [m, n]."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=st.precision,
                               preferred_element_type=jnp.float32)


def dot_nn(a: jax.Array, b: jax.Array, st: Static) -> jax.Array:
    """a @ b in float32: [m, k] x [k, n] -> [m, n]."""
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=st.precision,
                               preferred_element_type=jnp.float32)


def kv_blocks(st: Static, q_start, block_q: int, block_kv: int, n_kv: int, limits=None):
    """(first, last) kv block a query block [q_start, q_start + block_q) can see keys in (last < first: none);
    static (numpy, over many q blocks) or traced (a grid index).

    The band gives the range (kernels.masking), cut at the n_kv blocks; `limits` (the batch block's largest q
    and kv lengths, traced) cut the last at the kv length and empty the range past the q length.
    """
    first, stop = st.band.kv_blocks(q_start, q_start + block_q, block_kv)
    first = masking.minimum(first, n_kv - 1)
    last = n_kv - 1 if stop is None else masking.minimum(stop - 1, n_kv - 1)
    if limits is not None:
        q_limit, kv_limit = limits
        last = masking.minimum(last, masking.ceildiv(kv_limit, block_kv) - 1)  # -1 for a length of 0
        last = masking.select(q_start < q_limit, last, first - 1)
    return first, last


def q_blocks(st: Static, k_start, block_kv: int, block_q: int, n_q: int, limits=None):
    """(first, last) query block that can see a key in the kv block [k_start, k_start + block_kv) (the mirror of
    `kv_blocks`)."""
    first, stop = st.band.q_blocks(k_start, k_start + block_kv, block_q)
    first = masking.minimum(first, n_q - 1)
    last = n_q - 1 if stop is None else masking.minimum(stop - 1, n_q - 1)
    if limits is not None:
        q_limit, kv_limit = limits
        last = masking.minimum(last, masking.ceildiv(q_limit, block_q) - 1)
        last = masking.select(k_start < kv_limit, last, first - 1)
    return first, last


def steps(ranges) -> int:
    """Grid steps along the reduction axis: the most blocks any outer block's range holds (at least 1)."""
    first, last = ranges
    return max(1, int(np.max(last - first + 1)))


def kv_steps(st: Static, n_q: int, block_q: int, block_kv: int, n_kv: int) -> int:
    """Steps of a kv reduction axis (forward, dq): the most kv blocks one q block's window touches."""
    return steps(kv_blocks(st, np.arange(n_q) * block_q, block_q, block_kv, n_kv))


def q_steps(st: Static, n_kv: int, block_kv: int, block_q: int, n_q: int) -> int:
    """Query steps of the dk/dv reduction per group member: the most q blocks one kv block's keys are seen from."""
    return steps(q_blocks(st, np.arange(n_kv) * block_kv, block_kv, block_q, n_q))


def clamp_block(first, last, step):
    """The block to fetch at reduction step `step`: first + step, repeating the last needed one past the range
    (the pipeline issues no DMA for an unchanged block index), and `first` when the range is empty."""
    return jnp.minimum(first + step, jnp.maximum(last, first))


def batch_limits(lengths, b, block_b: int):
    """The largest q and kv length over batch block b (scalar-prefetch refs), or None without lengths."""
    if lengths is None:
        return None
    q_ref, kv_ref = lengths
    q_limit, kv_limit = q_ref[b * block_b], kv_ref[b * block_b]
    for i in range(1, block_b):
        q_limit, kv_limit = jnp.maximum(q_limit, q_ref[b * block_b + i]), jnp.maximum(kv_limit, kv_ref[b * block_b + i])
    return q_limit, kv_limit


def chunk_needed(st: Static, q_start, block_q: int, k_start, block_k: int, kv_pad: bool, limits=None, active=None):
    """Whether a [block_q queries] x [block_k keys] tile can hold a visible pair (a traced bool), or None if it
    always can: it meets the window band (causal: k <= q + 0), starts before the padding and the kv length.
    `active` (the grid step lies in its block range) is and-ed in."""
    conds = ([] if active is None else [active]) + st.band.tile_conditions(q_start, block_q, k_start, block_k)
    if kv_pad:
        conds.append(k_start < st.kv_len)
    if limits is not None:
        conds.append(k_start < limits[1])
    cond = None
    for c in conds:
        cond = c if cond is None else jnp.logical_and(cond, c)
    return cond


def visible(st: Static, q_start, k_start, shape: tuple[int, int], q_ids=None, kv_ids=None, kv_pad: bool = False,
            q_axis: int = 0, lengths=None):
    """Boolean mask of visible keys over a score tile, or None when every key is visible.

    The tile is [queries, keys] (q_axis 0) or [keys, queries] (q_axis 1); q_ids and kv_ids come already
    oriented to broadcast over it (one a column, the other a row). `lengths` is this batch row's (q_len, kv_len).
    """
    mask = None
    if st.band.bounded or kv_pad or lengths is not None:
        keys = jax.lax.broadcasted_iota(jnp.int32, shape, 1 - q_axis) + k_start
        rows = jax.lax.broadcasted_iota(jnp.int32, shape, q_axis) + q_start
        # run-time kv lengths are clipped to kv_len, so they also hide the padding
        kv_len = lengths[1] if lengths is not None else st.kv_len if kv_pad else None
        mask = masking.visible(rows, keys, st.band, q_len=None if lengths is None else lengths[0], kv_len=kv_len)
    if q_ids is not None:
        same = q_ids == kv_ids
        mask = same if mask is None else jnp.logical_and(mask, same)
    return mask


def row_lengths(lengths, b0, b):
    """(q_len, kv_len) of batch row b of the block starting at row b0, or None without lengths."""
    if lengths is None:
        return None
    return lengths[0][b0 + b], lengths[1][b0 + b]


def cap_scores(s: jax.Array, st: Static):
    """Scaled scores after soft-capping, and tanh(s / cap) (None without a cap) for the backward's derivative."""
    if st.softcap is None:
        return s, None
    t = jnp.tanh(s * (1.0 / st.softcap))
    return t * st.softcap, t


def div(a, b: int):
    """Integer division of non-negative grid indices (lax.div: jnp's floor division lowers via sign).

    The divisor is made an int32 like the grid indices: a Python int would be int64 under jax_enable_x64, and
    lax.div refuses mixed dtypes.
    """
    return jax.lax.div(a, np.int32(b))


def rem(a, b: int):
    """Remainder of non-negative grid indices (int32 divisor, as in `div`)."""
    return jax.lax.rem(a, np.int32(b))


def cost_estimate(st: Static, *, batch: int, heads: int, head_dim: int, matmuls: int, nbytes: int,
                  exps: int = 1) -> pl.CostEstimate:
    """What a kernel costs XLA's scheduler: `matmuls` [pairs x head_dim] products and `exps` exps per visible
    (query, key) pair of the causal mask and window (lengths are runtime data: not counted), bytes read once."""
    return estimate(batch=batch, heads=heads, q_len=st.q_len, kv_len=st.kv_len, head_dim=head_dim, band=st.band,
                    softcap=st.softcap, matmuls=matmuls, exps=exps, nbytes=nbytes)


def pallas_grid(st: Static, grid, in_specs, out_specs, scratch) -> dict:
    """pallas_call's grid keywords: a plain grid, or with lengths a scalar-prefetch grid spec whose two int32
    [batch] operands (q and kv lengths) come first and reach every index map and the kernel."""
    if not st.lengths:
        return dict(grid=grid, in_specs=in_specs, out_specs=out_specs, scratch_shapes=scratch)
    return dict(grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=2, grid=grid, in_specs=in_specs,
                                                       out_specs=out_specs, scratch_shapes=scratch))


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


def row_inverse(l: jax.Array, may_be_zero: bool = True) -> jax.Array:
    """1 / l for the softmax denominators l (each 0 or >= 1: a seen row's largest term is exp(0)), 0 where l is 0
    (a row that sees no key outputs zeros; `may_be_zero` False: no row can be unseen, no select). The EUP's
    approximate reciprocal refined by two Newton steps (each squares the relative error: interpret mode's
    approximation is good to about 2**-8, so one step leaves 1e-5) is exact to float32 rounding for such l; an
    exact division lowers to about ten VALU ops per vreg for the special cases (zeros, infinities, denormals) that
    cannot occur. The steps work on the per-row vector, not the tile: a few VALU ops per step in all."""
    r = pl.reciprocal(l, approx=True)
    for _ in range(2):
        r = r * (2.0 - l * r)
    return jnp.where(l > 0.0, r, 0.0) if may_be_zero else r


def lane_tile(x: jax.Array, width: int) -> jax.Array:
    """A [rows, 128] lane-broadcast value (all lanes equal) as [rows, width], for a per-row operand of a
    [rows, width] tile: whole vregs repeated when width is a multiple of 128, the leading lanes when it is below
    128. Slicing a column (`x[:, :1]`) and broadcasting it instead costs an XLU lane permute per vreg (192 of them
    per forward step at 512-row blocks)."""
    if width % LANES == 0:
        return jnp.tile(x, (1, width // LANES))
    if width < LANES:
        return x[:, :width]
    return x[:, :1]


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


# Pairs of heads in one 128-lane tile (kernels.tpu.layout, mode "pairs"): each head of the pair is scored with the
# other's lanes zeroed, and per-head values are merged back by lane half.

def lane_half(rows: int) -> jax.Array:
    """[rows, 128] int32: 0 on the first head's 64 lanes of a pair tile, 1 on the second's."""
    return (jax.lax.broadcasted_iota(jnp.int32, (rows, LANES), 1) >= PAIR_HEAD_DIM).astype(jnp.int32)


def merge_heads(values: list[jax.Array]) -> jax.Array:
    """One [rows, 128] tile from per-head ones: each head's lanes from its own value (the value itself for one
    head per tile)."""
    if len(values) == 1:
        return values[0]
    return jnp.where(lane_half(values[0].shape[0]) == 0, values[0], values[1])


def head_lanes(x: jax.Array, head: int, st: Static) -> jax.Array:
    """A pair tile with the lanes of every head but `head` zeroed (the tile itself for one head per tile)."""
    if st.layout.per_tile == 1:
        return x
    return jnp.where(lane_half(x.shape[0]) == head, x, jnp.zeros_like(x))


def swap_halves(x: jax.Array) -> jax.Array:
    """A pair tile with its two 64-lane halves exchanged (one XLU lane rotation)."""
    return pltpu.roll(x, PAIR_HEAD_DIM, 1)


def kv_half(st: Static, q_tile):
    """The lane half (0 or 1, traced) of the kv head both heads of query pair `q_tile` share (even groups)."""
    return rem(div(2 * q_tile, st.groups), 2)


def kv_for_heads(x: jax.Array, q_tile, st: Static) -> list[jax.Array]:
    """Per head of query tile `q_tile`, a kv tile (k or v) with that head's kv head at the head's own lanes.

    One head per tile, or groups of 1 (kv pair = query pair): the tile as it is. Even groups: both heads share one
    kv head; the head whose lanes differ from it reads the tile with its halves swapped."""
    if st.layout.per_tile == 1 or st.groups == 1:
        return [x] * st.layout.per_tile
    half, swapped = kv_half(st, q_tile), swap_halves(x)
    return [jnp.where(half == head, x, swapped) for head in range(2)]


def place_head(x: jax.Array, head: int, half, st: Static) -> jax.Array:
    """Pair tile x's head `head` moved to lane half `half` (traced or static), every other lane zeroed: a query
    head's q or dO set against the kv head it belongs to in the dk/dv kernel."""
    if st.layout.per_tile == 1:
        return x
    source = x if isinstance(half, int) and half == head else jnp.where(half == head, x, swap_halves(x))
    return jnp.where(lane_half(x.shape[0]) == half, source, jnp.zeros_like(x))
