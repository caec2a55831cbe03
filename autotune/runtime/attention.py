"""`autotune.dot_product_attention`: the signature and results of `jax.nn.dot_product_attention`, on the tuned kernels.

Models call attention the way jax.nn spells it; switching them to the tuned kernels should change one name. What the
kernels express runs them through the runtime (tuned config, misses counted): causal (top-left, as jax.nn), GQA,
any scale, padding lengths, sliding windows, soft-capping and the log-sum-exp residual. Where jax.nn's finite mask
value shows (a valid query row that sees no key gets the mean of every value, and its residual the mask value),
the same is written out around the kernel. The rest (`bias`, an arbitrary `mask`) runs jax.nn in XLA, with one
warning per shape and reason and a miss recorded with that reason. Where jax.nn's own XLA or cuDNN attention won the
key's final re-timing (autotune.search.winner), `implementation=None` runs that instead of the kernel.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from autotune.runtime import lookup as runtime, sharding
from autotune.runtime.notices import warn_once
from db import KERNEL_IMPLEMENTATION as KERNEL
from autotune.runtime.tuned_call import flash_attention as tuned_flash_attention, stored_winner
from kernels.xla_attention import xla_attention
from autotune.device import current_device
from kernels import DTYPES, Problem
from kernels.devices import INTERPRET
from kernels.masking import MASK_VALUE, Band
from kernels.problem import check_heads, check_lengths, check_softcap, check_window, resolve_scale

KERNEL_IMPLEMENTATIONS = ("pallas", "gpu", "tpu")
IMPLEMENTATIONS = (None, "xla", "cudnn") + KERNEL_IMPLEMENTATIONS


def dot_product_attention(query, key, value, bias=None, mask=None, *, scale=None, is_causal=False,
                          query_seq_lengths=None, key_value_seq_lengths=None, local_window_size=None,
                          implementation=None, return_residual=False, logits_soft_cap=None):
    """`jax.nn.dot_product_attention` with the tuned Pallas kernels where they apply.

    Layout [batch, seq, heads, head_dim] (or without batch). `implementation`: None (the key's stored winner:
    jax.nn's XLA or cuDNN attention where that won the search's final re-timing and can run the call, else the
    tuned kernel when it covers the call, else XLA with a warning saying why), "xla" or "cudnn" (jax.nn's),
    "pallas" (the tuned kernel of the platform: Triton on GPU, Mosaic on TPU, the Triton one in interpret mode on a
    CPU), "gpu" or "tpu" (that kernel; off its platform only in interpret mode on a CPU). A kernel named here that
    cannot run the call is a ValueError. `logits_soft_cap` (ours): scores become `cap * tanh(scores / cap)` before
    masking (Gemma 2).
    With `return_residual` also returns the natural-log log-sum-exp of the masked scaled scores, [batch, seq, heads]
    in the dtype of key, without gradient (as jax.nn).
    """
    query, key, value, batched = _arrays(query, key, value)
    scale = resolve_scale(scale, query.shape[-1], "scale")
    if not isinstance(is_causal, (bool, np.bool_)):
        raise ValueError(f"is_causal must be a bool, got {is_causal!r}")
    if not isinstance(return_residual, (bool, np.bool_)):
        raise ValueError(f"return_residual must be a bool, got {return_residual!r}")
    q_lens = check_lengths(query_seq_lengths, "query_seq_lengths", query.shape[0], query.shape[1],
                           longer_means_all=True)  # jax.nn reads a length past the sequence as "all of it"
    kv_lens = check_lengths(key_value_seq_lengths, "key_value_seq_lengths", query.shape[0], key.shape[1],
                            longer_means_all=True)
    window = check_window(local_window_size, "local_window_size")
    cap = check_softcap(logits_soft_cap, "logits_soft_cap")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    mask_dtype = None if mask is None else (mask.dtype if hasattr(mask, "dtype") else np.asarray(mask).dtype)
    if mask_dtype is not None and mask_dtype != np.bool_:
        raise ValueError(f"mask must be a boolean array (True: attend); pass an additive mask as bias, "
                         f"got dtype {mask_dtype}")

    why = _not_covered(query, bias, mask)
    if implementation in KERNEL_IMPLEMENTATIONS:
        if why:
            raise ValueError(f"implementation={implementation!r} cannot run this call: {why}; "
                             f"use implementation=None to fall back to XLA")
    elif implementation is None and why:
        warn_once((why, query.shape, key.shape, str(query.dtype)),
                  f"autotune.dot_product_attention runs XLA, not the tuned kernel, for query {tuple(query.shape)} "
                  f"and key {tuple(key.shape)}: {why}")
        _record_fallback(query, key, is_causal=bool(is_causal), window=window, cap=cap,
                         lengths=q_lens is not None or kv_lens is not None, why=why)
    if implementation in ("xla", "cudnn") or why:
        out = xla_attention(query, key, value, bias, mask, scale=scale, is_causal=bool(is_causal), q_lens=q_lens,
                            kv_lens=kv_lens, window=window, cap=cap, implementation=implementation or "xla",
                            return_residual=bool(return_residual))
    else:
        out = _tuned(query, key, value, scale=scale, is_causal=bool(is_causal), q_lens=q_lens, kv_lens=kv_lens,
                     window=window, cap=cap, return_residual=bool(return_residual),
                     kernel=_kernel_name(implementation), stored_winner_runs=implementation is None)
    if batched:
        return out
    return tuple(x[0] for x in out) if isinstance(out, tuple) else out[0]


# ---- checks: every one before anything is traced into a kernel -------------------------------------------------

def _arrays(query, key, value):
    """q, k, v as 4-d arrays (a missing batch axis added, as jax.nn does) and whether they had a batch axis."""
    arrays = []
    for name, x in (("query", query), ("key", key), ("value", value)):
        if not hasattr(x, "shape"):
            x = jnp.asarray(x)
        if x.ndim not in (3, 4):
            raise ValueError(f"{name} must be [batch, seq, heads, head_dim] or [seq, heads, head_dim], "
                             f"got shape {tuple(x.shape)}")
        arrays.append(x)
    if len({x.ndim for x in arrays}) != 1:
        raise ValueError(f"query, key and value must have the same rank, got shapes "
                         f"{[tuple(x.shape) for x in arrays]}")
    batched = arrays[0].ndim == 4
    query, key, value = (x if batched else x[None] for x in arrays)
    if key.shape != value.shape:
        raise ValueError(f"value must have the shape of key {tuple(key.shape)}, got {tuple(value.shape)}")
    if query.shape[0] != key.shape[0] or query.shape[3] != key.shape[3]:
        raise ValueError(f"query {tuple(query.shape)} must share batch and head_dim with key {tuple(key.shape)}")
    if not (query.dtype == key.dtype == value.dtype):
        raise ValueError(f"query, key and value must share one dtype, got {query.dtype}, {key.dtype}, {value.dtype}")
    check_heads(query.shape[2], key.shape[2])
    return query, key, value, batched


def _not_covered(query, bias, mask) -> str:
    """Why the tuned kernels cannot run this call ('' when they can)."""
    if bias is not None:
        return "bias is given (the kernels take no additive bias)"
    if mask is not None:
        return ("mask is given (the kernels take causal, a window, padding lengths and segment ids, not an "
                "arbitrary mask)")
    if jnp.dtype(query.dtype).name not in DTYPES:
        return f"dtype {jnp.dtype(query.dtype).name} (the kernels take {', '.join(DTYPES)})"
    return ""


def _kernel_name(implementation) -> str | None:
    """The runtime's kernel for an implementation: None for the platform's; 'gpu'/'tpu' only where they run."""
    if implementation in (None, "pallas"):
        return None
    platform = current_device().platform
    if platform not in (INTERPRET, implementation):
        raise ValueError(f"implementation={implementation!r} cannot run on {platform} (only there or in interpret "
                         f"mode on a CPU); use 'pallas' for this platform's kernel")
    return implementation


def _record_fallback(query, key, *, is_causal, window, cap, lengths, why) -> None:
    """The miss (with its reason) of a call that ran XLA, under the key the kernel would have had."""
    if jnp.dtype(query.dtype).name not in DTYPES:
        return
    left, right = window if window is not None else (None, None)
    problem = Problem(batch=query.shape[0], q_len=query.shape[1], kv_len=key.shape[1], heads=query.shape[2],
                      kv_heads=key.shape[2], head_dim=query.shape[3], dtype=jnp.dtype(query.dtype).name,
                      causal=is_causal, window_left=left, window_right=right, softcap=cap, lengths=lengths)
    runtime.record_fallback(problem, why)


# ---- the two paths ------------------------------------------------------------------------------------------------



def _tuned(query, key, value, *, scale, is_causal, q_lens, kv_lens, window, cap, return_residual, kernel,
           stored_winner_runs):
    """The tuned kernel, per device inside shard_map when the inputs are sharded over a mesh; or, with
    `stored_winner_runs`, jax.nn's implementation where that won the key of the (per-device) shape."""
    layout = sharding.layout_of(query, key)
    device = None if layout is None else layout.device

    def body(q, k, v, q_lens, kv_lens):
        features = dict(scale=scale, is_causal=is_causal, q_lens=q_lens, kv_lens=kv_lens, window=window, cap=cap,
                        return_residual=return_residual)
        winner = KERNEL
        if stored_winner_runs:
            winner = stored_winner(q, k, v, causal=is_causal, sm_scale=scale, window=window, softcap=cap,
                                   q_lengths=q_lens, kv_lengths=kv_lens, device=device)
        if winner != KERNEL:
            return xla_attention(q, k, v, None, None, implementation=winner, **features)
        return _kernel_call(q, k, v, kernel=kernel, device=device, **features)

    if layout is None:
        return body(query, key, value, q_lens, kv_lens)
    sharding.check_divides(layout, query, key)
    return sharding.run_sharded(layout, body, query, key, value, q_lens, kv_lens,
                                out_ranks=(4, 3) if return_residual else (4,))


def _kernel_call(q, k, v, *, scale, is_causal, q_lens, kv_lens, window, cap, return_residual, kernel, device):
    out = tuned_flash_attention(q, k, v, causal=is_causal, sm_scale=scale, window=window, softcap=cap,
                                  q_lengths=q_lens, kv_lengths=kv_lens, return_lse=return_residual, kernel=kernel,
                                  device=device)
    out, lse = out if return_residual else (out, None)
    no_key = _rows_without_keys(q.shape[0], q.shape[1], k.shape[1], is_causal=is_causal, window=window,
                                q_lens=q_lens, kv_lens=kv_lens)
    if no_key is not None:
        # jax.nn masks with a finite large negative number: a valid query row that sees no key gets uniform weights
        # over every key, masked ones included, i.e. the mean of all values (the kernels give zeros).
        groups = q.shape[2] // k.shape[2]
        mean_v = jnp.repeat(jnp.mean(v.astype(jnp.float32), axis=1), groups, axis=1).astype(out.dtype)
        out = jnp.where(no_key[:, :, None, None], mean_v[:, None], out)
    if lse is None:
        return out
    # jax.nn's residual: the log-sum-exp of the masked logits, the mask value where a row sees nothing.
    return out, jnp.where(jnp.isfinite(lse), lse, MASK_VALUE).astype(k.dtype)


def _rows_without_keys(batch: int, q_len: int, kv_len: int, *, is_causal, window, q_lens, kv_lens):
    """[batch, q_len] bool: valid query rows whose visible keys (causal, window, kv length) are none; None when no
    row can be so (without a window or kv lengths every valid row sees key 0 at least)."""
    if window is None and kv_lens is None:
        return None
    rows = jnp.arange(q_len)[None, :]
    ends = jnp.full((batch, 1), kv_len) if kv_lens is None else kv_lens[:, None]
    first, last = Band.of(causal=is_causal, window=window).key_range(rows, ends)
    no_key = last < first
    if q_lens is not None:
        no_key = no_key & (rows < q_lens[:, None])
    return no_key
