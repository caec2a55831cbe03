"""Autotuned Pallas flash attention: the runtime API over the results database.

    import autotune
    out = autotune.flash_attention(q, k, v, causal=True)   # the best stored config for these shapes
    autotune.lookup(q.shape, k.shape, q.dtype, causal=True) # which config, and where it came from

The package joins `kernels/` (pure JAX) and `db/` (the results database), one folder per stage (measure, compile,
search, runtime, cli), each importing only the shared nouns at the top and the stages before it.
"""
import kernels.environment  # noqa: F401  (first: environment defaults before jax is imported)
from autotune.runtime.lookup import MISS_POLICIES, Lookup, TuningMissError, configure, lookup, reload, using
from autotune.runtime.tuned_call import flash_attention
from autotune.runtime.attention import dot_product_attention  # noqa: E402  (jax.nn's signature on the tuned kernels)

__all__ = ["MISS_POLICIES", "Lookup", "TuningMissError", "configure", "dot_product_attention", "flash_attention",
           "lookup", "reload", "using"]


def __getattr__(name: str):
    """`autotune.nnx` (the Flax NNX attention_fn, `autotune/runtime/nnx.py`) on first use: flax is an optional extra, not imported eagerly."""
    if name == "nnx":
        import importlib

        return importlib.import_module("autotune.runtime.nnx")
    raise AttributeError(f"module 'autotune' has no attribute {name!r}")
