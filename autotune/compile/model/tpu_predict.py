"""From a compile's libtpu dump to a Prediction: the entry point the compile worker calls, the block arithmetic of
attention kernels (which grid steps do MXU work), and the per-job collection of dump files.

libtpu reads its dump folder once, when it loads, so one process writes every compile into the same folder;
`DumpCollector` moves the files each compile adds into that job's own folder.
"""
from __future__ import annotations

import glob
import os
import shutil

import numpy as np

from autotune.compile.model.hardware import tpu_hardware
from autotune.compile.model.prediction import Prediction
from autotune.compile.model.tpu_bundles import parse_dump
from autotune.compile.model.tpu_model import KernelWork, predict_programs


class DumpCollector:
    """Hands each compile the dump files it added to the process-wide folder libtpu writes to."""

    def __init__(self, root: str) -> None:
        self.root = root
        self._seen: set[str] = set(os.listdir(root)) if os.path.isdir(root) else set()

    def collect(self, dest: str) -> int:
        """Move the files added since the last call into `dest`; how many moved."""
        os.makedirs(dest, exist_ok=True)
        now = set(os.listdir(self.root)) if os.path.isdir(self.root) else set()
        new = sorted(now - self._seen)
        for name in new:
            shutil.move(os.path.join(self.root, name), os.path.join(dest, name))
        self._seen = now - set(new)
        return len(new)


def tile_fraction(q_len: int, kv_len: int, block_q: int, block_kv: int, *, causal: bool,
                  window: tuple[int | None, int | None] | None = None, kv_steps: int | None = None) -> float:
    """Of the grid's (q block, kv step) tiles, the fraction that holds a visible pair (and so runs its MXU work).

    `kv_steps` is the reduction axis' length in the grid (default: every kv block); a kernel that narrows its grid
    to the band (ours) passes its narrower figure, so the fraction is of the steps it really has.
    """
    left, right = window if window is not None else (None, None)
    if causal:
        right = 0 if right is None else min(right, 0)
    n_q, n_kv = -(-q_len // block_q), -(-kv_len // block_kv)
    q0 = np.arange(n_q)[:, None] * block_q
    k0 = np.arange(n_kv)[None, :] * block_kv
    q1 = np.minimum(q0 + block_q, q_len) - 1
    k1 = np.minimum(k0 + block_kv, kv_len) - 1
    visible = np.ones((n_q, n_kv), bool)
    if right is not None:
        visible &= k0 <= q1 + right
    if left is not None:
        visible &= k1 >= q0 - left
    steps = n_kv if kv_steps is None else kv_steps
    return float(visible.sum()) / float(n_q * steps)


def attention_work(problem, config: dict, platform_cores: int) -> KernelWork:
    """KernelWork of our TPU kernel (kernels/tpu) for `problem` (kernels.Problem) and a Config dict."""
    window = problem.window
    bq = config["bwd_block_q"] if problem.backward else config["block_q"]
    bk = config["bwd_block_k_major"] if problem.backward else config["block_k_major"]
    left, right = window if window is not None else (None, None)
    if problem.causal:
        right = 0 if right is None else min(right, 0)
    n_kv = -(-problem.kv_len // bk)
    # our grid narrows the kv axis to the band: the most kv blocks one q block's rows can see
    rows = np.arange(-(-problem.q_len // bq)) * bq
    first = np.zeros_like(rows) if left is None else np.minimum(np.maximum(rows - left, 0) // bk, n_kv - 1)
    last = np.full_like(rows, n_kv - 1) if right is None else np.minimum((rows + bq - 1 + right) // bk, n_kv - 1)
    steps = max(1, int(np.max(last - first + 1)))
    fraction = tile_fraction(problem.q_len, problem.kv_len, bq, bk, causal=problem.causal, window=window,
                             kv_steps=steps)
    flops, nbytes = problem_work(problem)
    return KernelWork(flops=flops, hbm_bytes=nbytes, compute_fraction=min(1.0, fraction),
                      splits_over_cores=platform_cores > 1)


def problem_work(problem) -> tuple[float, float]:
    """The problem's useful flops (visible query/key pairs only) and compulsory HBM bytes: its roofline's terms,
    the same for every implementation of it."""
    pairs = problem.band.pairs(problem.q_len, problem.kv_len)
    flops = 4.0 * problem.batch * problem.heads * problem.head_dim * pairs * (2.5 if problem.backward else 1.0)
    item = np.dtype(problem.dtype).itemsize if problem.dtype != "bfloat16" else 2
    q_bytes = problem.batch * problem.heads * problem.q_len * problem.head_dim * item
    kv_bytes = 2 * problem.batch * problem.kv_heads * problem.kv_len * problem.head_dim * item
    return flops, (2 * q_bytes + kv_bytes) * (2.5 if problem.backward else 1.0)


def predict_xla_compile(dump_dir: str, target_name: str, problem) -> Prediction | None:
    """The predicted time of jax.nn's XLA attention compiled for `problem` (every program is XLA's own, so no
    kernel grid is counted; the roofline is the problem's, as for our kernel's configs)."""
    flops, nbytes = problem_work(problem)
    return predict_dump(dump_dir, target_name, KernelWork(flops=flops, hbm_bytes=nbytes, compute_fraction=1.0,
                                                          splits_over_cores=False))


def predict_dump(dump_dir: str, target_name: str, work: KernelWork | None) -> Prediction | None:
    """Predict the compile whose dump is in `dump_dir` (None when the folder holds no final bundles)."""
    if not glob.glob(os.path.join(dump_dir, "*-final_bundles.txt")):
        return None
    return predict_programs(parse_dump(dump_dir), tpu_hardware(target_name), work)


def predict_tpu_compile(dump_dir: str, target_name: str, problem, config: dict) -> Prediction | None:
    """The predicted time of our TPU kernel's compile for `problem` and `config` (a kernels.tpu Config dict), from
    the libtpu dump its compile wrote into `dump_dir`; None without a dump."""
    hw = tpu_hardware(target_name)
    return predict_dump(dump_dir, target_name, attention_work(problem, config, hw.cores))
