"""One compile process: reads compile jobs (JSON lines) on stdin, compiles each deviceless, answers JSON lines.

Run by `autotune.compile.pool` as `python -m autotune.compile.worker`, with the environment that makes the compilers
talk (ptxas log at verbose level 2) and lets several processes load libtpu. Each job gets its own XLA dump folder and
its own capture of file descriptor 2 (where XLA and ptxas log), so figures never mix between jobs. Before each job
the worker writes a `start` line, so the parent knows which job a crash or a hang belongs to.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager

from autotune.compile.model.tpu_bundles import dump_flags

_TPU_DUMP = tempfile.mkdtemp(prefix="autotune-libtpu-dump-")  # libtpu reads its dump folder once, at load
os.environ["LIBTPU_INIT_ARGS"] = (os.environ.get("LIBTPU_INIT_ARGS", "") + " " + dump_flags(_TPU_DUMP)).strip()

import kernels  # noqa: F401,E402  (environment defaults before jax)
import jax  # noqa: E402
import jax.numpy as jnp
from jax.experimental import topologies
from jax.sharding import SingleDeviceSharding

from autotune.measure.baselines import dot_product_attention_forward
from autotune.measure.kernel_call import feature_kwargs
from autotune.compile.model.tpu_predict import DumpCollector, predict_tpu_compile, predict_xla_compile
from autotune.compile.figures import SPILLS_NOT_PREDICTED, classify_failure, gpu_kernels, tpu_kernels
from autotune.compile.targets import Target, get_target, gpu_target_config
from autotune.kernel_protocol import TargetKernelModule, load_target_kernel
from kernels import Problem
from kernels.entry import unchecked_configs

_DEVICES: dict[str, object] = {}
_COLLECTOR = DumpCollector(_TPU_DUMP)


def device_for(target: Target):
    """The compile-only device standing in for `target` (made once per process)."""
    if target.name not in _DEVICES:
        if target.platform == "tpu":
            topology = topologies.get_topology_desc(target.topology, platform="tpu",
                                                    chips_per_host_bounds=(1, 1, 1))
        else:
            topology = topologies.get_topology_desc(platform="cuda", topology_name="",
                                                    target_config=gpu_target_config(target), topology="1x1x1")
        _DEVICES[target.name] = topology.devices[0]
    return _DEVICES[target.name]


def _attention_fn(module: TargetKernelModule, problem: Problem, config, device_kind: str):
    def attention(q, k, v, q_ids, kv_ids, q_lengths, kv_lengths):
        ids = (q_ids, kv_ids) if problem.segments else None
        return module.flash_attention(q, k, v, causal=problem.causal, segment_ids=ids, config=config,
                                      device_kind=device_kind, **feature_kwargs(problem, q_lengths, kv_lengths))

    return _with_gradients(attention, problem)


def _with_gradients(attention, problem: Problem):
    """The call on q, k, v as projections leave them ([batch, seq, heads * head_dim], split into heads here and
    the output merged back, as in a model), or for a backward problem the gradients of its sum with respect to q,
    k and v. XLA:TPU tiles the minor two dimensions, so [b, s, h, d] entry parameters would need relayouts that
    a model does not have, and place those copies in VMEM beside the kernel, inflating its scoped figure."""
    def split(x):
        return x.reshape(*x.shape[:2], x.shape[2] // problem.head_dim, problem.head_dim)

    def projected(q, k, v, q_ids, kv_ids, q_lengths, kv_lengths):
        out = attention(split(q), split(k), split(v), q_ids, kv_ids, q_lengths, kv_lengths)
        return out.reshape(*out.shape[:2], -1)

    if not problem.backward:
        return projected

    def loss(q, k, v, q_ids, kv_ids, q_lengths, kv_lengths):
        return projected(q, k, v, q_ids, kv_ids, q_lengths, kv_lengths).astype(jnp.float32).sum()

    return jax.grad(loss, argnums=(0, 1, 2))


def _specs(problem: Problem, device) -> tuple:
    sharding = SingleDeviceSharding(device)
    dtype = jnp.dtype(problem.dtype)
    q = jax.ShapeDtypeStruct((problem.batch, problem.q_len, problem.heads * problem.head_dim), dtype,
                             sharding=sharding)
    kv = jax.ShapeDtypeStruct((problem.batch, problem.kv_len, problem.kv_heads * problem.head_dim), dtype,
                              sharding=sharding)
    q_ids = jax.ShapeDtypeStruct((problem.batch, problem.q_len), jnp.int32, sharding=sharding)
    kv_ids = jax.ShapeDtypeStruct((problem.batch, problem.kv_len), jnp.int32, sharding=sharding)
    lengths = jax.ShapeDtypeStruct((problem.batch,), jnp.int32, sharding=sharding)
    return q, kv, kv, q_ids, kv_ids, lengths, lengths


@contextmanager
def _captured_stderr(path: str):
    """Send file descriptor 2 (C++ logs) to `path` for the duration."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "wb") as sink:
        os.dup2(sink.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def _read(pattern: str) -> str:
    return "".join(open(p, errors="replace").read() for p in sorted(glob.glob(pattern)))


def run_job(job: dict) -> dict:
    """Compile one job; a dict with ok, seconds, kernels or failure (kind, message, requested/limit bytes)."""
    target = get_target(job["target"])
    problem = Problem.from_dict(job["problem"])
    module = load_target_kernel(target.platform)
    xla = job.get("implementation") == "xla"  # jax.nn's XLA attention for the problem (autotune.compile.xla_prediction)
    config = None if xla else module.Config.from_dict(job["config"])
    jax.config.update("jax_enable_x64", bool(job.get("x64", False)))
    with tempfile.TemporaryDirectory(prefix="autotune-compile-") as folder:
        log = os.path.join(folder, "log.txt")
        dump = os.path.join(folder, "dump")
        start = time.perf_counter()
        try:
            with _captured_stderr(log), unchecked_configs():  # the compiler judges every config here
                device = device_for(target)
                function = (_with_gradients(dot_product_attention_forward(problem, "xla"), problem) if xla
                            else _attention_fn(module, problem, config, target.device_kind))
                lowered = jax.jit(function).lower(*_specs(problem, device))
                lowered.compile(compiler_options={"xla_dump_to": dump})
        except Exception as exc:  # noqa: BLE001 - every compile failure becomes a classified result
            _COLLECTOR.collect(os.path.join(folder, "libtpu"))  # this job's partial dump goes with its folder
            message = f"{type(exc).__name__}: {exc}"
            kind, requested, limit = classify_failure(message + "\n" + _read(log)[-4000:])
            return {"ok": False, "seconds": time.perf_counter() - start, "kind": kind,
                    "message": message[:2000], "requested_bytes": requested, "limit_bytes": limit,
                    "trace": traceback.format_exc()[-1500:] if kind == "other" else ""}
        seconds = time.perf_counter() - start
        if target.platform == "gpu":
            found = gpu_kernels(_read(log), _read(os.path.join(dump, "*thunk_sequence.txt")))
            result = {"ok": True, "seconds": seconds, "kernels": [dataclasses.asdict(k) for k in found]}
            if any(k.spills for k in found):  # see SPILLS_NOT_PREDICTED
                return {**result, "prediction_error": SPILLS_NOT_PREDICTED}
            return {**result, **_gpu_prediction(dump, target, problem, config)}
        found = tpu_kernels(_read(os.path.join(dump, "*after_codegen.txt")))
        result = {"ok": True, "seconds": seconds, "kernels": [dataclasses.asdict(k) for k in found]}
        libtpu_dump = os.path.join(folder, "libtpu")
        _COLLECTOR.collect(libtpu_dump)
        start = time.perf_counter()
        try:  # the static time model's prediction (autotune/compile/model); a model error never fails a compile
            prediction = (predict_xla_compile(libtpu_dump, target.name, problem) if xla
                          else predict_tpu_compile(libtpu_dump, target.name, problem, job["config"]))
            result["prediction"] = prediction.to_dict() if prediction is not None else None
        except Exception as exc:  # noqa: BLE001
            result["prediction"], result["prediction_error"] = None, f"{type(exc).__name__}: {exc}"[:500]
        result["prediction_seconds"] = time.perf_counter() - start
    return result


def _gpu_prediction(dump: str, target: Target, problem: Problem, config) -> dict:
    """The static model's predicted time (a dict, labelled with its model version) and what predicting took."""
    from autotune.compile.model.gpu_predict import predict_gpu_compile

    start = time.perf_counter()
    try:
        found = predict_gpu_compile(dump, target.model_hardware, problem, config, target.device_kind)
    except Exception as exc:  # noqa: BLE001 - a model failure must not fail the compile
        return {"prediction_error": f"{type(exc).__name__}: {exc}"[:500]}
    if found is None:
        return {}
    return {"prediction": found.to_dict(), "prediction_seconds": time.perf_counter() - start}


def main() -> None:
    out = sys.stdout
    sys.stdout = sys.stderr  # anything printed by libraries stays off the answer channel
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        out.write(json.dumps({"start": job["id"]}) + "\n")
        out.flush()
        try:
            result = run_job(job)
        except Exception as exc:  # noqa: BLE001 - bad job: report, keep serving
            result = {"ok": False, "seconds": 0.0, "kind": "other", "message": f"{type(exc).__name__}: {exc}",
                      "requested_bytes": None, "limit_bytes": None, "trace": traceback.format_exc()[-1500:]}
        result["id"] = job["id"]
        out.write(json.dumps(result) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
