"""Hostile input, round 2 (issue 24), at runtime: a password in the URL's query, misses the kernels refuse, misses
kept apart from the calls the kernels could not run, malformed settings."""
from __future__ import annotations

import shlex
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import autotune
from db import Store

SECRET = "S3cret"


@pytest.fixture(autouse=True)
def fresh_runtime():
    autotune.reload()
    yield
    autotune.configure()  # the default database and policy again: no later test sees this one's settings
    autotune.reload()


def caught(call) -> list[str]:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        call()
    return [str(w.message) for w in record if issubclass(w.category, RuntimeWarning)]


def test_a_query_password_is_masked_in_the_warning_and_its_command_can_be_pasted() -> None:
    autotune.configure(db=f"postgresql://tuner@127.0.0.1:1/autotune?password={SECRET}")
    q = jax.random.normal(jax.random.key(int(np.random.default_rng().integers(1 << 30))), (1, 16, 1, 16))
    [message] = caught(lambda: autotune.flash_attention(q, q, q))  # a kernel call warns; lookup() only inspects
    assert SECRET not in message and "password=***" in message  # where it failed: the URL, masked
    command = message.split("Tune it with: ")[1].split(" (the password")[0]
    words = shlex.split(command)
    assert words[words.index("--db") + 1] == "postgresql+psycopg://tuner@127.0.0.1:1/autotune"
    assert "PGPASSWORD" in message


def test_a_bias_call_does_not_hide_the_tunable_misses_of_its_key(tmp_path) -> None:
    from autotune.cli.search import missed_specs
    from autotune.device import current_device
    from kernels import gpu

    db = tmp_path / "misses.db"
    Store(db).close()
    q = k = v = jnp.ones((1, 24, 2, 16))
    bias = jnp.zeros((1, 2, 24, 24))
    with autotune.using(db=db):
        caught(lambda: autotune.dot_product_attention(q, k, v, bias=bias))
        caught(lambda: autotune.dot_product_attention(q, k, v))
    autotune.reload()
    with autotune.using(db=db):
        caught(lambda: autotune.dot_product_attention(q, k, v))  # another process's plain miss of the same key
    with Store(db) as store:
        [record] = store.miss_records()
        assert (record.count, record.fallbacks) == (2, 1) and record.reason.startswith("bias is given")
        [spec] = missed_specs(store, gpu, current_device())
    assert (spec.problem.q_len, spec.problem.heads, spec.problem.head_dim) == (24, 2, 16)


@pytest.mark.parametrize("value", ["abc", "0", "-3", "2.5", "1e3", "99999999", "８"])
def test_a_malformed_tune_trials_is_named_before_any_miss_is_recorded(tmp_path, monkeypatch, value: str) -> None:
    db = tmp_path / "settings.db"
    Store(db).close()
    monkeypatch.setenv("AUTOTUNE_ON_MISS", "tune")
    monkeypatch.setenv("AUTOTUNE_TUNE_TRIALS", value)
    q = jnp.ones((1, 16, 1, 16))
    with pytest.raises(ValueError, match=r"^\$AUTOTUNE_TUNE_TRIALS must be a whole number of trials from 1 to "):
        with autotune.using(db=db):
            autotune.flash_attention(q, q, q)
    with Store(db) as store:
        assert store.miss_records() == []


def test_every_runtime_variable_is_read_through_the_settings_and_named(monkeypatch) -> None:
    from autotune import settings

    monkeypatch.setenv("AUTOTUNE_TUNE_TRIALS", " 12 ")
    assert settings.tune_trials() == 12
    monkeypatch.delenv("AUTOTUNE_TUNE_TRIALS")
    assert settings.tune_trials() == settings.DEFAULT_TUNE_TRIALS
    monkeypatch.setenv("AUTOTUNE_ON_MISS", "sometimes")
    autotune.reload()  # the environment is read again
    with pytest.raises(ValueError, match=r"^\$AUTOTUNE_ON_MISS must be one of heuristic, nearest, error, tune"):
        autotune.lookup((1, 16, 1, 16), (1, 16, 1, 16), "float32")
    monkeypatch.setenv("AUTOTUNE_ON_MISS", "")
    monkeypatch.setenv("AUTOTUNE_DB", "postgresql://tuner@db-host:port/autotune")
    autotune.reload()
    with pytest.raises(ValueError, match=r"^\$AUTOTUNE_DB: cannot parse the database URL"):
        autotune.lookup((1, 16, 1, 16), (1, 16, 1, 16), "float32")


def test_a_call_no_config_can_run_is_refused_without_recording_a_miss(tmp_path) -> None:
    db = tmp_path / "refused.db"
    Store(db).close()
    q = jnp.ones((1, 16, 1, 2048))
    with autotune.using(db=db):
        with pytest.raises(ValueError, match="cannot run"):
            autotune.flash_attention(q, q, q)
        found = autotune.lookup(q.shape, q.shape, q.dtype)
    assert found.source == "heuristic" and "shared memory" in found.detail
    with Store(db) as store:
        assert store.miss_records() == []  # `search --misses` would only stumble on it
