"""`autotune search --target NAME|all|a,b|list`: the compile-only search for hardware this machine does not have.

Everything is checked before anything is written: the target names (an unknown one lists the known ones), the
target's platform against --kernel, the compilers this machine has (a missing one names the install that brings it),
and the problems. Then one run row, a progress bar over every compile, and a summary per target and problem. The
work itself is `autotune.compile.search`.
"""
from __future__ import annotations

import contextlib
import os
import sys
import uuid
from collections import Counter

import click

from autotune.cli.common import (database_errors, describe_problem, given_flag_texts, open_store, plural,
                                      print_table, specs_from_flags, where, worker_settings)
from autotune.cli.compile_next import estimate_line, next_steps, nothing_left_line
from autotune.compile.pool import INSTALL_HINT, compilers_missing
from autotune.compile.targets import TARGETS

COMPILE_PROCESSES = max(1, min(8, os.cpu_count() or 1))


def _beat(store, run_id: int) -> None:
    with contextlib.suppress(Exception):  # a missed beat only risks the run being called crashed later
        store.heartbeat_run(run_id)


def print_targets() -> None:
    """`--target list`: the names, device kinds and whether this machine can compile for each."""
    missing = {platform: compilers_missing(platform) for platform in ("gpu", "tpu")}
    rows = [[t.name, t.platform, t.device_kind, "yes" if missing[t.platform] is None else f"no ({INSTALL_HINT})"]
            for t in TARGETS.values()]
    print_table(["target", "platform", "device kind", "compiler here"], rows)


def run_target_command(*, target_text: str, kernel: str | None, shapes: str | None, flags: dict, tune_misses: bool,
                       allow_spills: bool, trials: int | None, sampler: str, seed: int | None,
                       trial_timeout: float, quiet: bool, db: str | None) -> None:
    from autotune.cli.predicted_listing import print_ranking
    from autotune.compile.xla_prediction import stored_xla_prediction
    from autotune.compile.ranking import rank_trials
    from autotune.compile.search import first_round, plan_searches, resolve_targets

    if target_text.strip() == "list":
        print_targets()
        return
    if tune_misses:
        raise click.UsageError("--misses tunes on the device; it cannot be combined with --target")
    if allow_spills:
        raise click.UsageError("--allow-spills is for the device search; a compile-only search records spills")
    try:
        targets = resolve_targets(target_text, kernel)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--target") from None
    specs = specs_from_flags(flags, shapes)  # bad problems stop here, before any write
    from autotune.device import current_device

    from autotune.compile.claims import ConfigClaims, claim_plans

    config = worker_settings()
    device = current_device()
    store = open_store(db)
    owner = f"{device.host}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
    try:
        with database_errors(store):
            plans = plan_searches(specs, targets, store, trials=trials, grid_all=sampler == "grid", seed=seed,
                                  jax_version=device.jax_version, steer=sampler == "tpe")
            # tpe (the default): half of a large budget at random, then the configs their predictions steer to
            first = first_round(plans) if sampler == "tpe" else plans
            steer = any(len(a.configs) < len(b.configs) for a, b in zip(first, plans))
            planned = sum(len(p.configs) for p in plans)
            # Concurrent runs on one database share each key's budget and configs (autotune/compile/claims.py).
            with ConfigClaims(store, owner, ttl_s=config.claim_ttl_s, beat_s=config.claim_beat_s) as claims:
                claimed = claim_plans(first, claims)
                empty = not steer and not any(p.configs for p in claimed)  # nothing left to compile: say why
                click.echo(nothing_left_line(claimed) if empty else estimate_line(plans, store, COMPILE_PROCESSES),
                           err=True)
                rounds = [lambda: claimed]
                if steer:
                    rounds.append(lambda: claim_plans(plan_searches(
                        specs, targets, store, trials=trials, grid_all=False, seed=seed,
                        jax_version=device.jax_version, steer=True), claims))
                summaries = _compile(rounds, planned, store, device, target_text, trials, seed, trial_timeout,
                                     quiet or empty, claims, config.claim_beat_s)
            rankings = [(s.plan.target.name, rank_trials(s.plan.key, store.trials(s.plan.key)),
                         stored_xla_prediction(store, s.plan.key)) for s in summaries]
    finally:
        store.close()
    if not empty:
        print_compile_summary(summaries)
    for target_name, ranking, xla in rankings:
        if ranking is not None:
            print_ranking(ranking, target_name, xla=xla)
    click.echo()
    for line in next_steps(plans, db=db, shapes=shapes, given_flags=given_flag_texts(flags)):
        click.echo(line)


