"""How the final re-timing picks the implementation that wins a key (issue 27): a baseline (jax.nn's XLA or cuDNN
attention) only when it beats the best kernel config by more than the margin, never on the CPU interpret platform;
a search whose kernel is compiled and slower stores "xla" with every time behind it; a bad margin is one line."""
from __future__ import annotations

import random
import time

import pytest
from click.testing import CliRunner

from autotune.cli.app import main
from autotune.device import current_device
from autotune.search.winner import choose_winner
from autotune.kernel_protocol import load_kernel
from autotune.keys import make_key
from autotune.measure.evaluation import timing_inputs
from autotune.options import DEFAULT_MARGIN, SearchOptions, TimingPolicy
from autotune.search.retime import retime_and_store
from autotune.search.study import Standings
from db import Store
from kernels import Problem

FAST = TimingPolicy(warmup=1, samples=5, min_sample_s=1e-3)
SLOW = "tests.slow_kernel"


@pytest.mark.parametrize("faster_by, interpret, winner", [
    (0.5, False, "xla"),  # twice as fast: wins
    (DEFAULT_MARGIN * 2, False, "xla"),  # past the margin
    (DEFAULT_MARGIN / 2, False, "pallas"),  # faster, but inside the noise margin: the kernel keeps it
    (-0.2, False, "pallas"),  # slower
    (0.5, True, "pallas"),  # interpret-mode kernel times are never compared with compiled XLA
])
def test_a_baseline_wins_only_when_clearly_faster_and_never_in_interpret_mode(faster_by, interpret, winner) -> None:
    kernel = random.uniform(1e-4, 1e-2)
    xla = kernel / (1 + faster_by)
    assert choose_winner({"pallas": kernel, "xla": xla}, interpret=interpret) == winner
    assert choose_winner({"pallas": kernel}) == "pallas"


def test_the_fastest_baseline_is_the_one_compared_and_the_margin_is_configurable() -> None:
    kernel = random.uniform(1e-4, 1e-2)
    times = {"pallas": kernel, "xla": kernel / 1.1, "cudnn": kernel / 1.4}
    assert choose_winner(times) == "cudnn"
    assert choose_winner(times, margin=0.5) == "pallas"  # 1.4x is not clearly enough at a 50% margin
    assert choose_winner({**times, "cudnn": kernel * 2}, margin=0.05) == "xla"


@pytest.mark.parametrize("margin", [-0.01, 1.0, 3, "3%", True, float("nan")])
def test_a_bad_margin_is_one_clear_line(margin) -> None:
    with pytest.raises(ValueError, match="baseline_margin must be a fraction from 0 to below 1"):
        SearchOptions(baseline_margin=margin)


def test_the_cli_refuses_a_bad_margin_before_anything_is_written(tmp_path) -> None:
    db = tmp_path / "results.db"
    result = CliRunner().invoke(main, ["search", "--batch", "1", "--seq-len", "32", "--heads", "1", "--head-dim",
                                       "16", "--baseline-margin", "1.5", "--db", str(db)])
    assert result.exit_code == 2 and "--baseline-margin" in result.output and "1.5" in result.output
    assert not db.exists()


def test_a_compiled_kernel_slower_than_xla_stores_xla_as_the_winner_with_every_time(tmp_path) -> None:
    problem = Problem(batch=1, q_len=64, kv_len=64, heads=2, kv_heads=1, head_dim=16, causal=True)
    kernel = load_kernel(SLOW)
    key = make_key(kernel, problem, current_device())
    default = kernel.Config.default(problem)
    standings = Standings(key=key, problem=problem, default=default, top=(default,), best_trial_s=None, counted=1,
                          statuses={"ok": 1}, failed=0)
    options = SearchOptions(timing=FAST, input_buffers=2)
    with Store(tmp_path / "results.db") as store:
        result = retime_and_store(standings, kernel=kernel, store=store, run_id=None, interpret=False,
                                  timing=FAST, compare_xla=True, started=time.perf_counter(),
                                  arg_sets=timing_inputs(problem, options, random.randrange(1 << 16)))
        best = store.get_best(key)
    assert result.implementation == best.implementation == "xla", result.times
    assert set(best.times) == {"pallas", "xla"} and best.times == result.times
    assert best.time_s == best.times["xla"] < best.times["pallas"] / (1 + DEFAULT_MARGIN)
    assert best.config == default.to_dict()  # the kernel's best config is kept for calls that force the kernel


def test_the_database_knows_the_same_implementations_as_the_kernels_baselines() -> None:
    from db import IMPLEMENTATIONS, KERNEL_IMPLEMENTATION
    from kernels.xla_attention import BASELINES

    assert IMPLEMENTATIONS == (KERNEL_IMPLEMENTATION, *BASELINES)
