"""The attention problem a kernel is asked to solve, and the checks every entry point runs on its inputs.

`Problem` is the static description (shapes, dtype, flags) that configs are tuned for; it holds plain values only,
so the search, the database and the runtime can all speak of it without touching arrays. `check_inputs` is the one
place where bad arguments are turned into clear errors, before anything is traced or compiled.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numbers

import jax
import jax.numpy as jnp
import numpy as np

from kernels.masking import Band

DTYPES = ("float32", "bfloat16", "float16")
# The largest soft cap: scores are divided by it in float32, and past 2**100 (about 1.3e30) a score below 1e-8
# would fall under float32's normal range (flushed to zero by TPUs and fast GPU paths) instead of passing unchanged.
MAX_SOFTCAP = 2.0 ** 100
# The largest |sm_scale|: past it float32 scores are so coarse (their rounding steps reach whole units of the
# exponent) that the kernels' online softmax and the reference no longer agree; no model scales that much.
MAX_SCALE = 1e4


def check_heads(heads: int, kv_heads: int) -> None:
    """ValueError unless kv_heads divides heads: under GQA/MQA each kv head serves a whole group of query heads (the
    one statement of the rule, for a Problem, the kernels' inputs and the runtime's)."""
    if kv_heads < 1 or heads % kv_heads:
        raise ValueError(f"kv_heads must divide heads, got heads={heads} and kv_heads={kv_heads}")


@dataclass(frozen=True)
class Problem:
    """Static shape and flags of one attention call: what a tuned config is keyed on."""

    batch: int
    q_len: int
    kv_len: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str = "float32"
    causal: bool = False
    segments: bool = False
    backward: bool = False
    window_left: int | None = None  # sliding window: query i sees keys i - left .. i + right (None: no bound)
    window_right: int | None = None
    softcap: float | None = None  # scores become softcap * tanh(scores / softcap) (Gemma 2)
    lengths: bool = False  # per-row padding lengths are given at run time (q_lengths, kv_lengths)

    def __post_init__(self) -> None:
        for name in ("batch", "q_len", "kv_len", "heads", "kv_heads", "head_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
            object.__setattr__(self, name, int(value))
        check_heads(self.heads, self.kv_heads)
        dtype = canonical_dtype(self.dtype, "dtype")
        object.__setattr__(self, "dtype", dtype)
        for name in ("causal", "segments", "backward", "lengths"):
            value = getattr(self, name)
            if not isinstance(value, (bool, np.bool_)):
                raise ValueError(f"{name} must be a boolean, got {value!r}")
            object.__setattr__(self, name, bool(value))
        for name in ("window_left", "window_right"):
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 0:
                    raise ValueError(f"{name} must be a non-negative integer or None, got {value!r}")
                object.__setattr__(self, name, int(value))
        object.__setattr__(self, "softcap", check_softcap(self.softcap))

    @property
    def window(self) -> tuple[int | None, int | None] | None:
        """(left, right) of the sliding window, None without one; causal attention adds right = 0 on its own."""
        if self.window_left is None and self.window_right is None:
            return None
        return self.window_left, self.window_right

    @property
    def band(self) -> Band:
        """The (query, key) pairs the causal flag and the window let through (see kernels.masking)."""
        return Band.of(causal=self.causal, window=self.window)

    @property
    def groups(self) -> int:
        """Query heads per kv head (1 for plain multi-head attention)."""
        return self.heads // self.kv_heads

    def flops(self) -> float:
        """Forward FLOPs of the visible (query, key) pairs, 4*d each (2 matmuls); backward is 2.5x this."""
        return 4.0 * self.batch * self.heads * self.head_dim * self.band.pairs(self.q_len, self.kv_len)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Problem":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(f"unknown problem field(s) {unknown}; expected some of {sorted(fields)}")
        return cls(**data)

    def replace(self, **changes: Any) -> "Problem":
        return dataclasses.replace(self, **changes)


def check_softcap(softcap, name: str = "softcap") -> float | None:
    """A soft cap must be a positive finite number up to MAX_SOFTCAP (or None: no capping)."""
    if softcap is None:
        return None
    if isinstance(softcap, (bool, np.bool_)) or not isinstance(softcap, (int, float, np.integer, np.floating)) \
            or not np.isfinite(softcap) or softcap <= 0:
        raise ValueError(f"{name} must be a positive finite number or None, got {softcap!r}")
    if softcap > MAX_SOFTCAP:
        raise ValueError(f"{name} must be at most 2**100 (about {MAX_SOFTCAP:.3g}; scores divided by more fall "
                         f"out of float32's normal range), got {softcap!r}")
    return float(softcap)


def check_window(window, name: str = "window") -> tuple[int | None, int | None] | None:
    """A sliding window as (left, right): one int w means (w, w) (jax.nn's `local_window_size`); each side a
    non-negative int, or None for no bound on that side."""
    if window is None:
        return None
    def side(x) -> bool:
        return x is None or (isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_)) and x >= 0)
    if side(window):
        return int(window), int(window)
    if isinstance(window, (tuple, list)) and len(window) == 2 and all(side(x) for x in window):
        left, right = (None if x is None else int(x) for x in window)
        return None if left is None and right is None else (left, right)
    parts = window if isinstance(window, (tuple, list)) and len(window) == 2 else (window,)
    if all(x is None or isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_)) for x in parts):
        raise ValueError(f"{name} must not be negative (an int or a pair (left, right) of non-negative ints or "
                         f"None), got {window!r}")
    raise ValueError(f"{name} must be an int or a pair (left, right) of non-negative ints or None, got {window!r}")


def check_lengths(lengths, name: str, batch: int, seq: int, *, longer_means_all: bool = False):
    """Per-row lengths as an int32 [batch] array clipped to [0, seq] (None stays None). Concrete values must be in
    0..seq, or, with `longer_means_all` (jax.nn's reading), anything from 0 that fits int32."""
    if lengths is None:
        return None
    if not hasattr(lengths, "shape") or not hasattr(lengths, "dtype"):
        if isinstance(lengths, (bool, np.bool_)) or not isinstance(lengths, (list, tuple, np.ndarray)):
            raise ValueError(f"{name} must be an integer array of shape ({batch},), got {type(lengths).__name__}")
        lengths = np.asarray(lengths)
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"{name} must be an integer array of shape ({batch},), got dtype {jnp.dtype(lengths.dtype)}")
    if tuple(lengths.shape) != (batch,):
        raise ValueError(f"{name} must have shape ({batch},) (one length per batch row), got {tuple(lengths.shape)}")
    if not isinstance(lengths, jax.core.Tracer):
        values = np.asarray(lengths)
        if values.size and values.min() < 0:
            raise ValueError(f"{name} must not be negative, got {values.tolist()}")
        top = np.iinfo(np.int32).max if longer_means_all else seq
        if values.size and values.max() > top:
            raise ValueError(f"{name} must be at most {'int32' if longer_means_all else 'the sequence length'} "
                             f"({top}), got {values.tolist()}")
        if not _fits_int32(values.dtype):
            lengths = np.minimum(values, seq)  # before any cast: a wide integer must not wrap
    return jnp.clip(jnp.asarray(lengths), 0, seq).astype(jnp.int32)


def full_lengths(q_lengths, kv_lengths, problem: "Problem"):
    """Both length arrays (a missing one: the whole sequence), for kernels that take both or none."""
    if q_lengths is None:
        q_lengths = jnp.full((problem.batch,), problem.q_len, jnp.int32)
    if kv_lengths is None:
        kv_lengths = jnp.full((problem.batch,), problem.kv_len, jnp.int32)
    return q_lengths, kv_lengths


def canonical_dtype(dtype: Any, name: str = "dtype") -> str:
    """Return the dtype's name if it is one the kernels support, else raise naming the argument."""
    try:
        canonical = jnp.dtype(dtype).name
    except TypeError:
        raise ValueError(f"{name} must be one of {DTYPES}, got {dtype!r}") from None
    if canonical not in DTYPES:
        raise ValueError(f"{name} must be one of {DTYPES}, got {canonical!r}")
    return canonical


def check_inputs(q, k, v, segment_ids=None, *, causal: bool = False, window=None, softcap=None,
                 lengths: bool = False):
    """Validate q, k, v and segment ids; return (Problem, q_ids, kv_ids) with ids as int32 arrays or None.

    Layout: q [batch, q_len, heads, head_dim], k and v [batch, kv_len, kv_heads, head_dim].
    `segment_ids` is one int array [batch, seq] (only when q_len == kv_len) or a pair (q_ids, kv_ids).
    `window` (see `check_window`) and `softcap` go into the Problem; `lengths` says per-row lengths are given
    (check them with `check_lengths`).
    """
    if not isinstance(causal, (bool, np.bool_)):  # one rule for every kernel: bool(x) would accept anything
        raise TypeError(f"causal must be a bool (Python or numpy), got {type(causal).__name__} {causal!r}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{name} must be an array, got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(f"{name} must have 4 dimensions [batch, seq, heads, head_dim], got shape {tuple(x.shape)}")
        if jnp.dtype(x.dtype).name not in DTYPES:
            raise TypeError(f"{name} must be a floating array of one of {DTYPES}, got dtype {jnp.dtype(x.dtype).name}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
    batch, q_len, heads, head_dim = q.shape
    _, kv_len, kv_heads, _ = k.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != batch:
        raise ValueError(f"k and v must have the batch of q ({batch}), got {k.shape[0]}")
    if k.shape[3] != head_dim:
        raise ValueError(f"k and v must have the head_dim of q ({head_dim}), got {k.shape[3]}")
    if 0 in (batch, q_len, kv_len, heads, kv_heads, head_dim):
        raise ValueError(f"empty input: q has shape {tuple(q.shape)} and k has shape {tuple(k.shape)}")
    check_heads(heads, kv_heads)

    q_ids = kv_ids = None
    if segment_ids is not None:
        if isinstance(segment_ids, (tuple, list)):
            if len(segment_ids) != 2:
                raise ValueError("segment_ids must be one array [batch, seq] or a pair (q_ids, kv_ids)")
            q_ids, kv_ids = segment_ids
        else:
            if q_len != kv_len:
                raise ValueError(
                    f"segment_ids as one array needs q_len == kv_len (got {q_len} and {kv_len}); pass (q_ids, kv_ids)"
                )
            q_ids = kv_ids = segment_ids
        q_ids = _check_ids(q_ids, "segment_ids (q)", (batch, q_len))
        kv_ids = _check_ids(kv_ids, "segment_ids (kv)", (batch, kv_len))
        q_ids, kv_ids = _int32_ids(q_ids, kv_ids)

    problem = Problem(
        batch=batch, q_len=q_len, kv_len=kv_len, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
        dtype=jnp.dtype(q.dtype).name, causal=bool(causal), segments=segment_ids is not None,
        **window_fields(check_window(window)), softcap=check_softcap(softcap), lengths=bool(lengths),
    )
    return problem, q_ids, kv_ids


def window_fields(window) -> dict[str, int | None]:
    """A checked (left, right) window (or None) as Problem's window_left and window_right."""
    left, right = window if window is not None else (None, None)
    return {"window_left": left, "window_right": right}


def _check_ids(ids, name: str, shape: tuple[int, int]):
    if not hasattr(ids, "shape") or not hasattr(ids, "dtype"):
        raise TypeError(f"{name} must be an integer array of shape {shape}, got {type(ids).__name__}")
    if tuple(ids.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} [batch, seq], got {tuple(ids.shape)}")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(f"{name} must have an integer dtype, got {jnp.dtype(ids.dtype).name}")
    if not isinstance(ids, jax.core.Tracer) and not _fits_int32(ids.dtype):
        values = np.asarray(ids)
        info = np.iinfo(np.int32)
        if values.size and (values.min() < info.min or values.max() > info.max):
            raise ValueError(f"{name} must fit in int32 ({info.min} to {info.max}), got values from "
                             f"{values.min()} to {values.max()}; number the segments from 0")
    return ids


def _fits_int32(dtype) -> bool:
    return np.can_cast(np.dtype(dtype), np.int32, casting="safe")


def _int32_ids(q_ids, kv_ids):
    """Both id arrays as int32, equal exactly where the given ids are equal.

    Concrete ids were checked to fit int32 (a plain cast then keeps equality). Traced ids of a wider type cannot be
    looked at, so they are relabelled exactly instead of wrapped (2**32 must not meet 0, nor uint32 2**31 int32
    -2**31): without a common integer type an unsigned id above the signed range, or a negative signed id, can
    match nothing; 64-bit ids become the rank of their value among the kv ids of their row."""
    traced = isinstance(q_ids, jax.core.Tracer) or isinstance(kv_ids, jax.core.Tracer)
    if not traced or (_fits_int32(q_ids.dtype) and _fits_int32(kv_ids.dtype)):
        return jnp.asarray(q_ids, jnp.int32), jnp.asarray(kv_ids, jnp.int32)
    q_ids, kv_ids = jnp.asarray(q_ids), jnp.asarray(kv_ids)
    if q_ids.dtype != kv_ids.dtype:
        common = np.promote_types(q_ids.dtype, kv_ids.dtype)
        if common.kind in "iu" and (common.itemsize <= 4 or jax.config.jax_enable_x64):
            q_ids, kv_ids = q_ids.astype(common), kv_ids.astype(common)
        else:
            signed = np.dtype(np.int64 if jax.config.jax_enable_x64 else np.int32)
            q_ids, kv_ids = _split_range(q_ids, signed, -1), _split_range(kv_ids, signed, -2)
    if q_ids.dtype.itemsize < 4:
        return q_ids.astype(jnp.int32), kv_ids.astype(jnp.int32)
    if q_ids.dtype.itemsize == 4:  # int32 or uint32 on both sides: reinterpreting the bits is one-to-one
        return (jax.lax.bitcast_convert_type(q_ids, jnp.int32), jax.lax.bitcast_convert_type(kv_ids, jnp.int32))
    return jax.vmap(_ranks)(q_ids, kv_ids)


def _split_range(ids, signed: np.dtype, nothing: int):
    """Ids as `signed`, with every id that no id of the other (signed or unsigned) side can equal set to `nothing`."""
    if jnp.issubdtype(ids.dtype, jnp.unsignedinteger):
        return jnp.where(ids > np.iinfo(signed).max, nothing, ids.astype(signed)).astype(signed)
    return jnp.where(ids < 0, nothing, ids.astype(signed)).astype(signed)


def _ranks(q_row, kv_row):
    """One row's ids as ranks among its kv ids (a query id no key has becomes -1): fits int32, keeps equality."""
    sorted_kv = jnp.sort(kv_row)
    kv_rank = jnp.searchsorted(sorted_kv, kv_row, side="left")
    position = jnp.searchsorted(sorted_kv, q_row, side="left")
    found = sorted_kv[jnp.minimum(position, kv_row.shape[0] - 1)] == q_row
    return jnp.where(found, position, -1).astype(jnp.int32), kv_rank.astype(jnp.int32)


def resolve_scale(sm_scale, head_dim: int, name: str = "sm_scale") -> float:
    """The softmax scale: 1/sqrt(head_dim) unless given; a concrete finite number (a 0-d array counts) of
    magnitude at most MAX_SCALE, since the kernels compile it in."""
    if sm_scale is None:
        return float(1.0 / np.sqrt(head_dim))
    if isinstance(sm_scale, jax.core.Tracer):
        raise ValueError(f"{name} must be a concrete number (the kernels compile it in), got a traced value")
    if hasattr(sm_scale, "shape") and np.shape(sm_scale) == ():
        sm_scale = np.asarray(sm_scale).item()
    if isinstance(sm_scale, (bool, np.bool_)) or not isinstance(sm_scale, numbers.Real) or not np.isfinite(sm_scale):
        raise ValueError(f"{name} must be a finite number or None, got {sm_scale!r}")
    if abs(sm_scale) > MAX_SCALE:
        raise ValueError(f"{name} must be at most {MAX_SCALE:g} in magnitude (float32 scores scaled further are too "
                         f"coarse for the kernels' softmax), got {sm_scale!r}")
    return float(sm_scale)
