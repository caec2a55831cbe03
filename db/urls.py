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
        return resolve_url(configured)
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
    """The URL for messages: the password hidden, an SQLite file shown as its path. Never raises."""
    try:
        path = sqlite_file(url)
        return str(path) if path is not None else make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparseable URL is still shown, masked, rather than failing a message
        return mask_password(str(url))


_USERINFO = re.compile(r"(://[^/@:\s]*:)[^/\s]*@")


def mask_password(text: str) -> str:
    """`text` with the password of every URL in it replaced by ***, for messages about URLs that may not parse."""
    return _USERINFO.sub(r"\1***@", text)


def scrub(message: str, url: str) -> str:
    """A driver's message with the URL's password hidden, wherever the driver may have copied it."""
    try:
        password = make_url(url).password
    except Exception:  # noqa: BLE001
        password = None
    if password:
        message = message.replace(str(password), "***")
        message = message.replace(urllib.parse.quote(str(password), safe=""), "***")
    return mask_password(message)


def _absolute(path: Path) -> Path:
    return Path(os.path.abspath(path.expanduser()))


def _sqlite_file_url(path: Path) -> str:
    return URL.create("sqlite", database=str(_absolute(path))).render_as_string(hide_password=False)
