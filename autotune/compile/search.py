"""`autotune search --target`: compile every candidate for hardware this machine does not have, and record it.

For each problem and target, the valid configs (by the kernel's checks for the target's device kind) are compiled by
the target's real compiler in parallel worker processes (`autotune.compile.pool`): forward, and with a backward
problem the gradient's kernels too. Every outcome becomes a trial under the target's compile-only key
(`autotune.compile.results`): `compiled` with the figures of each kernel (shared memory or VMEM bytes, registers,
spills, compile seconds) and the static model's predicted time (`autotune.compile.model`), or a failure with its
class. No time is measured: the configs are ranked by predicted time (`autotune.compile.ranking`), and the fastest
predicted one is the key's predicted best. Each trial also goes into the key's Optuna study (named by the key's
digest, as the device search's), with the same parameters: a compiled and predicted trial is COMPLETE with the
predicted seconds as its value (so a sampler's objective is the predicted time), user attrs `kind = compile_only`
and `value = predicted seconds (model ...)`; one the model could not predict is PRUNED; a failure is FAIL.
A second run of the same command resumes: configs already recorded for a key are not compiled again.

The predictions steer what is compiled (`autotune.compile.steering`): with the tpe sampler (the default), a key
with room for at least 2 * STEER_AFTER configs and too few predictions is compiled in two rounds, the first half
(the default and a seeded random sample), then the configs Optuna's TPE proposes given their predicted times; a key
that already holds enough predictions (an earlier run) is steered from the start. `--sampler random` keeps the
seeded random order, `--sampler grid` compiles every valid config.

No static filter skips configs before compiling: both models hold their predictions above a roofline of useful
FLOPs and minimum bytes, which is the same for every config of a problem, so no config's roofline can exceed
another's prediction; only a compile tells them apart.
"""
from __future__ import annotations

import dataclasses
import random
import threading
from collections import Counter
from dataclasses import dataclass, field

import optuna

from autotune import optuna_storage as adapter
from autotune.compile.ranking import PREDICTED, rank_trials
from autotune.compile.steering import STEER_AFTER, steered_order
from autotune.compile.results import COMPILED, compile_key, config_text, figures_of
from autotune.compile.pool import CompileJob, CompileResult, compile_many, compilers_missing
from autotune.kernel_protocol import BUILTIN, kernel_for_platform, load_kernel
from autotune.options import DEFAULT_TRIALS
from autotune.shapes import ProblemSpec
from autotune.space import Space
from autotune.compile.figures import RESOURCE_EXHAUSTED
from autotune.compile.targets import PLATFORMS, TARGETS, Target, get_target
from autotune.compile.xla_prediction import stored_xla_prediction, xla_key
from db import Store, TuningKey

KIND = "compile_only"


