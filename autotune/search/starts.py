"""Where a new study starts: the default config first, then the predicted fastest configs of a compile-only search
for this device kind (`autotune.compile.ranking`), then the nearest tuned problem's best (a warm start); for the
grid sampler, every valid config queued once."""
from __future__ import annotations

import optuna

from autotune.compile.ranking import Ranking
from autotune.keys import shape_distance
from autotune.space import Space
from db import Store, TuningKey

PREDICTED_STARTS = 4  # predicted top configs enqueued after the default (at most a third of the budget)


def predicted_start_count(budget: int) -> int:
    """How many predicted configs a study of `budget` trials starts with: enough to check the model's top, while
    leaving most of the budget to the sampler."""
    return max(1, min(PREDICTED_STARTS, budget // 3))


def enqueue_starts(study: optuna.Study, space: Space, store: Store, key: TuningKey, *, grid: bool,
                   ranking: Ranking | None = None, predicted: int = PREDICTED_STARTS) -> None:
    """Queue the default, the `predicted` fastest predicted configs of `ranking` (valid here, not skipped ahead of
    time) and the warm start on a study without trials; with the grid, every valid config too."""
    if study.get_trials(deepcopy=False):
        if not grid:
            return
    else:
        study.enqueue_trial(space.params(space.default) or {}, skip_if_exists=True)
        for params in predicted_starts(space, ranking, predicted):
            study.enqueue_trial(params, skip_if_exists=True)
        warm = warm_start(space, store, key)
        if warm is not None:
            study.enqueue_trial(warm, skip_if_exists=True)
    if grid:
        for config in space.searchable_configs():
            study.enqueue_trial(space.params(config), skip_if_exists=True)


def predicted_starts(space: Space, ranking: Ranking | None, count: int) -> list[dict[str, int]]:
    """Params of the `count` fastest predicted configs that are valid here, not the default and not skipped."""
    starts: list[dict[str, int]] = []
    for entry in () if ranking is None else ranking.entries:
        if len(starts) >= count:
            break
        if entry.spills:
            continue
        try:
            config = space.from_dict(entry.config)
        except (ValueError, TypeError):
            continue
        params = space.params(config)
        if (params is not None and config != space.default and not space.invalid_reasons(config)
                and space.skip_reason(config) is None and params not in starts):
            starts.append(params)
    return starts


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
