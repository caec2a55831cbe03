"""Shared pytest fixtures."""
from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

import kernels.environment  # noqa: F401  (before any test module imports jax: quiet optional compilers on a CPU)
from db import Store

try:
    from tests.pg_server import PostgresUnavailable, start_postgres
    from tests.worker_procs import stop_workers
except ModuleNotFoundError:  # tests/ without __init__.py: pytest puts tests/ itself on sys.path
    from pg_server import PostgresUnavailable, start_postgres
    from worker_procs import stop_workers


@pytest.fixture(autouse=True)
def no_worker_outlives_its_test() -> Iterator[None]:
    """Worker processes a failed test left running are killed, so they cannot hold a database or a core."""
    yield
    stop_workers()


@pytest.fixture
def store(tmp_path):
    """A fresh results database in the test's folder, closed after the test."""
    opened = Store(tmp_path / "results.db")
    yield opened
    opened.close()


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """An SQLAlchemy URL of a PostgreSQL database: $AUTOTUNE_TEST_PG_URL, or a throwaway server for the session."""
    pytest.importorskip("psycopg", reason="the PostgreSQL driver is not installed: pip install -e '.[postgres]'")
    given = os.environ.get("AUTOTUNE_TEST_PG_URL", "").strip()
    if given:
        yield given
        return
    try:
        server = start_postgres()
    except PostgresUnavailable as exc:
        pytest.skip(f"no PostgreSQL server could be started (set AUTOTUNE_TEST_PG_URL to use one): {exc}")
    try:
        yield server.url
    finally:
        server.stop()