def resolve_targets(text: str, kernel: str | None) -> list[Target]:
    """The targets `--target` names ('all', one name, or a comma list), checked before anything is written:
    ValueError naming the known targets, a platform that does not match --kernel, or the install a missing
    compiler needs."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"--target must name a target (one of {', '.join(TARGETS)}), 'all' or 'list'")
    if kernel is not None and kernel not in BUILTIN:
        raise ValueError(f"--kernel with --target must be 'gpu' or 'tpu' (the compile workers build the built-in "
                         f"kernels), got {kernel!r}")
    names = [part.strip() for part in text.split(",")]
    targets: list[Target] = []
    for name in names:
        if name == "all":
            targets += [t for t in TARGETS.values() if kernel is None or t.platform == kernel]
            continue
        if name not in TARGETS:
            raise ValueError(f"unknown target {name!r}; known targets: {', '.join(TARGETS)} (or 'all')")
        target = get_target(name)
        if kernel is not None and target.platform != kernel:
            raise ValueError(f"target {name!r} is a {target.platform.upper()}, but --kernel {kernel} builds the "
                             f"{kernel.upper()} kernel; use --kernel {target.platform} or leave --kernel out")
        targets.append(target)
    unique = list(dict.fromkeys(targets))
    for platform in PLATFORMS:
        reason = compilers_missing(platform) if any(t.platform == platform for t in unique) else None
        if reason:
            named = ", ".join(t.name for t in unique if t.platform == platform)
            raise ValueError(f"cannot compile for {named} on this machine: {reason}")
    return unique


@dataclass(frozen=True)
class TargetPlan:
    """One problem on one target: its compile-only key and the configs to compile now."""

    target: Target
    spec: ProblemSpec
    key: TuningKey
    space: Space
    configs: tuple = ()  # kernel Configs to compile in this run (claim_plans: those this process claimed)
    grid: int = 0  # configs in the search space
    valid: int = 0  # of them, accepted by the kernel's checks for the target
    recorded: int = 0  # configs the key already had trials for (an earlier run): not compiled again
    limit: int = 0  # the key's total of configs (--trials, at most the valid ones): budget slots recorded..limit-1
    candidates: tuple = ()  # every config not recorded yet, in the planned order (what claim_plans claims from)
    steered: bool = False  # the order came from the sampler, given the key's predictions (autotune.compile.steering)


def plan_searches(specs: list[ProblemSpec], targets: list[Target], store: Store, *, trials: int | None,
                  grid_all: bool, seed: int | None, jax_version: str, steer: bool = False) -> list[TargetPlan]:
    """What to compile for every (target, problem): the default config first, then the valid configs in a seeded
    random order, up to `trials` per key counting what the key already holds (all of them with `grid_all`); with
    `steer`, a key that holds enough predictions has the configs its sampler proposes first
    (`autotune.compile.steering`). With other processes on the same keys,
    `autotune.compile.claims.claim_plans` picks from every candidate left."""
    plans = []
    for target in targets:
        kernel = load_kernel(kernel_for_platform(target.platform))
        for spec in specs:
            space = Space(kernel, spec.problem, target.device_kind)
            key = compile_key(kernel.NAME, kernel.VERSION, target.platform, target.device_kind, jax_version,
                              spec.problem)
            valid = space.valid_configs()
            grid = 1
            for values in space.choices.values():
                grid *= len(values)
            recorded = store.trials(key)
            seen = {config_text(t.config) for t in recorded}
            budget = len(valid) if grid_all else (trials or DEFAULT_TRIALS)
            rest = [c for c in valid if c != space.default]
            random.Random(seed if seed is not None else 0).shuffle(rest)
            ordered = ([space.default] if space.default in valid else []) + rest
            todo = [c for c in ordered if config_text(c.to_dict()) not in seen]
            limit = min(budget, len(valid))
            room = max(0, limit - len(seen))
            ranking = rank_trials(key, recorded) if steer and todo else None
            steered = ranking is not None and len(ranking.entries) >= STEER_AFTER
            if steered:
                first = todo[:1] if todo[0] == space.default else []
                todo = first + steered_order(space, ranking, todo[len(first):], room - len(first), seed)
            plans.append(TargetPlan(target, spec, key, space, tuple(todo[:room]), grid, len(valid), len(seen), limit,
                                    tuple(todo), steered))
    return plans


def first_round(plans: list[TargetPlan]) -> list[TargetPlan]:
    """The plans of a steered search's first round: where a key's order is not steered yet (too few predictions)
    and it has room for at least 2 * STEER_AFTER configs, the first half of them (the default and a random sample,
    whose predictions then steer the second round, `plan_searches(..., steer=True)`); the whole plan otherwise."""
    firsts = []
    for plan in plans:
        room = len(plan.configs)
        if not plan.steered and room >= 2 * STEER_AFTER:
            half = -(-room // 2)
            plan = dataclasses.replace(plan, configs=plan.configs[:half], limit=plan.recorded + half)
        firsts.append(plan)
    return firsts


def merge_summaries(earlier: list[TargetSummary], later: list[TargetSummary]) -> list[TargetSummary]:
    """One summary per key over both rounds: the later plan (its configs after the earlier's) and summed counts."""
    merged = {s.plan.key.digest(): s for s in earlier}
    for s in later:
        before = merged.get(s.plan.key.digest())
        if before is None:
            merged[s.plan.key.digest()] = s
            continue
        plan = dataclasses.replace(s.plan, configs=before.plan.configs + s.plan.configs,
                                   recorded=before.plan.recorded)
        merged[s.plan.key.digest()] = TargetSummary(
            plan, before.compiled + s.compiled, before.spilled + s.spilled, before.failed + s.failed,
            before.compile_s + s.compile_s, before.predicted + s.predicted, before.predict_s + s.predict_s)
    return list(merged.values())


@dataclass
class TargetSummary:
    """What one (target, problem) came to in this run."""

    plan: TargetPlan
    compiled: int = 0
    spilled: int = 0
    failed: Counter = field(default_factory=Counter)
    compile_s: float = 0.0
    predicted: int = 0  # compiled configs the model predicted
    predict_s: float = 0.0  # seconds the workers spent predicting, beyond `compile_s`


class _Recorder:
    """Writes each compile result as it comes (from the compile threads, one at a time) to the key's Optuna study
    and then to our trials table, as the device search does."""

    def __init__(self, store: Store, plans: list[TargetPlan], run_id: int | None):
        self.store, self.run_id, self.lock = store, run_id, threading.Lock()
        self.storage = adapter.open_storage(store.url)
        self.studies: dict[str, int] = {}
        try:
            for plan in plans:
                if plan.configs and plan.key.digest() not in self.studies:
                    study = optuna.create_study(study_name=plan.key.digest(), storage=self.storage,
                                                direction="minimize", load_if_exists=True)
                    study.set_user_attr("key", plan.key.to_dict())
                    study.set_user_attr("kind", KIND)
                    study.set_user_attr("values", f"{PREDICTED} seconds (static model), not timings")
                    self.studies[plan.key.digest()] = self.storage.get_study_id_from_name(plan.key.digest())
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        adapter.close_storage(self.storage)

    def record(self, plan: TargetPlan, config, result: CompileResult) -> None:
        figures = figures_of(result, plan.target.name)
        if result.ok:
            status, error_class, message = COMPILED, None, None
        else:
            status = RESOURCE_EXHAUSTED if result.failure_kind == RESOURCE_EXHAUSTED else "compile_error"
            error_class, message = result.failure_kind, result.message
        space = plan.space
        distributions = {name: optuna.distributions.IntDistribution(0, len(values) - 1)
                         for name, values in space.choices.items()}
        prediction = figures.get("prediction")
        attrs = {"config": config.to_dict(), "kind": KIND, "figures": figures, "compile_s": result.seconds}
        if not result.ok:
            state, value = optuna.trial.TrialState.FAIL, None
            attrs["note"] = f"the {plan.target.name} compiler failed: {result.failure_kind}"
        elif prediction is None:
            state, value = optuna.trial.TrialState.PRUNED, None
            attrs["note"] = (f"compiled for {plan.target.name}, not timed (compile-only); no prediction"
                             + (f": {result.prediction_error}" if result.prediction_error else ""))
        else:  # the sampler's objective: the predicted time, labelled so no dashboard takes it for a timing
            state, value = optuna.trial.TrialState.COMPLETE, prediction["seconds"]
            attrs.update(note=f"compiled for {plan.target.name}, not timed (compile-only): the value is a "
                              f"predicted time", value=f"{PREDICTED} seconds (model {prediction['model_version']})",
                         predicted=True)
        frozen = optuna.trial.create_trial(state=state, value=value, params=space.params(config),
                                           distributions=distributions, user_attrs=attrs)
        with self.lock:
            trial_id = self.storage.create_new_trial(self.studies[plan.key.digest()], template_trial=frozen)
            number = self.storage.get_trial_number_from_id(trial_id)
            self.store.add_trial(plan.key, config=config.to_dict(), status=status, run_id=self.run_id,
                                 number=number, error_class=error_class, error_message=message,
                                 compile_s=result.seconds, figures=figures)


def run_plans(plans: list[TargetPlan], store: Store, *, run_id: int | None = None, processes: int = 2,
              timeout_s: float = 600.0, nice: int = 0, on_result=None, claims=None) -> list[TargetSummary]:
    """Compile every planned config (all targets and problems share the worker processes) and record each outcome
    as it comes; `on_result(summary, result)` follows each record (the progress bar); `claims` (ConfigClaims) are
    marked done for each recorded config."""
    summaries = [TargetSummary(plan) for plan in plans]
    jobs, owners, xla_jobs = [], {}, {}
    for summary in summaries:
        for config in summary.plan.configs:
            job = CompileJob(summary.plan.target.name, summary.plan.spec.problem, config.to_dict())
            owners[id(job)] = (summary, config)
            jobs.append(job)
    for summary in summaries:  # jax.nn's XLA attention once per TPU problem (autotune.compile.xla_prediction),
        plan = summary.plan     # first: a long compile (28.6 s for a 4k backward on v5e) overlaps the configs'
        if plan.configs and plan.target.platform == "tpu" and stored_xla_prediction(store, plan.key) is None:
            job = CompileJob(plan.target.name, plan.spec.problem, {}, implementation="xla")
            xla_jobs[id(job)] = plan
            jobs.insert(len(xla_jobs) - 1, job)
    if not owners:
        return summaries
    recorder = _Recorder(store, plans, run_id)

    def record(result: CompileResult) -> None:
        if id(result.job) in xla_jobs:
            record_xla(store, xla_jobs[id(result.job)], result, run_id)
            return
        summary, config = owners[id(result.job)]
        recorder.record(summary.plan, config, result)
        if claims is not None:
            claims.done(config)
        summary.compile_s += result.seconds
        if result.ok:
            summary.compiled += 1
            summary.spilled += result.spills
            summary.predicted += result.prediction is not None
            summary.predict_s += result.prediction_seconds or 0.0
        else:
            summary.failed[result.failure_kind] += 1
        if on_result is not None:
            on_result(summary, result)

    try:
        compile_many(jobs, processes=processes, timeout_s=timeout_s, nice=nice, on_result=record)
    finally:
        recorder.close()
    return summaries


def record_xla(store: Store, plan: TargetPlan, result: CompileResult, run_id: int | None) -> None:
    """Store the compile of jax.nn's XLA attention for the plan's problem as the one trial of its own key."""
    failed = not result.ok
    store.add_trial(xla_key(plan.key), config={}, status=(RESOURCE_EXHAUSTED if result.failure_kind ==
                                                           RESOURCE_EXHAUSTED else "compile_error") if failed
                    else COMPILED, run_id=run_id, error_class=result.failure_kind if failed else None,
                    error_message=result.message if failed else None, compile_s=result.seconds,
                    figures=figures_of(result, plan.target.name))
