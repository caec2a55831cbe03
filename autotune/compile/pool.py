"""Deviceless compiles of a kernel config for a named target, by the real compilers, in parallel processes.

XLA:TPU with Mosaic (libtpu) and XLA:GPU with Triton and ptxas (the CUDA plugin) both compile for a device that is
not there, given a compile-only device (`autotune.compile.targets`). A compile either succeeds, with the real figures of
each kernel (shared memory, registers, spills, stack; or scoped VMEM), or fails with a classified reason
(`resource_exhausted` is what the validity checks must foresee). Compiles run in worker processes
(`autotune.compile.worker`): libtpu and XLA keep global state, a compile can take minutes or crash, and two cores
compile twice as fast as one. Install the compilers with `pip install -e '.[compilers]'`.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import jax

from autotune.compile.figures import KernelFigures
from autotune.compile.targets import Target, get_target
from autotune.kernel_protocol import load_target_kernel
from kernels import Problem

INSTALL_HINT = "pip install -e '.[compilers]'"
WORKER_ENV = {
    "JAX_PLATFORMS": "cpu",  # deviceless: the compile-only devices come from the topology, not a backend
    "JAX_SKIP_CUDA_CONSTRAINTS_CHECK": "1",  # no CUDA runtime or driver is needed to compile
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",  # several compile processes at once
    "TF_CPP_MIN_LOG_LEVEL": "0",
    "TF_CPP_VMODULE": "subprocess_compilation=2",  # XLA logs ptxas's register and spill report
    "PYTHONUNBUFFERED": "1",
    # a persistent-cache hit skips the compiler, and with it the dumps and logs the figures and predictions read
    "JAX_ENABLE_COMPILATION_CACHE": "false",
}


@dataclass(frozen=True)
class CompileJob:
    """Compile `config` (a kernel Config's dict) for `problem` on `target`; backward problems compile jax.grad."""

    target: str
    problem: Problem
    config: dict[str, int]
    x64: bool = False
    implementation: str = "pallas"  # "xla": jax.nn's XLA attention for the problem (config {}), to predict beside ours

    def __post_init__(self) -> None:
        get_target(self.target)
        if self.implementation not in ("pallas", "xla"):
            raise ValueError(f"implementation must be 'pallas' or 'xla', got {self.implementation!r}")
        if not isinstance(self.problem, Problem):
            raise TypeError(f"problem must be a kernels.Problem, got {type(self.problem).__name__}")
        if not isinstance(self.config, dict):
            raise TypeError(f"config must be a dict of a kernel Config's fields, got {type(self.config).__name__}")


@dataclass(frozen=True)
class CompileResult:
    """What the compiler said: ok with per-kernel figures, or a failure kind with its message."""

    job: CompileJob
    ok: bool
    seconds: float
    kernels: tuple[KernelFigures, ...] = ()
    failure_kind: str | None = None  # db.figures.FAILURE_KINDS: resource_exhausted, lowering_error, timeout, other
    message: str = ""
    requested_bytes: int | None = None
    limit_bytes: int | None = None
    trace: str = field(default="", repr=False)
    prediction: dict[str, Any] | None = None  # the static model's Prediction.to_dict(): a predicted, not measured, time
    prediction_seconds: float | None = None  # what predicting took in the worker, after the compile (`seconds`)
    prediction_error: str = ""  # why the model made no prediction (it never fails a compile)

    def kernel(self, role: str) -> KernelFigures | None:
        """The figures of the forward, dq or dkv kernel (None if the compile has no such kernel)."""
        return next((k for k in self.kernels if k.role == role), None)

    @property
    def spills(self) -> bool:
        return any(k.spills for k in self.kernels)


def compilers_missing(platform: str) -> str | None:
    """Why deviceless compiles for `platform` ('gpu' or 'tpu') cannot run here, or None when they can."""
    if platform == "tpu":
        if importlib.util.find_spec("libtpu") is None:
            return f"libtpu is not installed ({INSTALL_HINT})"
        return None
    if platform != "gpu":
        raise ValueError(f"platform must be 'gpu' or 'tpu', got {platform!r}")
    if tuple(int(p) for p in jax.__version__.split(".")[:2]) >= (0, 11):
        return (f"deviceless GPU compiles are set up for jax 0.10.x (jax {jax.__version__} lowers Triton through "
                f"the plugin at lowering time); compile on a real GPU instead")
    if importlib.util.find_spec("jax_plugins") is None or importlib.util.find_spec("jax_cuda12_plugin") is None:
        return f"the CUDA 12 plugin for jax is not installed ({INSTALL_HINT})"
    has_nvcc_wheel = importlib.util.find_spec("nvidia") is not None and \
        importlib.util.find_spec("nvidia.cuda_nvcc") is not None
    if not has_nvcc_wheel and shutil.which("ptxas") is None and not os.environ.get("CUDA_ROOT"):
        return f"ptxas and libdevice were not found (no nvidia-cuda-nvcc-cu12, no ptxas on PATH; {INSTALL_HINT})"
    return None


def _job_line(job: CompileJob, ident: int) -> str:
    return json.dumps({"id": ident, "target": job.target, "problem": job.problem.to_dict(), "config": job.config,
                       "x64": job.x64, "implementation": job.implementation})


def _result(job: CompileJob, data: dict[str, Any]) -> CompileResult:
    if data.get("ok"):
        return CompileResult(job=job, ok=True, seconds=float(data["seconds"]),
                             kernels=tuple(KernelFigures(**k) for k in data.get("kernels", [])),
                             prediction=data.get("prediction"), prediction_seconds=data.get("prediction_seconds"),
                             prediction_error=data.get("prediction_error") or "")
    return CompileResult(job=job, ok=False, seconds=float(data.get("seconds", 0.0)), failure_kind=data["kind"],
                         message=data.get("message", ""), requested_bytes=data.get("requested_bytes"),
                         limit_bytes=data.get("limit_bytes"), trace=data.get("trace", ""))


class _Worker:
    """One compile process and a thread that turns its stdout into a queue of parsed lines."""

    def __init__(self, nice: int) -> None:
        env = {**os.environ, **WORKER_ENV}
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        self.log = tempfile.TemporaryFile()
        command = [sys.executable, "-m", "autotune.compile.worker"]
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, env=env, text=True, bufsize=1,
            preexec_fn=(lambda: os.nice(nice)) if nice else None, start_new_session=True,
        )
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            try:
                self.lines.put(json.loads(line))
            except json.JSONDecodeError:
                continue
        self.lines.put(None)  # end of output: the process is gone

    def tail(self) -> str:
        self.log.seek(0)
        return self.log.read()[-1500:].decode(errors="replace")

    def close(self, kill: bool = False) -> None:
        if self.process.poll() is None:
            if kill:  # the whole group: ptxas children too
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
            else:
                self.process.stdin.close()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def _serve(jobs: list[CompileJob], todo: queue.Queue, results: dict[int, CompileResult], timeout_s: float,
           nice: int, on_result: Callable[[CompileResult], None] | None, errors: list[Exception]) -> None:
    """Feed jobs to one worker process at a time; a hang or a crash costs that job only (a new process follows)."""
    worker: _Worker | None = None
    try:
        while True:
            try:
                ident = todo.get_nowait()
            except queue.Empty:
                return
            job = jobs[ident]
            worker = worker or _Worker(nice)
            start = time.monotonic()
            worker.process.stdin.write(_job_line(job, ident) + "\n")
            worker.process.stdin.flush()
            answer = None
            while answer is None:
                try:
                    line = worker.lines.get(timeout=max(1.0, start + timeout_s - time.monotonic()))
                except queue.Empty:
                    results[ident] = CompileResult(job, False, time.monotonic() - start, failure_kind="timeout",
                                                   message=f"no answer within {timeout_s:.0f} s")
                    worker.close(kill=True)
                    worker = None
                    break
                if line is None:
                    results[ident] = CompileResult(
                        job, False, time.monotonic() - start, failure_kind="other",
                        message=f"compile process died (exit {worker.process.wait()}): {worker.tail()}")
                    worker.close()
                    worker = None
                    break
                if line.get("id") == ident and "ok" in line:
                    answer = line
            if answer is not None:
                results[ident] = _result(job, answer)
            if on_result is not None:
                try:
                    on_result(results[ident])
                except Exception as exc:  # noqa: BLE001 - a failing callback must not stop the compiles
                    errors.append(exc)
    finally:
        if worker is not None:
            worker.close()


