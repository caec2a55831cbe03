"""Kernel versions: a short hash of a kernel's own source files.

A tuned config is only trusted for the exact kernel it was measured on; hashing the source makes any edit of the
kernel a new version, so the runtime treats old results as misses instead of silently reusing them.
"""
from __future__ import annotations

import hashlib
from pathlib import Path


def source_version(*paths: str | Path) -> str:
    """12 hex digits of the SHA-256 of the given files (directories: their *.py files, sorted by name)."""
    files: list[Path] = []
    for path in map(Path, paths):
        files.extend(sorted(path.glob("*.py")) if path.is_dir() else [path])
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()[:12]
