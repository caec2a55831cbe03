"""Autotuned Pallas flash attention: the runtime API over the results database.

    import autotune
    out = autotune.flash_attention(q, k, v, causal=True)   # the best stored config for these shapes
    autotune.lookup(q.shape, k.shape, q.dtype, causal=True) # which config, and where it came from

The package joins `kernels/` (pure JAX) and `db/` (the results database). Following `autotune search` from the
command line to the kernel, each module is passed once, in one direction:

  cli.py -> commands/search.py    the command: flags, database, run row, summary (commands/common.py: shared)
  scheduler.py                    a shapes list: one worker per problem, through claims in the database
  search.py                       one problem's search loop, top to bottom
    space.py                      the kernel's space as Optuna sees it, and the samplers
    study.py                      the study shared by all workers: budget, heartbeats, dead workers' trials
    optuna_storage.py             the only module touching Optuna's internals
    evaluation.py, isolation.py   one candidate: compile (candidate.py), check (checking.py), time (timing.py)
    retime.py                     the end: interleaved re-timing of the top configs and the default, the store
  kernels_registry.py             the `KernelModule` protocol; loading `gpu`, `tpu` or a module path

Beside them: runtime.py (the lookup behind `flash_attention`), attention_api.py (`dot_product_attention`, jax.nn's
signature on the tuned kernels; sharding.py runs it per device on a mesh; nnx.py hands it to Flax NNX), settings.py
(the environment's timings, read in one place), database_messages.py (one sentence for a failing database), keys.py,
shapes.py, device.py, inputs.py, baselines.py, heartbeat.py, retry.py, and the compile targets (targets.py,
compilers.py).
"""
import kernels.environment  # noqa: F401  (first: environment defaults before jax is imported)
from autotune.runtime import (
    MISS_POLICIES, Lookup, TuningMissError, configure, flash_attention, lookup, reload, using,
)
from autotune.attention_api import dot_product_attention  # noqa: E402  (jax.nn's signature on the tuned kernels)

__all__ = ["MISS_POLICIES", "Lookup", "TuningMissError", "configure", "dot_product_attention", "flash_attention",
           "lookup", "reload", "using"]


def __getattr__(name: str):
    """`autotune.nnx` (the Flax NNX attention_fn) on first use: flax is an optional extra, not imported eagerly."""
    if name == "nnx":
        import importlib

        return importlib.import_module("autotune.nnx")
    raise AttributeError(f"module 'autotune' has no attribute {name!r}")