def compile_many(jobs: Iterable[CompileJob], *, processes: int = 2, timeout_s: float = 300.0, nice: int = 0,
                 on_result: Callable[[CompileResult], None] | None = None) -> list[CompileResult]:
    """Compile every job (in `processes` worker processes); results in the jobs' order, one per job, never raising
    for a compile failure. `on_result` sees each result as it comes (from the serving threads, one at a time per
    thread: make it thread-safe); `nice` lowers the compile processes' priority."""
    jobs = list(jobs)
    if processes < 1:
        raise ValueError(f"processes must be at least 1, got {processes}")
    for platform in sorted({get_target(j.target).platform for j in jobs}):
        reason = compilers_missing(platform)
        if reason:
            raise RuntimeError(f"cannot compile for {platform}: {reason}")
    todo: queue.Queue = queue.Queue()
    for ident in range(len(jobs)):
        todo.put(ident)
    results: dict[int, CompileResult] = {}
    errors: list[Exception] = []
    threads = [threading.Thread(target=_serve, args=(jobs, todo, results, timeout_s, nice, on_result, errors),
                                daemon=True)
               for _ in range(min(processes, max(1, len(jobs))))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return [results[i] for i in range(len(jobs))]


def compile_config(target: str | Target, problem: Problem, config: Any, *, x64: bool = False,
                   timeout_s: float = 300.0) -> CompileResult:
    """Compile one config (a kernel Config or its dict) for a target; see `compile_many`."""
    name = target.name if isinstance(target, Target) else target
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return compile_many([CompileJob(name, problem, data, x64)], processes=1, timeout_s=timeout_s)[0]


def estimated_bytes(target: str | Target, problem: Problem, config: dict[str, int]) -> dict[str, int]:
    """What the validity models expect each kernel (forward; dq and dkv for backward problems) to need, in the
    units the compiler reports (shared memory per block, or VMEM)."""
    target = get_target(target) if isinstance(target, str) else target
    kernel = load_target_kernel(target.platform)
    return dict(kernel.memory_estimate(kernel.Config.from_dict(config), problem, device_kind=target.device_kind))

