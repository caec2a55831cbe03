"""Trials per minute against the number of workers sharing one study, on SQLite and on PostgreSQL; and the
search's own overhead per trial.

For each backend and each worker count, a fresh database gets N `autotune search` processes (real OS processes, as
on a cluster) on one small problem in interpret mode, together running `--trials` trials of one study. Reported:

* trials per minute over the search phase (first trial started to last trial finished, from Optuna's timestamps),
  and end to end (the processes' whole lives, with JAX start-up and each worker's final re-timing);
* the search's own overhead per trial, from the costs every trial records (autotune/search.py, the "outcome" user
  attr): the main thread's time for the trial minus the time it waited for the compile and the time it spent
  checking and timing the candidate, i.e. asking the sampler, admitting the config, heartbeats and the database
  writes. Its share of the trial's wall time, compile + measurement + overhead, is the figure the goal (< 10%) is
  about; the share of the main thread's time ("slot") is given too, an upper bound since part of the overhead runs
  while the next candidate compiles in the background.

Each worker's XLA runs on one thread, as each worker would own one accelerator; on a machine with fewer cores than
workers the workers compete for the CPU, which shows in the scaling.

    python benchmarks/workers.py --out benchmarks/results/workers-cpu
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import date
from pathlib import Path

import jax
import optuna
import sqlalchemy

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from autotune.device import current_device  # noqa: E402
from autotune.keys import make_key  # noqa: E402
from autotune.kernel_protocol import load_kernel  # noqa: E402
from db import Store  # noqa: E402
from db.urls import resolve_url  # noqa: E402
from kernels import Problem  # noqa: E402

PROBLEM = Problem(batch=1, q_len=64, kv_len=64, heads=2, kv_heads=1, head_dim=32, causal=True)
PROBLEM_ARGS = ["--batch", "1", "--seq-len", "64", "--heads", "2", "--kv-heads", "1", "--head-dim", "32", "--causal"]


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    return env


def run_workers(url: str, workers: int, trials: int, kernel: str, logs: Path) -> float:
    """Start `workers` searches on one study and wait for all; returns the wall seconds."""
    started = time.perf_counter()
    processes = []
    for index in range(workers):
        out = open(logs / f"worker{index}.log", "w")
        command = [sys.executable, "-m", "autotune", "search", *PROBLEM_ARGS, "--kernel", kernel, "--trials",
                   str(trials), "--seed", str(index), "--no-xla", "--quiet", "--db", url]
        processes.append((subprocess.Popen(command, cwd=REPO, env=worker_env(), stdout=out,
                                           stderr=subprocess.STDOUT), out))
    for process, out in processes:
        code = process.wait()
        out.close()
        if code != 0:
            raise RuntimeError(f"a worker failed ({code}):\n{Path(out.name).read_text()[-3000:]}")
    return time.perf_counter() - started


def analyse(url: str, kernel: str, trials: int) -> dict:
    """The study's counted trials: throughput, per-trial costs, and a check that each is recorded once."""
    key = make_key(load_kernel(kernel), PROBLEM, current_device())
    study = optuna.load_study(study_name=key.digest(), storage=url)
    counted = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,
                                                                   optuna.trial.TrialState.FAIL))
               if "kind" not in t.user_attrs and "config" in t.user_attrs]
    store = Store(url)
    numbers = sorted(r.number for r in store.trials(key) if r.status != "invalid")
    store.close()
    recorded_once = numbers == sorted(t.number for t in counted) and len(counted) == trials
    span = (max(t.datetime_complete for t in counted) - min(t.datetime_start for t in counted)).total_seconds()
    rows = []
    for t in counted:
        outcome = t.user_attrs.get("outcome")
        if not outcome or outcome.get("compile_s") is None:
            continue
        costs = outcome["costs"]
        overhead = max(0.0, costs["slot_s"] - costs["compile_wait_s"] - costs["measure_s"])
        wall = outcome["compile_s"] + costs["measure_s"] + overhead
        rows.append(dict(compile_s=outcome["compile_s"], measure_s=costs["measure_s"], overhead_s=overhead,
                         slot_s=costs["slot_s"], share=overhead / wall, slot_share=overhead / costs["slot_s"]))

    def total(name: str) -> float:
        return sum(r[name] for r in rows)

    return dict(
        counted=len(counted), recorded_once=recorded_once, failed=sum(t.state.name == "FAIL" for t in counted),
        search_span_s=span, trials_per_min_search=len(counted) / span * 60,
        mean_compile_s=total("compile_s") / len(rows), mean_measure_s=total("measure_s") / len(rows),
        mean_overhead_s=total("overhead_s") / len(rows),
        median_overhead_s=statistics.median(r["overhead_s"] for r in rows),
        overhead_share=total("overhead_s") / (total("compile_s") + total("measure_s") + total("overhead_s")),
        median_overhead_share=statistics.median(r["share"] for r in rows),
        slot_overhead_share=total("overhead_s") / total("slot_s"),
    )


def fresh_postgres_database(admin_url: str) -> str:
    name = f"bench_{uuid.uuid4().hex[:10]}"
    engine = sqlalchemy.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return sqlalchemy.engine.make_url(admin_url).set(database=name).render_as_string(hide_password=False)


def postgres_version(url: str) -> str:
    engine = sqlalchemy.create_engine(url)
    with engine.connect() as connection:
        version = connection.execute(sqlalchemy.text("SHOW server_version")).scalar_one()
    engine.dispose()
    return version


def describe(p: Problem) -> str:
    text = f"b{p.batch} q{p.q_len} kv{p.kv_len} h{p.heads}/{p.kv_heads} d{p.head_dim} {p.dtype}"
    return text + " causal" * p.causal


