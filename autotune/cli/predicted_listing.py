"""How the command line shows predictions (`search --target`'s ranking, `show --target`, `list`): every predicted
time in a column or line that says "predicted", with the model version beside it, never in a column of timings."""
from __future__ import annotations

from typing import Any

import click

from autotune.cli.common import describe_problem, print_table, table_config
from autotune.compile.ranking import PREDICTED, RankedConfig, Ranking, describe_prediction
from autotune.problem_fields import lookup_arguments

RANKED_HEADERS = ["rank", "config", "predicted ms", "% of roofline", "bound", "model", "note"]
SHOWN_RANKS = 5  # rows of the ranked table a search prints


def predicted_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.4g}"


def ranked_row(entry: RankedConfig, key) -> list[str]:
    p = entry.prediction
    return [f"#{entry.rank}", table_config(entry.config, key), predicted_ms(p.seconds), f"{p.roofline_fraction:.0%}",
            p.bound, p.model_version, "spills: never the predicted best" if entry.spills else ""]


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


def print_ranking(ranking: Ranking, target_name: str, *, shown: int | None = SHOWN_RANKS) -> None:
    """The ranked table of one key (the `shown` fastest predicted configs), then its predicted best."""
    key = ranking.key
    entries = ranking.entries if shown is None else ranking.entries[:shown]
    of = f"the {len(entries)} fastest of " if len(entries) < len(ranking.entries) else ""
    click.echo(f"\n{target_name}, {describe_problem(key)}: {of}{len(ranking.entries)} compiled config(s) ranked by "
               f"PREDICTED time (static model {ranking.model_version}; nothing was timed)")
    print_table(RANKED_HEADERS, [ranked_row(entry, key) for entry in entries])
    left_out = []
    if ranking.other_models:
        left_out.append(f"{ranking.other_models} predicted by another model version")
    if ranking.unpredicted:
        left_out.append(f"{ranking.unpredicted} without a prediction")
    if left_out:
        click.echo(f"not ranked: {', '.join(left_out)}")
    best = ranking.best
    if best is None:
        click.echo("predicted best: none (every ranked config spills registers)")
        return
    click.echo(f"predicted best: {table_config(best.config, key)}, {describe_prediction(best.prediction)}")
    click.echo(f"On a {key.device_kind} with no measured best the runtime uses it (and says so); see it with "
               f"autotune.lookup({lookup_arguments(key)}, device_kind={key.device_kind!r})")
