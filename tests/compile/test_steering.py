"""The predictions steer what a compile-only search compiles next (no compiles here: the predictions are written
through the db API, as `search --target` writes them): a key with enough predictions has the sampler's proposals
planned first, a large first run is split in two rounds, and the rounds' summaries add up."""
from __future__ import annotations

import random
from collections import Counter

import jax

from autotune.compile.model.prediction import GPU_MODEL_VERSION
from autotune.compile.ranking import rank_trials
from autotune.compile.results import compile_key
from autotune.compile.search import TargetSummary, first_round, merge_summaries, plan_searches
from autotune.compile.steering import STEER_AFTER, steered_order
from autotune.compile.targets import get_target
from autotune.shapes import ProblemSpec
from autotune.space import Space
from kernels import Problem, gpu

H100 = get_target("h100")
PROBLEM = Problem(batch=1, q_len=64, kv_len=64, heads=2, kv_heads=1, head_dim=32)


def predict(store, configs) -> None:
    key = compile_key(gpu.NAME, gpu.VERSION, "gpu", H100.device_kind, jax.__version__, PROBLEM)
    for config in configs:
        seconds = random.uniform(1e-5, 1e-3)
        store.add_trial(key, config=config.to_dict(), status="compiled", compile_s=1.0, figures={
            "target": "h100", "kernels": [{"role": "forward", "name": "fwd", "memory_bytes": 1024}],
            "prediction": {"seconds": seconds, "roofline_seconds": seconds / 4, "bound": "compute", "parts": {},
                           "model_version": GPU_MODEL_VERSION}})


def steering_plan(store, trials: int):
    [found] = plan_searches([ProblemSpec(PROBLEM)], [H100], store, trials=trials, grid_all=False,
                            seed=random.randrange(1000), jax_version=jax.__version__, steer=True)
    return found


def test_a_large_first_run_is_split_and_the_second_round_is_steered(store):
    first = steering_plan(store, 12)
    assert not first.steered and first.configs[0] == first.space.default  # no predictions yet: random order
    [half] = first_round([first])
    assert half.configs == first.configs[:6] and half.limit == half.recorded + 6
    predict(store, half.configs)  # what the first round's compiles record

    second = steering_plan(store, 12)
    assert second.steered and second.recorded == 6 and len(second.configs) == 6
    done = {str(c) for c in half.configs}
    assert not done & {str(c) for c in second.candidates}
    assert sorted(map(str, second.candidates)) == sorted(str(c) for c in Space(gpu, PROBLEM, H100.device_kind)
                                                         .valid_configs() if str(c) not in done)
    assert first_round([second]) == [second]  # a steered plan is compiled whole

    merged = merge_summaries([TargetSummary(half, 6, 1, Counter(timeout=0), 6.0, 6, 1.5)],
                             [TargetSummary(second, 5, 0, Counter(other=1), 4.0, 5, 1.0)])
    [total] = merged
    assert (total.compiled, total.spilled, total.failed, total.compile_s, total.predicted, total.predict_s) == (
        11, 1, Counter(other=1), 10.0, 11, 2.5)
    assert total.plan.configs == half.configs + second.configs and total.plan.recorded == 0


def test_the_sampler_proposes_from_the_predictions_and_only_after_enough_of_them(store):
    space = Space(gpu, PROBLEM, H100.device_kind)
    valid = space.valid_configs()
    random.shuffle(valid)
    predict(store, valid[:STEER_AFTER - 1])
    key = compile_key(gpu.NAME, gpu.VERSION, "gpu", H100.device_kind, jax.__version__, PROBLEM)
    rest = valid[STEER_AFTER:]
    assert steered_order(space, rank_trials(key, store.trials(key)), rest, 4, 0) == rest  # too few: unchanged
    predict(store, valid[STEER_AFTER - 1:STEER_AFTER])
    ordered = steered_order(space, rank_trials(key, store.trials(key)), rest, 4, random.randrange(1000))
    assert sorted(map(str, ordered)) == sorted(map(str, rest)) and ordered[:4] != rest[:4]
    assert ordered[4:] == [c for c in rest if c not in ordered[:4]]  # the others keep their planned order
