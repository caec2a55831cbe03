"""Predictions at work on the CPU: compile-only predictions stored for the CPU's own device kind (written through the
db API, as `search --target` writes them) make the runtime run the predicted best (said once, logged as
'predicted'), a device search start from the predicted top configs and report where its measured winner ranked,
and the measured best then wins over the prediction."""
from __future__ import annotations

import random
import warnings

import jax
import optuna
import pytest

import autotune
from autotune.compile.model.prediction import GPU_MODEL_VERSION
from autotune.compile.ranking import predicted_ranking, rank_trials
from autotune.compile.results import compile_key
from autotune.device import current_device
from autotune.keys import make_key
from autotune.options import TimingPolicy
from autotune.search.loop import SearchOptions, search_problem
from autotune.space import Space
from db import Store
from kernels import Problem, gpu

FAST = TimingPolicy(warmup=1, samples=3, min_sample_s=1e-4)
PROBLEM = Problem(batch=1, q_len=32, kv_len=32, heads=2, kv_heads=1, head_dim=16, causal=True)


def prediction(seconds: float, version: str = GPU_MODEL_VERSION) -> dict:
    return {"seconds": seconds, "roofline_seconds": seconds * random.uniform(0.1, 0.9), "bound": "compute",
            "parts": {"issue": seconds * 0.5}, "model_version": version}


def store_predictions(store: Store, problem: Problem) -> dict:
    """Compile-only trials with predictions for the CPU's device kind, in a random order of predicted times: the
    fastest of them spills, one of another model version is faster still, so the predicted best is the
    second-fastest of the current model. Returns {"best", "order", "key"}."""
    device = current_device()
    key = compile_key(gpu.NAME, gpu.VERSION, "gpu", device.device_kind, device.jax_version, problem)
    space = Space(gpu, problem, None)
    configs = [c for c in space.valid_configs() if c != space.default]
    chosen = random.sample(configs, 5)
    times = sorted(random.uniform(1e-4, 1e-2) for _ in chosen)
    spill = {"spill_store_bytes": 64, "spill_load_bytes": 64}
    for index, (config, seconds) in enumerate(zip(chosen, times)):
        kernel = {"role": "forward", "name": "fwd", "memory_bytes": random.randint(1, 99999), **(
            spill if index == 0 else {})}
        store.add_trial(key, config=config.to_dict(), status="compiled", compile_s=random.uniform(0.5, 2),
                        figures={"target": "cpu-test", "kernels": [kernel], "prediction": prediction(seconds)})
    store.add_trial(key, config=space.default.to_dict(), status="compiled", compile_s=1.0,
                    figures={"target": "cpu-test", "kernels": [], "prediction": prediction(times[0] / 2, "gpu-0")})
    return {"best": chosen[1].to_dict(), "order": [c.to_dict() for c in chosen], "key": key}


@pytest.fixture(autouse=True)
def fresh_runtime():
    autotune.reload()
    yield
    autotune.reload()


def test_the_ranking_keeps_one_model_version_and_never_picks_a_spilling_config(store):
    stored = store_predictions(store, PROBLEM)
    ranking = rank_trials(stored["key"], store.trials(stored["key"]))
    assert ranking.model_version == GPU_MODEL_VERSION and ranking.other_models == 1
    assert [e.config for e in ranking.entries] == stored["order"]  # by predicted time
    assert ranking.entries[0].spills and ranking.best.config == stored["best"] and ranking.best.rank == 2
    device_key = make_key(gpu, PROBLEM, current_device())
    assert predicted_ranking(store, device_key).best.config == stored["best"]


