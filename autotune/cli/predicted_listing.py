"""How the command line shows predictions (`search --target`'s ranking, `show --target`, `list`): every predicted
time in a column or line that says "predicted", with the model version beside it, never in a column of timings."""
from __future__ import annotations

from typing import Any

import click

from autotune.cli.common import describe_problem, print_table, table_config
from autotune.compile.targets import target_for_device_kind
from db import KERNEL_IMPLEMENTATION
from autotune.compile.model.prediction import Prediction
from autotune.compile.ranking import PREDICTED, RankedConfig, Ranking, describe_prediction
from autotune.compile.xla_prediction import xla_wins
from autotune.problem_fields import lookup_arguments

RANKED_HEADERS = ["rank", "config", "predicted ms", "% of roofline", "bound", "model", "note"]
SHOWN_RANKS = 5  # rows of the ranked table a search prints


def predicted_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.4g}"


def ranked_row(entry: RankedConfig, key) -> list[str]:
    p = entry.prediction
    return [f"#{entry.rank}", table_config(entry.config, key), predicted_ms(p.seconds), f"{p.roofline_fraction:.0%}",
            p.bound, p.model_version, "spills: never the predicted best" if entry.spills else ""]


PREDICTED_HEADERS = ["predicted rank", "predicted ms", "% of roofline", "bound", "model"]


def predicted_cells(ranking: Ranking | None, trial) -> list[str]:
    """A trial's cells under PREDICTED_HEADERS: its rank and the model's figures, or dashes when not ranked."""
    entry = None if ranking is None else next((e for e in ranking.entries if e.trial_id == trial.id), None)
    if entry is None:
        return ["-"] * len(PREDICTED_HEADERS)
    p = entry.prediction
    return [f"#{entry.rank}", predicted_ms(p.seconds), f"{p.roofline_fraction:.0%}", p.bound, p.model_version]


def prediction_json(entry: RankedConfig | None) -> dict[str, Any] | None:
    """One ranked config for `--json`: its rank and the model's figures, under names that say they are predicted."""
    if entry is None:
        return None
    p = entry.prediction
    return {"source": PREDICTED, "rank": entry.rank, "config": entry.config, "predicted_s": p.seconds,
            "roofline_s": p.roofline_seconds, "roofline_fraction": p.roofline_fraction, "bound": p.bound,
            "model_version": p.model_version, "spills": entry.spills}


def ranking_json(ranking: Ranking | None) -> dict[str, Any] | None:
    if ranking is None:
        return None
    return {"source": PREDICTED, "model_version": ranking.model_version, "key": ranking.key.to_dict(),
            "predicted_best": prediction_json(ranking.best),
            "ranked": [prediction_json(entry) for entry in ranking.entries],
            "other_models": ranking.other_models, "unpredicted": ranking.unpredicted}


def print_ranking(ranking: Ranking, target_name: str, *, shown: int | None = SHOWN_RANKS,
                  xla: Prediction | None = None) -> None:
    """The ranked table of one key (the `shown` fastest predicted configs), then its predicted best and, on a TPU
    target, jax.nn's XLA attention predicted the same way (`xla`), which is the predicted winner when faster by
    more than the margin."""
    key = ranking.key
    entries = ranking.entries if shown is None else ranking.entries[:shown]
    of = f"the {len(entries)} fastest of " if len(entries) < len(ranking.entries) else ""
    click.echo(f"\n{target_name}, {describe_problem(key)}: {of}{len(ranking.entries)} compiled config(s) ranked by "
               f"PREDICTED time (static model {ranking.model_version}; nothing was timed)")
    print_table(RANKED_HEADERS, [ranked_row(entry, key) for entry in entries])
    left_out = []
    if ranking.other_models:
        left_out.append(f"{ranking.other_models} predicted by another model version")
    if ranking.unpredicted_spilling:
        left_out.append(f"{ranking.unpredicted_spilling} that spill registers "
                        "(not predicted: never the predicted best)")
    if ranking.unpredicted > ranking.unpredicted_spilling:
        left_out.append(f"{ranking.unpredicted - ranking.unpredicted_spilling} without a prediction")
    if left_out:
        click.echo(f"not ranked: {', '.join(left_out)}")
    best = ranking.best
    if best is None:
        click.echo("predicted best: none (every ranked config spills registers)")
        return
    click.echo(f"predicted best: {table_config(best.config, key)}, {describe_prediction(best.prediction)}")
    runs = "the runtime uses it (and says so)"
    if xla_wins(xla, best.prediction):
        click.echo(f"jax.nn's XLA attention: {describe_prediction(xla)}: the predicted winner, "
                   f"{best.prediction.seconds / xla.seconds:.2f}x faster than the kernel's predicted best")
        runs = ("autotune.dot_product_attention runs XLA's attention (autotune.flash_attention the predicted "
                "config)")
    elif xla is not None:
        click.echo(f"jax.nn's XLA attention: {describe_prediction(xla)}, "
                   f"{xla.seconds / best.prediction.seconds:.2f}x the kernel's predicted best")
    click.echo(f"On a device of kind {key.device_kind!r} with no measured best {runs}; see it with "
               f"autotune.lookup({lookup_arguments(key)}, device_kind={key.device_kind!r})")


def predicted_best_json(ranking: Ranking) -> dict[str, Any]:
    """A predicted best as a `list --json` entry: the fields of a measured entry, with no time (None, no `times`),
    the kernel as its implementation, and the predicted figures under names of their own, `source` "predicted"."""
    best = ranking.best
    key = ranking.key
    return {"source": PREDICTED, "id": None, "digest": key.digest(), "key": key.to_dict(),
            "problem": describe_problem(key), "config": best.config, "time_s": None, "default_time_s": None,
            "speedup": None, "trials": len(ranking.entries), "implementation": KERNEL_IMPLEMENTATION, "times": {},
            "predicted_s": best.prediction.seconds,
            "roofline_fraction": best.prediction.roofline_fraction, "bound": best.prediction.bound,
            "model_version": ranking.model_version, "rank": best.rank}


def print_predicted_bests(rankings: list[Ranking], *, after_measured: bool) -> None:
    """`list`'s table of predicted bests, apart from the measured ones and labelled as predicted."""
    if after_measured:
        click.echo()
    click.echo("Predicted bests (compile-only searches: the static model's fastest config, NOT timed; the runtime "
               "uses one only where its device kind has no measured best):")
    rows = []
    for ranking in rankings:
        key, best = ranking.key, ranking.best
        target = target_for_device_kind(key.device_kind)
        rows.append([target.name if target else "-", key.device_kind, f"{key.kernel}@{key.kernel_version}",
                     describe_problem(key), table_config(best.config, key), predicted_ms(best.prediction.seconds),
                     f"{best.prediction.roofline_fraction:.0%}", best.prediction.bound, ranking.model_version,
                     str(len(ranking.entries))])
    print_table(["target", "device", "kernel", "problem", "predicted best config", "predicted ms", "% of roofline",
                 "bound", "model", "ranked"], rows)
