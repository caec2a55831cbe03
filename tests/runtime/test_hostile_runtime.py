"""Hostile input, round 2 (issue 24), at runtime: a password in the URL's query, misses the kernels refuse, misses
kept apart from the calls the kernels could not run, malformed settings."""
from __future__ import annotations

import shlex
import warnings

import jax.numpy as jnp
import pytest

import autotune
from db import Store

SECRET = "S3cret"


@pytest.fixture(autouse=True)
def fresh_runtime():
    autotune.reload()
    yield
    autotune.reload()


def caught(call) -> list[str]:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        call()
    return [str(w.message) for w in record if issubclass(w.category, RuntimeWarning)]


def test_a_query_password_is_masked_in_the_warning_and_its_command_can_be_pasted() -> None:
    autotune.configure(db=f"postgresql://tuner@127.0.0.1:1/autotune?password={SECRET}")
    [message] = caught(lambda: autotune.lookup((1, 16, 1, 16), (1, 16, 1, 16), "float32"))
    assert SECRET not in message and "password=***" in message  # where it failed: the URL, masked
    command = message.split("Tune it with: ")[1].split(" (the password")[0]
    words = shlex.split(command)
    assert words[words.index("--db") + 1] == "postgresql+psycopg://tuner@127.0.0.1:1/autotune"
    assert "PGPASSWORD" in message
