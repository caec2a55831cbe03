"""Issue 21's "done when", with the real compilers: `search --target` at the issue's problem (forward and backward)
prints a ranked table of predicted times and stores a predicted best that `autotune.lookup` returns for the
target's device kind with source "predicted". Fewer trials than the issue's 16 keep it to about a minute; the
README fragment shows the full command's output."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import autotune
from autotune.cli.app import main
from autotune.compile.pool import INSTALL_HINT, compilers_missing
from autotune.compile.ranking import rank_trials
from autotune.compile.results import XLA_KERNEL
from autotune.compile.targets import get_target
from autotune.compile.xla_prediction import stored_xla_prediction, xla_wins
from db import Store

DONE_WHEN = ["--batch", "1", "--seq-len", "4096", "--heads", "32", "--kv-heads", "8", "--head-dim", "128",
             "--dtype", "bfloat16", "--causal", "--backward"]
LOOKUP = ((1, 4096, 32, 128), (1, 4096, 8, 128), "bfloat16")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["v5e", "h100"])
def test_a_target_search_ranks_by_predicted_time_and_lookup_returns_the_predicted_best(tmp_path, name):
    target = get_target(name)
    reason = compilers_missing(target.platform)
    if reason:
        pytest.skip(f"no {target.platform.upper()} compiler here: {reason} (install: {INSTALL_HINT})")
    db = tmp_path / "results.db"
    result = CliRunner().invoke(main, ["search", "--target", name, *DONE_WHEN, "--trials", "2", "--seed", "3",
                                       "--quiet", "--db", str(db)])
    assert result.exit_code == 0, result.output
    table = result.output.split("ranked by PREDICTED time")[1]
    assert table.splitlines()[1].split()[:3] == ["rank", "config", "predicted"]
    with Store(db) as store:
        [key] = [k for k in store.keys() if k.kernel != XLA_KERNEL]
        predicted = sorted((t.figures["prediction"]["seconds"], t.config) for t in store.trials(key)
                           if t.status == "compiled" and (t.figures or {}).get("prediction"))
    assert predicted, "the model predicted none of the compiled configs"
    seconds, best = predicted[0]
    assert f"{seconds * 1e3:.4g} ms predicted" in table.split("predicted best: ")[1]
    autotune.reload()
    try:
        with autotune.using(db=str(db)):
            found = autotune.lookup(*LOOKUP, causal=True, backward=True, device_kind=target.device_kind)
            assert found.source == "predicted" and found.config.to_dict() == best, found
            assert found.implementation == "xla" or found.prediction.seconds == seconds
            assert found.prediction.model_version in found.detail
            here = autotune.lookup(*LOOKUP, causal=True, backward=True)  # this machine: nothing for its kind
            assert here.source == "heuristic"
    finally:
        autotune.reload()
    listed = json.loads(CliRunner().invoke(main, ["list", "--json", "--db", str(db)]).output)
    assert [(e["source"], e["config"], e["time_s"]) for e in listed] == [("predicted", best, None)]
    with Store(db) as store:  # a TPU target also predicts jax.nn's XLA attention, under a key of its own
        xla = stored_xla_prediction(store, key)
        kernel_best = rank_trials(key, store.trials(key)).best.prediction
    if target.platform == "gpu":
        assert xla is None and "XLA attention" not in result.output
    else:
        assert xla is not None and xla.model_version == found.prediction.model_version and xla.seconds > 0
        assert f"jax.nn's XLA attention: {xla.seconds * 1e3:.4g} ms predicted" in result.output
        assert found.implementation == ("xla" if xla_wins(xla, kernel_best) else "pallas")