def note(report: dict) -> str:
    runs = report["runs"]
    text = ("Overhead share: over all trials of a run, the sum of overhead over the sum of compile + measurement + "
            "overhead. Speed-up: search-phase trials per minute against one worker on the same backend.")
    if report["cores"] >= 2 * max(run["workers"] for run in runs):
        return text
    speedups = [run["speedup"] for run in runs if run["workers"] > 1]
    share = max(run["overhead_share"] for run in runs)
    return text + (
        f" This machine has {report['cores']} cores and was shared with other jobs (load average in the last "
        "column). One worker already keeps two cores busy (its background threads compile the next candidates "
        "while the main thread checks and times one), so here more workers cannot add throughput: with more "
        f"workers the search runs {min(speedups):.2f}x to {max(speedups):.2f}x the trials per minute of one, each "
        "compile taking longer as the workers share the cores. The overhead per trial grows with the workers for "
        f"the same reason, and with contention in the database, while its share stays at most {share:.1%}. What "
        "the runs do show is that the workers share one budget exactly and record every trial once, on both "
        "backends. On a node with one accelerator (and a few cores) per worker, trials per minute should grow with "
        "the workers until the database or the sampler becomes the bottleneck; that is not measured here."
    )


def markdown(report: dict) -> str:
    lines = [
        f"# Many workers on one study: {report['device']}",
        "",
        f"{report['date']}; jax {report['jax']}, optuna {report['optuna']}, SQLAlchemy {report['sqlalchemy']}, "
        f"SQLite {report['sqlite']}, PostgreSQL {report['postgresql'] or '-'}; {report['cores']} CPU cores; "
        f"kernel `{report['kernel']}` in interpret mode on {report['problem']}, {report['trials']} trials per "
        "study; each worker's XLA on one thread (as one worker per accelerator).",
        "",
        "Trials per minute: over the search phase (first trial started to last finished) and end to end (the "
        "worker processes' whole lives, with JAX start-up and each worker's final re-timing). Overhead: the "
        "search's own work per trial (sampler, admission, heartbeats, database writes), as a share of the trial's "
        "compile + measurement + overhead (goal < 10%), and of the main thread's time per trial (an upper bound: "
        "part of it overlaps the next candidate's compile).",
        "",
        "| backend | workers | trials/min (search) | trials/min (end to end) | speed-up | compile s/trial | "
        "measure s/trial | overhead ms/trial (median) | overhead share | overhead share of main thread | "
        "each trial recorded once | load average before |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in report["runs"]:
        lines.append(
            f"| {run['backend']} | {run['workers']} | {run['trials_per_min_search']:.1f} | "
            f"{run['trials_per_min_end_to_end']:.1f} | {run['speedup']:.2f}x | {run['mean_compile_s']:.2f} | "
            f"{run['mean_measure_s']:.3f} | "
            f"{run['mean_overhead_s'] * 1e3:.0f} ({run['median_overhead_s'] * 1e3:.0f}) | "
            f"{run['overhead_share']:.1%} | {run['slot_overhead_share']:.1%} | "
            f"{'yes' if run['recorded_once'] else 'NO'} | {run['load_before']:.1f} |")
    lines += ["", note(report), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="1,2,4", help="Worker counts to run (comma-separated).")
    parser.add_argument("--trials", type=int, default=24, help="Trials per study (the total over its workers).")
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--kernel", default="gpu")
    parser.add_argument("--pg-url", default=os.environ.get("AUTOTUNE_TEST_PG_URL"),
                        help="A PostgreSQL server to create databases on (default: a throwaway local server).")
    parser.add_argument("--out", default=None, help="Write OUT.json and OUT.md.")
    parser.add_argument("--render", default=None, help="Only write the markdown of an earlier run's JSON.")
    args = parser.parse_args()
    if args.render:
        report = json.loads(Path(args.render).read_text())
        Path(args.render).with_suffix(".md").write_text(markdown(report))
        print(markdown(report))
        return
    counts = [int(n) for n in args.workers.split(",")]
    backends = args.backends.split(",")
    server = None
    if "postgresql" in backends and not args.pg_url:
        from tests.pg_server import start_postgres

        server = start_postgres()
        args.pg_url = server.url
    runs = []
    try:
        for backend in backends:
            base = None
            for workers in counts:
                with tempfile.TemporaryDirectory() as tmp:
                    url = (resolve_url(str(Path(tmp) / "bench.db")) if backend == "sqlite"
                           else fresh_postgres_database(args.pg_url))
                    load = os.getloadavg()[0]
                    wall = run_workers(url, workers, args.trials, args.kernel, Path(tmp))
                    result = dict(backend=backend, workers=workers, wall_s=wall, load_before=load,
                                  trials_per_min_end_to_end=args.trials / wall * 60, **analyse(url, args.kernel,
                                                                                                args.trials))
                base = base or result["trials_per_min_search"]
                result["speedup"] = result["trials_per_min_search"] / base
                runs.append(result)
                print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}),
                      flush=True)
        report = dict(
            device=f"CPU interpret mode ({cpu_name()})", cores=os.cpu_count(), platform=current_device().platform,
            jax=jax.__version__, optuna=optuna.__version__, sqlalchemy=sqlalchemy.__version__,
            sqlite=sqlite3.sqlite_version, postgresql=postgres_version(args.pg_url) if args.pg_url else None,
            date=date.today().isoformat(), kernel=args.kernel, problem=describe(PROBLEM), trials=args.trials,
            runs=runs,
        )
    finally:
        if server is not None:
            server.stop()
    if args.out:
        Path(args.out).with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        Path(args.out).with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
