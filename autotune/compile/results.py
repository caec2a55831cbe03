"""Compile-only results: the keys they are stored under, their figures, and what the device search learns from them.

A compile-only trial (`autotune search --target`) is stored under a key whose platform is the target's plus
"-compile" (e.g. "gpu-compile" for h100) and whose device kind is the target's. The key is never the device's own,
so `list`, the runtime and the device search's budget never take a compile-only result for a timed one, while its
Optuna study (named by the key's digest) has the same layout as the device search's. On the device, the search
looks up the compile-only key of its own kernel build, device kind (or the target that covers it) and problem (preferring the same jax version)
and skips what the compiler rejected ahead of time and, unless spills are allowed, what spilled registers.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable

from autotune.compile.targets import target_for_device_kind
from autotune.keys import PROBLEM_FIELDS
from autotune.space import config_text  # configs compare as the study compares them: canonical JSON
from db import Store, TrialRecord, TuningKey
from db.figures import RESOURCE_EXHAUSTED, canonical_failure_kind, check_figures

COMPILE_SUFFIX = "-compile"
COMPILED = "compiled"  # the trial status of a config that compiled
REJECTING_KINDS = (RESOURCE_EXHAUSTED, "lowering_error")  # failures the device search trusts to skip a config
SPILLS = "spills"
REJECTED = "rejected"
XLA_KERNEL = "xla_attention"  # the kernel name of jax.nn's XLA attention's compile-only trials (compile/xla_prediction)


def compile_platform(platform: str) -> str:
    """The key platform of compile-only results for a device platform ('gpu' -> 'gpu-compile')."""
    return platform + COMPILE_SUFFIX


def is_compile_only(key: TuningKey) -> bool:
    return key.platform.endswith(COMPILE_SUFFIX)


def compile_key(kernel_name: str, kernel_version: str, platform: str, device_kind: str, jax_version: str,
                problem) -> TuningKey:
    """The key a compile-only trial of this kernel build and problem for a target (platform, device kind) goes by."""
    return TuningKey(kernel=kernel_name, kernel_version=kernel_version, platform=compile_platform(platform),
                     device_kind=device_kind, jax_version=jax_version,
                     **{name: getattr(problem, name) for name in PROBLEM_FIELDS})


def figures_of(result, target_name: str) -> dict[str, Any]:
    """The JSON stored in a compile-only trial's `figures`: the target, each kernel's figures, the static model's
    prediction when it made one (a predicted time with its model version, never a timing), and for a failure its
    kind and the bytes the compiler named."""
    data: dict[str, Any] = {"target": target_name,
                            "kernels": [dataclasses.asdict(k) for k in result.kernels]}
    prediction = getattr(result, "prediction", None)
    if result.ok and prediction is not None:
        try:  # stored only in the schema's shape (db/figures.py); a prediction that does not fit is left out
            data["prediction"] = check_figures({**data, "prediction": prediction})["prediction"]
        except (ValueError, TypeError):
            pass
    if not result.ok:
        data.update(failure_kind=result.failure_kind, requested_bytes=result.requested_bytes,
                    limit_bytes=result.limit_bytes)
    return data


def trial_spills(trial: TrialRecord) -> bool:
    """Whether any kernel of a compiled trial spilled registers (stores or loads)."""
    kernels = (trial.figures or {}).get("kernels") or []
    return any((k.get("spill_store_bytes") or 0) > 0 or (k.get("spill_load_bytes") or 0) > 0 for k in kernels)


def trial_verdict(trial: TrialRecord) -> str | None:
    """REJECTED, SPILLS or None (compiled cleanly, or failed in a way that says nothing of the config)."""
    if trial.status == COMPILED:
        return SPILLS if trial_spills(trial) else None
    if canonical_failure_kind(trial.error_class) in REJECTING_KINDS:
        return REJECTED
    return None


def peak_bytes(trial: TrialRecord) -> int | None:
    """The largest memory figure (shared memory or VMEM) of a trial's kernels, or the bytes a failure requested."""
    figures = trial.figures or {}
    sizes = [k.get("memory_bytes") or 0 for k in figures.get("kernels") or []]
    if sizes:
        return max(sizes)
    return figures.get("requested_bytes")


@dataclass(frozen=True)
class AheadOfTime:
    """What a target's compile-only sweep said of a device key's configs (by canonical config JSON)."""

    source: TuningKey  # the compile-only key the verdicts come from
    rejected: frozenset[str]
    spills: frozenset[str]
    allow_spills: bool = False

    def skip_reason(self, config: dict) -> str | None:
        """Why the device search skips this config (REJECTED or SPILLS), or None to evaluate it."""
        text = config_text(config)
        if text in self.rejected:
            return REJECTED
        if text in self.spills and not self.allow_spills:
            return SPILLS
        return None

    def describe(self, configs: Iterable[dict], default: dict | None = None) -> str | None:
        """'61 of 96 candidates skipped: 2 rejected by the compiler ahead of time, 59 spill' over `configs` (the
        default config is never skipped); None when nothing is skipped."""
        configs = list(configs)
        reasons = [self.skip_reason(c) for c in configs if default is None or c != default]
        rejected, spilled = reasons.count(REJECTED), reasons.count(SPILLS)
        if not rejected and not spilled:
            return None
        parts = []
        if rejected:
            parts.append(f"{rejected} rejected by the compiler ahead of time")
        if spilled:
            parts.append(f"{spilled} spill")
        return (f"{rejected + spilled} of {len(configs)} candidates skipped: {', '.join(parts)} "
                f"(compile-only results for {self.source.device_kind}, jax {self.source.jax_version})")


def covering_kinds(device_kind: str) -> tuple[str, ...]:
    """The device kinds whose compile-only results apply on a device of `device_kind`: its own, and that of the
    target covering it (an H100 sweep stored under 'NVIDIA H100 80GB HBM3' applies on that kind only; an a100 sweep
    applies on every A100 the a100 target covers)."""
    target = target_for_device_kind(device_kind)
    kinds = [device_kind] + ([target.device_kind] if target is not None else [])
    return tuple(dict.fromkeys(kinds))


def find_compile_keys(store: Store, key: TuningKey) -> list[TuningKey]:
    """The compile-only keys for a device key's kernel build, device kind (or the target covering it) and problem,
    same jax version first."""
    found = [k for kind in covering_kinds(key.device_kind)
             for k in store.keys(platform=compile_platform(key.platform), kernel=key.kernel,
                                 kernel_version=key.kernel_version, device_kind=kind)
             if all(getattr(k, name) == getattr(key, name) for name in PROBLEM_FIELDS)]
    return sorted(found, key=lambda k: (k.jax_version != key.jax_version, k.jax_version))


def ahead_of_time(store: Store, key: TuningKey, *, allow_spills: bool = False) -> AheadOfTime | None:
    """The verdicts of the best matching compile-only key with trials (None if the key has none)."""
    if is_compile_only(key):
        return None
    for source in find_compile_keys(store, key):
        trials = store.trials(source)
        if not trials:
            continue
        rejected, spills = set(), set()
        for trial in trials:
            verdict = trial_verdict(trial)
            if verdict == REJECTED:
                rejected.add(config_text(trial.config))
            elif verdict == SPILLS:
                spills.add(config_text(trial.config))
        return AheadOfTime(source, frozenset(rejected), frozenset(spills), allow_spills)
    return None
