"""Let the predicted times steer which configs a compile-only search compiles next.

Compiles are the cost of `search --target`, and the static model's prediction comes with each one. Once a key holds
a few predicted configs, Optuna's TPE sampler, given those configs and their predicted seconds (the same objective
the key's study records), proposes the next ones; the configs it proposes are compiled first, the rest follow in
the seeded random order. The proposals come from a throwaway in-memory study, so the key's stored study only ever
holds trials that were really compiled.
"""
from __future__ import annotations

import optuna

from autotune.compile.ranking import Ranking
from autotune.space import Space, config_text

STEER_AFTER = 4  # predicted configs a key needs before the sampler picks what to compile next
ASKS_PER_PICK = 20  # proposals tried per config wanted (TPE repeats itself near the best)


def steered_order(space: Space, ranking: Ranking | None, candidates: list, want: int, seed: int | None) -> list:
    """`candidates` (kernel Configs not compiled yet), the `want` the sampler proposes first, then the others in
    their given order; unchanged while the key has fewer than STEER_AFTER predictions."""
    if ranking is None or len(ranking.entries) < STEER_AFTER or want <= 0 or not candidates:
        return list(candidates)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a throwaway study: nothing in it is worth a log line
    try:
        return _steered(space, ranking, candidates, want, seed)
    finally:
        optuna.logging.set_verbosity(verbosity)


def _steered(space: Space, ranking: Ranking, candidates: list, want: int, seed: int | None) -> list:
    distributions = {name: optuna.distributions.IntDistribution(0, len(values) - 1)
                     for name, values in space.choices.items()}
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=0, multivariate=True, constant_liar=True)
    study = optuna.create_study(direction="minimize", sampler=sampler)
    for entry in ranking.entries:
        params = space.params(space.from_dict(entry.config))
        if params is not None:
            study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions,
                                                      value=entry.prediction.seconds))
    waiting = {config_text(c.to_dict()): c for c in candidates}
    picked: list = []
    for _ in range(want * ASKS_PER_PICK):
        if len(picked) >= want or not waiting:
            break
        trial = study.ask(distributions)
        text = config_text(space.config(trial.params).to_dict())
        if text in waiting:
            picked.append(waiting.pop(text))  # left running: the constant liar steers the next asks elsewhere
        else:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)  # invalid or compiled already: not a result
    chosen = {config_text(c.to_dict()) for c in picked}
    return picked + [c for c in candidates if config_text(c.to_dict()) not in chosen]
