"""What the runtime says (issue 25): the opt-in log of each kernel call's key, config and source, forward and backward;
`lookup()` that only inspects; one warning when jax.grad runs an untuned backward beside a tuned forward; every
warning at the user's own line, under a mesh and Flax NNX too."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest

import autotune
from autotune.device import current_device
from autotune.keys import make_key
from db import Store
from kernels import Problem, gpu

ROOT = Path(__file__).resolve().parents[2]


def random_problem(seed: int, **changes) -> Problem:
    rng = np.random.default_rng(seed)
    kv_heads = int(rng.choice([1, 2]))
    return Problem(batch=1, q_len=32, kv_len=32, heads=2 * kv_heads, kv_heads=kv_heads, head_dim=16, **changes)


def inputs(problem: Problem, seed: int):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (problem.batch, problem.q_len, problem.heads, problem.head_dim))
    k, v = (jax.random.normal(key, (problem.batch, problem.kv_len, problem.kv_heads, problem.head_dim))
            for key in keys[1:])
    return q, k, v


def store_best(db: Path, problem: Problem) -> dict:
    """A stored best for the problem (the default config, valid by construction): what a search would leave."""
    config = gpu.Config.default(problem).to_dict()
    with Store(db) as store:
        store.put_best(make_key(gpu, problem, current_device()), config=config, time_s=1e-3, default_time_s=1e-3,
                       trials=1)
    return config


def runtime_warnings(record) -> list:
    return [w for w in record if issubclass(w.category, RuntimeWarning)]


@pytest.fixture(autouse=True)
def fresh_runtime(monkeypatch):
    monkeypatch.delenv("AUTOTUNE_VERBOSE", raising=False)
    autotune.reload()
    yield
    autotune.reload()


def test_lookup_only_inspects(tmp_path: Path):
    db = tmp_path / "r.db"
    Store(db).close()
    problem = random_problem(seed=np.random.SeedSequence().entropy % 1000)
    q, k, v = inputs(problem, 0)
    with autotune.using(db=str(db)), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        found = autotune.lookup(q.shape, k.shape, q.dtype)
        found_again = autotune.lookup(q.shape, k.shape, q.dtype)
    assert found.source == found_again.source == "heuristic" and "no tuned config" in found.detail
    assert not runtime_warnings(record)
    with Store(db) as store:
        assert store.misses() == []
    with autotune.using(db=str(db)), pytest.warns(RuntimeWarning, match="no tuned config"):
        autotune.flash_attention(q, k, v)  # the call itself counts and warns
    with Store(db) as store:
        assert [(key.q_len, count) for key, count in store.misses()] == [(32, 1)]


def test_the_verbose_log_names_each_calls_config_and_source(tmp_path: Path, capsys):
    db = tmp_path / "r.db"
    tuned = random_problem(seed=1, causal=True)
    config = store_best(db, tuned)
    q, k, v = inputs(tuned, 1)
    autotune.configure(db=str(db), verbose=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            line = sys._getframe().f_lineno + 1
            jax.jit(lambda q: autotune.flash_attention(q, k, v, causal=True))(q)
            autotune.flash_attention(q, k, v)
    finally:
        autotune.configure()  # back to the environment's defaults
    first, second = capsys.readouterr().err.splitlines()[-2:]
    forward_fields = " ".join(f"{name}={config[name]}" for name in sorted(config) if not name.startswith("bwd_"))
    assert first.startswith(f"autotune: forward  b1 q32 kv32 h{tuned.heads}/{tuned.kv_heads} d16 float32 causal ")
    assert first.endswith(f"-> {forward_fields} (tuned) at {__file__}:{line}")
    assert second.endswith(f"(heuristic: no tuned config for this problem on {current_device().device_kind}) at "
                           f"{__file__}:{line + 1}")
    assert "causal" not in second.split("[")[0] and "bwd_" not in first and "bwd_" not in second


def test_the_verbose_switch_is_read_from_the_environment(tmp_path: Path, monkeypatch, capsys):
    db = tmp_path / "r.db"
    Store(db).close()
    problem = random_problem(seed=2)
    q, k, v = inputs(problem, 2)
    monkeypatch.setenv("AUTOTUNE_VERBOSE", "1")
    with autotune.using(db=str(db)), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        autotune.flash_attention(q, k, v)
    assert "autotune: forward " in capsys.readouterr().err
    monkeypatch.setenv("AUTOTUNE_VERBOSE", "loud")
    with pytest.raises(ValueError, match=r"\$AUTOTUNE_VERBOSE must be 1 or 0"):
        autotune.configure(db=str(db))


def test_an_untuned_backward_beside_a_tuned_forward_warns_once_at_the_grad_line(tmp_path: Path, capsys):
    db = tmp_path / "r.db"
    problem = random_problem(seed=3, causal=True)
    store_best(db, problem)
    q, k, v = inputs(problem, 3)

    def loss(q):
        return autotune.flash_attention(q, k, v, causal=True).sum()

    with autotune.using(db=str(db), verbose=True), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        line = sys._getframe().f_lineno + 1
        jax.grad(loss)(q)
        jax.jit(jax.grad(loss))(q)  # traced again: no second warning
    [warning] = runtime_warnings(record)
    assert (warning.filename, warning.lineno) == (__file__, line)
    assert "its backward is not" in str(warning.message)
    assert str(warning.message).endswith(f"--causal --backward --db {db}")
    backward_lines = [text for text in capsys.readouterr().err.splitlines() if text.startswith("autotune: backward")]
    assert len(backward_lines) == 2 and "+bwd" in backward_lines[0] and "bwd_block_q=" in backward_lines[0]
    assert "(heuristic: no backward tuned" in backward_lines[0] and backward_lines[0].endswith(f":{line}")
    with Store(db) as store:  # the backward key is counted as missed, so `search --misses` tunes it
        assert [(key.backward, count) for key, count in store.misses()] == [(True, 1)]


def test_a_tuned_backward_is_logged_as_tuned_and_does_not_warn(tmp_path: Path, capsys):
    db = tmp_path / "r.db"
    problem = random_problem(seed=4)
    store_best(db, problem)
    store_best(db, problem.replace(backward=True))
    q, k, v = inputs(problem, 4)
    with autotune.using(db=str(db), verbose=True), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        jax.grad(lambda q: autotune.flash_attention(q, k, v).sum())(q)
    assert not runtime_warnings(record)
    [backward] = [text for text in capsys.readouterr().err.splitlines() if text.startswith("autotune: backward")]
    assert "+bwd" in backward and "(tuned)" in backward


MESH_SCRIPT = textwrap.dedent("""
    import json, sys, warnings
    import jax, jax.numpy as jnp
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    import autotune
    from db import Store

    Store(sys.argv[1]).close()
    autotune.configure(db=sys.argv[1])
    mesh = jax.make_mesh((2,), ("data",), axis_types=(AxisType.Explicit,))
    q = jax.device_put(jax.random.normal(jax.random.key(0), (2, 32, 2, 16)), NamedSharding(mesh, P("data")))
    k = jax.device_put(jax.random.normal(jax.random.key(1), (2, 32, 1, 16)), NamedSharding(mesh, P("data")))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        jax.jit(lambda q, k: autotune.dot_product_attention(q, k, k, is_causal=True))(q, k)  # LINE
    print(json.dumps([(w.filename, w.lineno, str(w.message)) for w in record]))
