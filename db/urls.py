"""Where the results live: turning a user's URL or plain path into one SQLAlchemy URL string.

The resolved string is handed unchanged to Optuna's RDBStorage by the search, so the tuner's tables and Optuna's
share one database; that is why relative paths are made absolute (both must mean the same file whatever the
working directory) and why a bare `postgresql://` gets the psycopg driver (the only one this project installs).
"""
from __future__ import annotations

import os
import re
import urllib.parse
from pathlib import Path

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

ENV_VAR = "AUTOTUNE_DB"
_POSTGRES_ALIASES = ("postgresql", "postgres")


def default_url() -> str:
    """$AUTOTUNE_DB (a URL or a path) if set, else <cache>/pallas-autotune/results.db in the user's cache dir."""
    configured = os.environ.get(ENV_VAR, "").strip()
    if configured:
        try:
            return resolve_url(configured)
        except ValueError as exc:
            raise ValueError(f"${ENV_VAR}: {exc}") from None
    return resolve_url(_cache_dir() / "pallas-autotune" / "results.db")


def _cache_dir() -> Path:
    """$XDG_CACHE_HOME when it is an absolute path (as the XDG spec asks), else ~/.cache."""
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    if xdg and os.path.isabs(xdg):
        return Path(xdg)
    return Path.home() / ".cache"


def resolve_url(url_or_path: str | os.PathLike[str]) -> str:
    """An SQLAlchemy URL string for a URL (kept, made absolute for SQLite) or a filesystem path (an SQLite file)."""
    if isinstance(url_or_path, os.PathLike):
        return _sqlite_file_url(Path(url_or_path))
    if not isinstance(url_or_path, str):
        raise TypeError(f"a database URL or path must be a string or path, got {type(url_or_path).__name__}")
    text = url_or_path.strip()
    if not text:
        raise ValueError("the database URL or path is empty")
    if "://" not in text:
        return _sqlite_file_url(Path(text))
    try:
        url = make_url(text)
    except (ArgumentError, ValueError) as exc:
        shown = mask_password(text)
        raise ValueError(f"cannot parse the database URL {shown!r}: {mask_password(str(exc))}") from None
    if url.drivername in _POSTGRES_ALIASES:
        url = url.set(drivername="postgresql+psycopg")
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:") \
            and not url.database.startswith("file:"):
        url = url.set(database=str(_absolute(Path(url.database))))
    return url.render_as_string(hide_password=False)


def sqlite_file(url: str, *, uris: bool = False) -> Path | None:
    """The file behind an SQLite URL, or None for an in-memory SQLite database or another backend. A `file:` URI
    (`sqlite:///file:PATH?mode=ro&uri=true`) gives its file only with `uris`: callers that rebuild or open the URL
    themselves must keep such a URI as it is."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    if parsed.database.startswith("file:"):
        if not uris or in_memory(url):
            return None
        return Path(urllib.parse.unquote(urllib.parse.urlsplit(parsed.database).path))
    return Path(parsed.database)


def in_memory(url: str) -> bool:
    """Whether an SQLite URL names an in-memory database (`sqlite://`, `:memory:`, a `mode=memory` URI)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return False
    database = parsed.database or ""
    if database in ("", ":memory:"):
        return True
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(database).query) if database.startswith("file:") else {}
    return database.startswith("file::memory:") or "memory" in query.get("mode", []) or \
        "memory" in parsed.query.get("mode", ())


def display_url(url: str) -> str:
    """The URL for messages: every secret hidden (the password, and secret query parameters such as
    `?password=` or `sslpassword=`), an SQLite file shown as its path. Never raises."""
    try:
        path = sqlite_file(url)
        return str(path) if path is not None else mask_password(make_url(url).render_as_string(hide_password=True))
    except Exception:  # noqa: BLE001 - an unparseable URL is still shown, masked, rather than failing a message
        return mask_password(str(url))


# Query parameters that carry a secret: libpq's `password` and `sslpassword` (its only two), and what other
# drivers call theirs (`passwd`, `pwd`, an access token or secret). `passfile` and `sslkey` name files: not secret.
_SECRET_PARAMETER = re.compile(r"password|passwd|secret|token|^pwd$|^pass$", re.IGNORECASE)
PASSWORD_HINT = ("the password is left out: libpq reads it from $PGPASSWORD or a ~/.pgpass line "
                 "(host:port:database:user:password) when the URL has none")
_USERINFO = re.compile(r"(://[^/@:\s]*:)[^/\s]*@")
_QUERY_PAIR = re.compile(r"([?&;])([^=&;?#\s'\"]+)=([^&;#\s'\"]*)")


def is_secret_parameter(name: str) -> bool:
    """Whether a URL query parameter carries a secret (its name, as given or percent-encoded)."""
    return bool(_SECRET_PARAMETER.search(urllib.parse.unquote_plus(name)))


def mask_password(text: str) -> str:
    """`text` with every URL secret in it replaced by ***: the password of `user:password@`, and the value of each
    secret query parameter (`?password=`, `&sslpassword=`); for messages about URLs that may not parse."""
    text = _USERINFO.sub(r"\1***@", text)
    return _QUERY_PAIR.sub(lambda m: f"{m[1]}{m[2]}=***" if is_secret_parameter(m[2]) and m[3] else m[0], text)


def secrets_of(url: str) -> list[str]:
    """The secrets a URL carries (its password, the values of its secret query parameters); [] if it has none or
    does not parse."""
    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001
        return []
    found = [str(parsed.password)] if parsed.password else []
    for name, value in parsed.query.items():
        if is_secret_parameter(name):
            found += [v for v in ((value,) if isinstance(value, str) else value) if v]
    return found


def scrub(message: str, url: str) -> str:
    """A driver's message with the URL's secrets hidden, wherever the driver may have copied them."""
    for secret in sorted(secrets_of(url), key=len, reverse=True):
        for form in {secret, urllib.parse.quote(secret, safe=""), urllib.parse.quote_plus(secret)}:
            message = message.replace(form, "***")
    return mask_password(message)


def shareable_url(url: str) -> tuple[str, bool]:
    """The URL as a command or snippet to paste can show it: an SQLite file as its path, else the URL without its
    secrets (a `***` in their place could not be pasted), and whether any secret was left out (then say how to
    give it: PASSWORD_HINT)."""
    try:
        path = sqlite_file(url)
        if path is not None:
            return str(path), False
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - not a URL we can take apart: shown masked
        return mask_password(str(url)), True
    secret_names = [name for name in parsed.query if is_secret_parameter(name)]
    if not parsed.password and not secret_names:
        return parsed.render_as_string(hide_password=False), False
    cleared = URL.create(parsed.drivername, username=parsed.username, host=parsed.host, port=parsed.port,
                         database=parsed.database, query=parsed.difference_update_query(secret_names).query)
    return cleared.render_as_string(hide_password=False), True


def _absolute(path: Path) -> Path:
    return Path(os.path.abspath(path.expanduser()))


def _sqlite_file_url(path: Path) -> str:
    return URL.create("sqlite", database=str(_absolute(path))).render_as_string(hide_password=False)
