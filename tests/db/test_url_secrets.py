"""A secret in a database URL is never shown (issue 24, item 1): the `user:password@` form and libpq's query
parameters (`?password=`, `sslpassword=`), in messages, in driver errors, and in the hints a user pastes."""
from __future__ import annotations

import pytest

from db.urls import PASSWORD_HINT, display_url, mask_password, resolve_url, scrub, shareable_url

SECRET = "S3cret"
URLS = [
    f"postgresql://tuner@db-host/autotune?password={SECRET}",
    f"postgresql:///autotune?host=db-host&user=tuner&password={SECRET}",
    f"postgresql://tuner:{SECRET}@db-host/autotune?sslmode=require&sslpassword={SECRET}x",
    f"postgresql://tuner@db-host/autotune?PASSWORD={SECRET}&application_name=x",
]


@pytest.mark.parametrize("url", URLS)
def test_query_secrets_are_masked_in_every_shown_form(url: str) -> None:
    resolved = resolve_url(url)
    for shown in (display_url(resolved), display_url(url), mask_password(url), mask_password(resolved)):
        assert SECRET not in shown and "***" in shown, shown
    assert "db-host" in display_url(resolved) or "host=db-host" in display_url(resolved)
    message = f"connection failed: {url} (password {SECRET}x, quoted {SECRET}x)"
    assert SECRET not in scrub(message, resolved)


def test_files_and_harmless_parameters_are_kept() -> None:
    url = resolve_url("postgresql://tuner@db-host/autotune?sslkey=/keys/client.key&passfile=/home/t/.pgpass")
    assert display_url(url) == url  # paths to key files are not secrets
    assert mask_password("see https://example.com/?q=password") == "see https://example.com/?q=password"


@pytest.mark.parametrize("url", URLS)
def test_the_pasteable_form_leaves_the_secret_out_and_still_connects_to_the_same_place(url: str) -> None:
    from sqlalchemy.engine import make_url

    shown, left_out = shareable_url(resolve_url(url))
    assert left_out and SECRET not in shown and "***" not in shown
    before, after = make_url(resolve_url(url)), make_url(shown)
    assert (after.host, after.database, after.username) == (before.host, before.database, before.username)
    assert after.password is None and not any("password" in name.lower() for name in after.query)
    assert "PGPASSWORD" in PASSWORD_HINT and ".pgpass" in PASSWORD_HINT


def test_a_url_without_secrets_is_pasted_as_it_is() -> None:
    url = resolve_url("postgresql://tuner@db-host/autotune?sslmode=require")
    assert shareable_url(url) == (url, False)
    assert shareable_url(resolve_url("/tmp/x/results.db")) == ("/tmp/x/results.db", False)
