"""Running `autotune search` workers as real OS processes for the multi-worker and fault tests.

Each worker is `python -m autotune search ... --kernel tests.toy_kernel` in its own process, so workers share
nothing but the database, as on a cluster. Their heartbeat and claim timings are shortened through the environment
(autotune/workers.py) so that a dead worker is noticed in seconds, and XLA is kept to one thread per process so that
four workers do not thrash a small machine.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import optuna

REPO = Path(__file__).resolve().parents[1]
TOY = "tests.toy_kernel"
# A 64-config space (blocks 16/32 x warps x stages) that a few trials cannot exhaust.
WIDE_SPACE = json.dumps({"num_warps": [1, 2, 4, 8], "num_stages": [1, 2, 3, 4]})
FAST_TIMINGS = {"AUTOTUNE_HEARTBEAT_INTERVAL": "1", "AUTOTUNE_HEARTBEAT_GRACE": "3", "AUTOTUNE_CLAIM_TTL": "4"}
# For tests where no worker dies: on a loaded machine a live worker's heartbeat can come seconds late, which must
# not make it look dead (its trial failed, its claim taken over) and change what the test checks.
PATIENT_TIMINGS = {"AUTOTUNE_HEARTBEAT_GRACE": "300", "AUTOTUNE_CLAIM_TTL": "300"}
COMPILE_CACHE = Path(tempfile.gettempdir()) / f"autotune-test-jax-cache-{os.getuid()}"
COUNTED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)


def problem_args(seq_len: int = 32) -> list[str]:
    return ["--batch", "1", "--seq-len", str(seq_len), "--heads", "1", "--head-dim", "16"]


def worker_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTOTUNE_TOY_", "AUTOTUNE_HEARTBEAT",
                                                                    "AUTOTUNE_CLAIM", "AUTOTUNE_DB"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    env["PYTHONUNBUFFERED"] = "1"
    env["JAX_COMPILATION_CACHE_DIR"] = str(COMPILE_CACHE)  # every worker of the session compiles the same programs
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env.update(FAST_TIMINGS)
    env.update(extra)
    return env


@dataclass
class Worker:
    """A running worker; its output goes to a file (a pipe could fill up and block it)."""

    process: subprocess.Popen
    output: Path

    def wait(self, timeout: float = 240) -> int:
        """The exit code; a worker still running after `timeout` seconds is killed (so no test leaves one behind)
        and reported with its output."""
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"worker still running after {timeout} s; its output:\n{self.text}") from None

    @property
    def text(self) -> str:
        return self.output.read_text(errors="replace")


def start_worker(db: str, args: list[str], *, out: Path, env: dict[str, str] | None = None,
                 kernel: str = TOY) -> Worker:
    command = [sys.executable, "-m", "autotune", "search", *args, "--kernel", kernel, "--quiet", "--no-xla",
               "--samples", "3", "--db", db]
    with open(out, "w") as handle:
        process = subprocess.Popen(command, cwd=REPO, env=env or worker_env(), stdout=handle,
                                   stderr=subprocess.STDOUT)
    worker = Worker(process, out)
    _started.append(worker)
    return worker


_started: list[Worker] = []


def stop_workers() -> None:
    """Kill the workers a test started and left running (it failed half-way): none outlives its test."""
    while _started:
        worker = _started.pop()
        if worker.process.poll() is None:
            worker.process.kill()
            worker.process.wait()


def run_worker(db: str, args: list[str], *, out: Path, env: dict[str, str] | None = None,
               timeout: float = 240) -> Worker:
    worker = start_worker(db, args, out=out, env=env)
    worker.wait(timeout)
    return worker


def wait_for(condition, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def counted_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The trials that count toward the budget, as the search defines them (see autotune.search.loop)."""
    return [t for t in study.get_trials(deepcopy=False, states=COUNTED)
            if "kind" not in t.user_attrs and "config" in t.user_attrs]


def check_recorded_once(store, key, url: str, budget: int) -> tuple[optuna.Study, list]:
    """Every counted Optuna trial appears exactly once in our table, with the same outcome; the budget is met
    exactly, by distinct configs; nothing is left running. Returns the study and our rows of evaluated trials."""
    study = optuna.load_study(study_name=key.digest(), storage=url)
    left = [t.number for t in study.get_trials(deepcopy=False) if t.state in (optuna.trial.TrialState.RUNNING,
                                                                              optuna.trial.TrialState.WAITING)]
    assert not left, f"trials left running or waiting: {left}"
    counted = counted_trials(study)
    assert len(counted) == budget, [(t.number, t.state, t.user_attrs) for t in study.trials]
    configs = [json.dumps(t.user_attrs["config"], sort_keys=True) for t in counted]
    assert len(set(configs)) == len(configs), f"a config was evaluated twice: {configs}"  # issue 24 item 9
    rows = [r for r in store.trials(key) if r.status != "invalid"]
    numbers = Counter(r.number for r in rows)
    assert numbers == Counter(t.number for t in counted), (numbers, [t.number for t in counted])
    by_number = {r.number: r for r in rows}
    for trial in counted:
        row = by_number[trial.number]
        assert row.config == trial.user_attrs["config"]
        if trial.state == optuna.trial.TrialState.COMPLETE:
            assert row.status == "ok" and row.time_s == trial.value
        else:
            assert row.status != "ok"
    return study, rows


def check_best(store, key, rows: list, budget: int, default: dict, top: int = 3) -> None:
    """What the search guarantees about the stored best: it is the config of an ok trial; and since every worker
    whose asks ran into the budget waits for the study's last trials, each worker's final re-timing saw all trials,
    so the winner is one of the `top` fastest configs by trial time, or the default (always re-timed too)."""
    best = store.get_best(key)
    assert best is not None
    ok = sorted((r for r in rows if r.status == "ok"), key=lambda r: r.time_s)
    assert best.config in [r.config for r in ok]
    fastest: list[dict] = []
    for row in ok:
        if row.config not in fastest:
            fastest.append(row.config)
    assert best.config in fastest[:top] + [default], (best.config, fastest)
    assert best.trials == budget
    assert best.time_s > 0
