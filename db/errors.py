"""Errors the results database raises on purpose.

Every refusal to open or change a database is a `DatabaseError`, so the CLI can print one clear line instead of a
traceback; each subclass names the file or URL and what was found there, because "which file?" is the first thing
a user asks.
"""
from __future__ import annotations


class DatabaseError(Exception):
    """Base of the user-facing database errors."""


class SchemaTooNewError(DatabaseError):
    """The database was written by a newer pallas-autotune; opening it here could corrupt it."""


class NotADatabaseError(DatabaseError):
    """The path holds something that is not an SQLite database (a text file, random bytes, a directory)."""


class ForeignDatabaseError(DatabaseError):
    """A real database, but another program's: it has tables that are neither ours nor Optuna's."""


class ImportValidationError(DatabaseError):
    """An import document is malformed; the message names the record index and the field."""