def test_runtime_runs_the_predicted_best_says_so_once_and_a_measured_best_wins(tmp_path, capsys):
    db = tmp_path / "results.db"
    with Store(db) as store:
        stored = store_predictions(store, PROBLEM)
    autotune.configure(db=str(db), verbose=True)
    try:
        found = autotune.lookup((1, 32, 2, 16), (1, 32, 1, 16), "float32", causal=True)
        assert found.source == "predicted" and found.config.to_dict() == stored["best"]
        assert "predicted" in found.detail and GPU_MODEL_VERSION in found.detail
        assert found.prediction.model_version == GPU_MODEL_VERSION
        keys = jax.random.split(jax.random.key(random.randrange(2**31)), 3)
        q = jax.random.normal(keys[0], (1, 32, 2, 16))
        k, v = (jax.random.normal(key, (1, 32, 1, 16)) for key in keys[1:])
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            call = jax.jit(lambda q, k, v: autotune.flash_attention(q, k, v, causal=True))
            call(q, k, v)
            jax.jit(lambda q, k, v: autotune.flash_attention(q, k, v, causal=True) * 2)(q, k, v)
        said = [str(w.message) for w in record if issubclass(w.category, RuntimeWarning)]
        assert len(said) == 1 and "predicted" in said[0] and "autotune search" in said[0], said
        assert "(predicted: no measured config" in capsys.readouterr().err

        options = SearchOptions(trials=3, seed=random.randrange(1000), sampler="random", timing=FAST,
                                compare_xla=False, retime_top=1)
        with Store(db) as store:
            result = search_problem(PROBLEM, kernel_name="gpu", store=store, device=current_device(),
                                    options=options, progress=False)
            device_key = make_key(gpu, PROBLEM, current_device())
            study = optuna.load_study(study_name=device_key.digest(), storage=store.url)
        first = sorted(study.trials, key=lambda t: t.number)[:2]
        assert first[0].user_attrs["config"] == Space(gpu, PROBLEM, None).default.to_dict()
        assert first[1].user_attrs["config"] == stored["best"]  # the predicted best, enqueued after the default
        ranked = stored["order"]
        expected = (f"#{ranked.index(result.best_config) + 1} of 5" if result.best_config in ranked
                    else "not among the configs predicted: 0 of 5")
        assert result.predicted_rank.endswith(f"{expected} (model {GPU_MODEL_VERSION})"), result.predicted_rank
        autotune.reload()
        measured = autotune.lookup((1, 32, 2, 16), (1, 32, 1, 16), "float32", causal=True)
        assert measured.source == "tuned" and measured.config.to_dict() == result.best_config
    finally:
        autotune.configure()


def test_lookup_refuses_an_unknown_device_kind_and_a_kernel_of_another_platform():
    with pytest.raises(ValueError, match="device_kind must be this machine's .* or a compile target's"):
        autotune.lookup((1, 32, 2, 16), (1, 32, 1, 16), "float32", device_kind="TPU v9")
    with pytest.raises(ValueError, match="kernel 'gpu' does not run on TPU v5 lite"):
        autotune.lookup((1, 32, 2, 16), (1, 32, 1, 16), "float32", device_kind="TPU v5 lite", kernel="gpu")


def test_a_predicted_backward_key_runs_both_directions_and_is_said_once(tmp_path, capsys):
    db = tmp_path / "results.db"
    backward = PROBLEM.replace(backward=True)
    with Store(db) as store:
        stored = store_predictions(store, backward)
    autotune.configure(db=str(db), verbose=True)
    try:
        keys = jax.random.split(jax.random.key(random.randrange(2**31)), 3)
        q = jax.random.normal(keys[0], (1, 32, 2, 16))
        k, v = (jax.random.normal(key, (1, 32, 1, 16)) for key in keys[1:])
        loss = lambda q, k, v: autotune.flash_attention(q, k, v, causal=True).sum()  # noqa: E731
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
        said = [str(w.message) for w in record if issubclass(w.category, RuntimeWarning)]
        assert len(said) == 1 and "predicted" in said[0] and "--backward" in said[0], said
        lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("autotune: ")]
        assert len(lines) == 2 and all("(predicted: " in line for line in lines), lines
        best = stored["best"]
        assert all(f"{name}={best[name]}" in lines[name.startswith("bwd_")] for name in best), (lines, best)
        found = autotune.lookup((1, 32, 2, 16), (1, 32, 1, 16), "float32", causal=True, backward=True)
        assert found.source == "predicted" and found.config.to_dict() == best
    finally:
        autotune.configure()
