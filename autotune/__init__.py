"""Autotuned Pallas flash attention: the runtime API over the results database.

    import autotune
    out = autotune.flash_attention(q, k, v, causal=True)   # the best stored config for these shapes
    autotune.lookup(q.shape, k.shape, q.dtype, causal=True) # which config, and where it came from

The search, checking, timing and the `autotune` command line live in the submodules.
"""
from autotune.runtime import (
    MISS_POLICIES, Lookup, TuningMissError, configure, flash_attention, lookup, reload, using,
)

__all__ = ["MISS_POLICIES", "Lookup", "TuningMissError", "configure", "flash_attention", "lookup", "reload", "using"]