def _compile(rounds, planned, store, device, target_text, trials, seed, trial_timeout, quiet, claims, beat_s):
    """Compile round after round (each a callable that plans and claims its configs: a steered search's second
    round is planned from the first one's predictions) under one run row; the summaries of all rounds."""
    from tqdm import tqdm

    from autotune.compile.search import merge_summaries, run_plans
    from autotune.heartbeat import Heartbeat

    plans = rounds[0]()
    total = sum(len(p.configs) for p in plans) if len(rounds) == 1 else planned
    names = ", ".join(dict.fromkeys(p.target.name for p in plans))
    problems = plural(len({p.spec for p in plans}), 'problem')
    if total:
        click.echo(f"Compiling {'up to ' if len(rounds) > 1 else ''}{plural(total, 'config')} for {names} "
                   f"({problems}; compile-only: nothing is timed), results in {where(store)}", err=True)
    run_id = store.start_run(host=device.host, device_kind=", ".join(dict.fromkeys(p.target.device_kind
                                                                               for p in plans)),
                             platform="compile-only", jax_version=device.jax_version,
                             arguments={k: v for k, v in dict(target=target_text, trials=trials, seed=seed).items()
                                        if v is not None})
    run_beat = Heartbeat(beat_s, lambda: _beat(store, run_id), name="run heartbeat").start()
    counts: Counter = Counter()
    bar = tqdm(total=total, desc="compile-only", unit="config", disable=quiet, dynamic_ncols=True)

    def on_result(summary, result) -> None:
        counts["compiled" if result.ok else result.failure_kind] += 1
        counts["spilled"] += result.ok and result.spills
        bar.update(1)
        bar.set_postfix_str(", ".join(f"{name} {n}" for name, n in counts.items() if n), refresh=False)

    status = "failed"
    try:
        summaries = run_plans(plans, store, run_id=run_id, processes=COMPILE_PROCESSES, timeout_s=trial_timeout,
                              on_result=on_result, claims=claims)
        for next_round in rounds[1:]:
            plans = next_round()
            summaries = merge_summaries(summaries, run_plans(
                plans, store, run_id=run_id, processes=COMPILE_PROCESSES, timeout_s=trial_timeout,
                on_result=on_result, claims=claims))
        bar.total = bar.n  # what was compiled (fewer than planned where other processes took configs)
        status = "ok"
    except KeyboardInterrupt:
        status = "interrupted"
        click.echo("\nInterrupted: every finished compile is stored; run the same command to resume.", err=True)
        sys.exit(130)
    finally:
        run_beat.stop()
        bar.close()
        try:
            store.finish_run(run_id, status)
        except Exception:  # noqa: BLE001 - the run's end is a nicety; the trials are stored
            pass
    return summaries


def print_compile_summary(summaries) -> None:
    """One row per target and problem: what compiled, spilled and failed (by class), and what was left out."""
    rows = []
    for s in summaries:
        p = s.plan
        failed = ", ".join(f"{kind} {n}" for kind, n in sorted(s.failed.items())) or "-"
        rows.append([p.target.name, describe_problem(p.spec.problem), f"{p.grid - p.valid}/{p.grid}",
                     str(len(p.configs)), str(s.compiled), str(s.spilled), failed, str(p.recorded),
                     f"{s.compile_s:.1f}"])
    click.echo()
    print_table(["target", "problem", "invalid/space", "compiled now", "ok", "spilled", "failed",
                 "recorded before", "compile s"], rows)
    compiled = sum(s.compiled for s in summaries)
    failed = sum(sum(s.failed.values()) for s in summaries)
    spilled = sum(s.spilled for s in summaries)
    predicted = sum(s.predicted for s in summaries)
    click.echo(f"\n{plural(compiled + failed, 'compile')}: {compiled} compiled ({spilled} spilling registers, "
               f"{predicted} with a predicted time), {failed} failed. Nothing was timed: the configs are ranked by "
               f"predicted time below; a device search for the same device kind starts from the predicted best and "
               f"skips the rejected and spilling configs (see `autotune show --target NAME ...`).")
    compile_s = sum(s.compile_s for s in summaries)
    predict_s = sum(s.predict_s for s in summaries)
    if predicted and compile_s:
        click.echo(f"Predicting took {predict_s:.2f} s on top of {compile_s:.1f} s of compiling "
                   f"({predict_s / compile_s:.1%}).")
