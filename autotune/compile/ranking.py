"""Configs ranked by predicted time, and the predicted best of a key: read from the compile-only trials themselves.

A compile-only trial (`search --target`) stores the static model's prediction beside its compiler figures
(`figures["prediction"]`, with its model version). The ranking of a key is derived from those rows every time it is
asked for, never copied into a table of its own: the trials are the one record of what was predicted, so a ranking
cannot disagree with them, `export`/`import` carry it with the trials, and a later search that adds trials moves it.

Only predictions of one model version are ranked together (the current model's where the key has any, else the
newest version stored): a time from another model is not comparable. Configs that spilled registers are ranked but
never chosen as the predicted best, since the device search skips them by default. A prediction is never a time:
every reader labels it "predicted" with its model version.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from autotune.compile.model.prediction import GPU_MODEL_VERSION, TPU_MODEL_VERSION, Prediction
from autotune.compile.results import COMPILED, XLA_KERNEL, trial_spills
from autotune.keys import PROBLEM_FIELDS
from autotune.space import config_text
from db import Store, TrialRecord, TuningKey
from db.records import COMPILE_PLATFORMS

CURRENT_MODELS = (TPU_MODEL_VERSION, GPU_MODEL_VERSION)  # what a compile made now would be predicted by
PREDICTED = "predicted"  # the source and label of everything that comes from the model, never from a timing


def prediction_of(trial: TrialRecord) -> Prediction | None:
    """The model's prediction stored with a compiled trial, or None (not compiled, or not predicted)."""
    if trial.status != COMPILED or not trial.figures or not trial.figures.get("prediction"):
        return None
    try:
        return Prediction.from_dict(trial.figures["prediction"])
    except (KeyError, TypeError, ValueError):  # figures are schema-checked on write; a hand edit reads as none
        return None


@dataclass(frozen=True)
class RankedConfig:
    """One compiled config and its predicted time (1-based `rank` among the key's predictions of one model)."""

    rank: int
    config: dict[str, Any]
    prediction: Prediction
    spills: bool
    trial_id: int


@dataclass(frozen=True)
class Ranking:
    """A compile-only key's compiled configs ordered by predicted time, under one model version."""

    key: TuningKey  # the compile-only key (platform "gpu-compile" / "tpu-compile", the target's device kind)
    model_version: str
    entries: tuple[RankedConfig, ...]
    other_models: int = 0  # predictions of another model version, left out of this ranking
    unpredicted: int = 0  # compiled trials without a prediction (the model failed or did not apply)
    unpredicted_spilling: int = 0  # of those, the ones that spill (the GPU model leaves them out on purpose)

    @property
    def best(self) -> RankedConfig | None:
        """The predicted best: the fastest predicted config that does not spill (None if every one spills)."""
        return next((entry for entry in self.entries if not entry.spills), None)

    def rank_of(self, config: dict[str, Any]) -> RankedConfig | None:
        """The entry of `config` (compared as canonical JSON), or None if it was not predicted."""
        text = config_text(config)
        return next((entry for entry in self.entries if config_text(entry.config) == text), None)

    def top(self, count: int) -> tuple[RankedConfig, ...]:
        """The `count` fastest predicted configs that do not spill (what a device search starts from)."""
        return tuple(entry for entry in self.entries if not entry.spills)[:count]


def rank_trials(key: TuningKey, trials: list[TrialRecord]) -> Ranking | None:
    """The ranking of one compile-only key's trials (None when none of them carries a prediction)."""
    predicted = [(trial, p) for trial in trials if (p := prediction_of(trial)) is not None]
    if not predicted:
        return None
    versions = {p.model_version for _trial, p in predicted}
    current = [v for v in CURRENT_MODELS if v in versions]
    # Another model's times are not comparable: the current model's, else the newest version stored (last written).
    version = current[0] if current else max(predicted, key=lambda tp: tp[0].id)[1].model_version
    chosen = sorted(((t, p) for t, p in predicted if p.model_version == version),
                    key=lambda tp: (tp[1].seconds, tp[0].id))
    seen: set[str] = set()
    entries = []
    for trial, prediction in chosen:
        text = config_text(trial.config)
        if text in seen:  # the same config recorded twice (an import, a rerun): ranked once
            continue
        seen.add(text)
        entries.append(RankedConfig(len(entries) + 1, dict(trial.config), prediction, trial_spills(trial), trial.id))
    predicted_ids = {trial.id for trial, _p in predicted}
    unpredicted = [trial for trial in trials if trial.status == COMPILED and trial.id not in predicted_ids]
    return Ranking(key, version, tuple(entries), other_models=len(predicted) - len(chosen),
                   unpredicted=len(unpredicted), unpredicted_spilling=sum(map(trial_spills, unpredicted)))


def prediction_keys(store: Store, key: TuningKey) -> list[TuningKey]:
    """The compile-only keys that predict for `key` (a device key, or a compile-only key itself): same kernel build,
    device kind and problem, on either compile platform; the same jax version first, then the newest."""
    found = [k for platform in COMPILE_PLATFORMS
             for k in store.keys(platform=platform, kernel=key.kernel, kernel_version=key.kernel_version,
                                 device_kind=key.device_kind)
             if all(getattr(k, name) == getattr(key, name) for name in PROBLEM_FIELDS)]
    return sorted(found, key=lambda k: (k.jax_version != key.jax_version, _newest_first(k.jax_version)))


def _newest_first(version: str) -> tuple:
    parts = tuple(int(p) if p.isdigit() else 0 for p in version.split("."))
    return tuple(-p for p in parts)


def predicted_ranking(store: Store, key: TuningKey) -> Ranking | None:
    """The ranking for `key` from the best matching compile-only key that holds predictions, or None."""
    for source in prediction_keys(store, key):
        ranking = rank_trials(source, store.trials(source))
        if ranking is not None:
            return ranking
    return None


def predicted_bests(store: Store, filters: dict[str, Any]) -> list[Ranking]:
    """The rankings of every compile-only key whose fields match `filters` (e.g. device_kind, kernel, dtype,
    causal; None matches anything) and that has a predicted best, oldest key first: what `list` shows."""
    rankings = []
    for platform in COMPILE_PLATFORMS:
        for key in store.keys(platform=platform, kernel=filters.get("kernel"),
                              device_kind=filters.get("device_kind")):
            if key.kernel == XLA_KERNEL or any(value is not None and getattr(key, name) != value
                                               for name, value in filters.items()):
                continue  # XLA's prediction shows beside its problem's ranking, not as a key of its own
            ranking = rank_trials(key, store.trials(key))
            if ranking is not None and ranking.best is not None:
                rankings.append(ranking)
    return rankings


def describe_prediction(prediction: Prediction) -> str:
    """'1.234 ms predicted (62% of roofline, compute-bound, model tpu-1)': how every reader prints one."""
    return (f"{prediction.seconds * 1e3:.4g} ms predicted ({prediction.roofline_fraction:.0%} of roofline, "
            f"{prediction.bound}-bound, model {prediction.model_version})")
