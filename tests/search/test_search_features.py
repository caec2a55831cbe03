"""A search for a problem with a sliding window, soft cap and padding lengths (issue 13): the CLI takes them, every
candidate is checked against the reference with those features, the best is stored under a key that carries them,
and the runtime then finds it for a call with the same window (and not for one without)."""
from __future__ import annotations

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from click.testing import CliRunner

import autotune
from autotune.cli.app import main
from autotune.device import current_device
from autotune.keys import make_key
from db import Store
from kernels import Problem, attention_reference, gpu

SHAPE = ["--batch", "2", "--seq-len", "96", "--heads", "2", "--kv-heads", "1", "--head-dim", "16"]


@pytest.mark.slow
def test_a_search_with_a_window_stores_a_best_the_runtime_finds(tmp_path):
    db = tmp_path / "r.db"
    args = ["search", *SHAPE, "--causal", "--window", "24,0", "--softcap", "20", "--lengths", "--kernel", "gpu",
            "--trials", "3", "--seed", "1", "--no-xla", "--quiet", "--db", str(db)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    problem = Problem(batch=2, q_len=96, kv_len=96, heads=2, kv_heads=1, head_dim=16, causal=True,
                      window_left=24, window_right=0, softcap=20.0, lengths=True)
    key = make_key(gpu, problem, current_device())
    store = Store(db)
    try:
        best = store.get_best(key)
        trials = store.trials(key)
        plain = store.get_best(make_key(gpu, problem.replace(window_left=None, window_right=None), current_device()))
    finally:
        store.close()
    assert best is not None and plain is None
    assert len(trials) == 3 and all(t.status == "ok" for t in trials), [(t.status, t.error_message) for t in trials]
    assert all(t.max_error is not None and t.max_error < 1e-4 for t in trials)  # checked against the reference

    q, k, v = (jax.random.normal(key_, shape) for key_, shape in zip(
        jax.random.split(jax.random.key(3), 3), [(2, 96, 2, 16), (2, 96, 1, 16), (2, 96, 1, 16)]))
    lengths = jnp.array([70, 96], jnp.int32)
    autotune.reload()
    try:
        with autotune.using(db=str(db), on_miss="heuristic"):
            found = autotune.lookup(q.shape, k.shape, "float32", causal=True, window=(24, 0), softcap=20.0,
                                    lengths=True, kernel="gpu")
            with warnings.catch_warnings(record=True) as record:
                warnings.simplefilter("always")
                out = autotune.flash_attention(q, k, v, causal=True, window=(24, 0), softcap=20.0, q_lengths=lengths,
                                             kv_lengths=lengths, kernel="gpu")
            other = autotune.lookup(q.shape, k.shape, "float32", causal=True, window=(25, 0), softcap=20.0,
                                    lengths=True, kernel="gpu")
            with pytest.warns(RuntimeWarning, match="--window 25,0 --softcap 20 --lengths"):  # the tune command
                autotune.flash_attention(q, k, v, causal=True, window=(25, 0), softcap=20.0, q_lengths=lengths,
                                         kv_lengths=lengths, kernel="gpu")
    finally:
        autotune.reload()
    assert found.source == "tuned" and found.config.to_dict() == best.config
    assert not [w for w in record if "no tuned config" in str(w.message)]
    assert other.source == "heuristic"  # another window is another key
    want = attention_reference(q, k, v, causal=True, window=(24, 0), softcap=20.0, q_lengths=lengths,
                               kv_lengths=lengths)
    np.testing.assert_allclose(out, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("flags,message", [
    (["--window", "abc"], "window"),
    (["--window", "-3"], "window"),
    (["--window", "1,2,3"], "window"),
    (["--softcap", "-2"], "softcap"),
    (["--softcap", "nan"], "softcap"),
])
def test_bad_window_or_cap_flags_are_refused_before_anything_is_written(tmp_path, flags, message):
    db = tmp_path / "r.db"
    result = CliRunner().invoke(main, ["search", *SHAPE, *flags, "--db", str(db)])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not db.exists()


def test_list_misses_shows_why_and_search_misses_skips_what_tuning_cannot_fix(tmp_path):
    """A miss recorded with a reason (the call ran XLA: a bias) is listed with it and never tuned; a plain miss is
    listed as tunable and is what `search --misses` would tune."""
    from autotune.cli.search import missed_specs

    db = tmp_path / "r.db"
    device = current_device()
    windowed = Problem(batch=1, q_len=40, kv_len=40, heads=2, kv_heads=2, head_dim=16, window_left=8, window_right=0)
    biased = windowed.replace(q_len=48, kv_len=48)
    store = Store(db)
    try:
        store.record_miss(make_key(gpu, windowed, device))
        store.record_miss(make_key(gpu, windowed, device))
        store.record_miss(make_key(gpu, biased, device), reason="bias is given (the kernels take no additive bias)")
        specs = missed_specs(store, gpu, device)
    finally:
        store.close()
    assert [spec.problem for spec in specs] == [windowed]
    result = CliRunner().invoke(main, ["list", "--misses", "--db", str(db)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    windowed_line = next(line for line in lines if "q40" in line)
    biased_line = next(line for line in lines if "q48" in line)
    assert "win(8,0)" in windowed_line and " 2 " in windowed_line and "autotune search --misses" in windowed_line
    assert "bias is given" in biased_line and " 1 " in biased_line
    as_json = CliRunner().invoke(main, ["list", "--misses", "--json", "--db", str(db)])
    rows = json.loads(as_json.output)
    assert [(r["key"]["q_len"], r["count"], r["reason"]) for r in rows] == [
        (40, 2, None), (48, 0, "bias is given (the kernels take no additive bias)")]  # bias calls: fallbacks
