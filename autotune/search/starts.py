"""Where a new study starts: the default config first, then the nearest tuned problem's best (a warm start); for
the grid sampler, every valid config queued once."""
from __future__ import annotations

import optuna

from autotune.keys import shape_distance
from autotune.space import Space
from db import Store, TuningKey


def enqueue_starts(study: optuna.Study, space: Space, store: Store, key: TuningKey, *, grid: bool) -> None:
    """Queue the default and the warm start on a study without trials; with the grid, every valid config too."""
    if study.get_trials(deepcopy=False):
        if not grid:
            return
    else:
        study.enqueue_trial(space.params(space.default) or {}, skip_if_exists=True)
        warm = warm_start(space, store, key)
        if warm is not None:
            study.enqueue_trial(warm, skip_if_exists=True)
    if grid:
        for config in space.searchable_configs():
            study.enqueue_trial(space.params(config), skip_if_exists=True)


def warm_start(space: Space, store: Store, key: TuningKey) -> dict[str, int] | None:
    """Params of the nearest tuned problem's best config, if it is valid here."""
    try:
        neighbours = [b for b in store.neighbours(key) if b.key != key]
    except Exception:  # noqa: BLE001 - a warm start is a nicety
        return None
    for best in sorted(neighbours, key=lambda b: shape_distance(b.key, key)):
        try:
            config = space.from_dict(best.config)
        except (ValueError, TypeError):
            continue
        params = space.params(config)
        if params is not None and not space.invalid_reasons(config) and config != space.default:
            return params
    return None