""")


@pytest.mark.slow  # a child process: the device count is fixed when jax starts
def test_a_warning_under_a_mesh_points_at_the_users_line(tmp_path: Path):
    script = tmp_path / "model.py"
    script.write_text(MESH_SCRIPT)
    line = MESH_SCRIPT.splitlines().index(next(t for t in MESH_SCRIPT.splitlines() if t.endswith("# LINE"))) + 1
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "PYTHONPATH": str(ROOT),
           "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, str(script), str(tmp_path / "r.db")], capture_output=True, text=True,
                         env=env, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    [(filename, lineno, message)] = json.loads(run.stdout.splitlines()[-1])
    assert (filename, lineno) == (str(script), line), message
    assert "no tuned config" in message and "--batch 1 --seq-len 32" in message  # the per-device shape


def test_a_warning_under_flax_nnx_points_at_the_users_line(tmp_path: Path):
    nnx = pytest.importorskip("flax.nnx", reason="Flax is not installed: pip install -e '.[flax]'")
    db = tmp_path / "r.db"
    Store(db).close()
    layer = nnx.MultiHeadAttention(num_heads=2, in_features=8, qkv_features=16, decode=False, rngs=nnx.Rngs(0),
                                   attention_fn=autotune.nnx.attention_fn)
    x = jax.random.normal(jax.random.key(5), (1, 32, 8))
    with autotune.using(db=str(db)), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        line = sys._getframe().f_lineno + 1
        layer(x, is_causal=True)
    [warning] = runtime_warnings(record)
    assert (warning.filename, warning.lineno) == (__file__, line), warning
