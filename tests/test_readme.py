"""The README's code runs as written: the main job of its set-up, then every ```python block, in order.

A new user pastes them one after the other into a fresh home directory: the main job's search writes the default
database, and the snippets must then find what it tuned (`source='tuned'`). Each block runs in its own Python
process, exactly as the README spells it; a line whose comment says `# prints: TEXT` must print TEXT.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"^```python\n(.*?)^```", README, flags=re.S | re.M)
PRINTS = re.compile(r"#\s*prints:\s*(.+?)\s*$", flags=re.M)

pytestmark = pytest.mark.slow


def main_job() -> list[str]:
    """The `autotune search ...` of the README's set-up (its first shell block), as an argument list."""
    setup = README.split("## Set-up", 1)[1]
    block = re.search(r"^```sh\n(.*?)^```", setup, flags=re.S | re.M).group(1)
    found = re.search(r"(?:^|&&\s*)(autotune search [^\n]*)", block, flags=re.M)
    assert found, f"no `autotune search` command in the README's set-up block:\n{block}"
    return shlex.split(found.group(1))


def headed(block: str) -> str:
    """The README section a block sits in, to name its test."""
    before = README[:README.index(block)]
    return re.findall(r"^## (.+)$", before, flags=re.M)[-1].lower().replace(" ", "-")


@pytest.fixture(scope="module")
def new_user(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A fresh home and working directory where the main job has run (the default database is in its cache)."""
    home = tmp_path_factory.mktemp("home")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTOTUNE_", "XDG_"))}
    env.update(HOME=str(home), PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    command = main_job()
    run = subprocess.run([sys.executable, "-m", "autotune", *command[1:]], cwd=home, env=env, capture_output=True,
                         text=True, timeout=500)
    assert run.returncode == 0, f"{shlex.join(command)} failed:\n{run.stdout}\n{run.stderr}"
    assert (home / ".cache" / "pallas-autotune" / "results.db").is_file()
    return home, env


def test_the_readme_has_the_snippets_it_promises():
    assert len(PYTHON_BLOCKS) >= 2
    assert any("source" in block and "# prints: tuned" in block for block in PYTHON_BLOCKS)
    assert main_job()[:2] == ["autotune", "search"]


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[headed(b) for b in PYTHON_BLOCKS])
def test_python_block_runs_as_written(new_user, block):
    home, env = new_user
    run = subprocess.run([sys.executable, "-c", block], cwd=home, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, f"the block failed:\n{block}\n{run.stdout}\n{run.stderr}"
    printed = run.stdout.splitlines()
    expected = PRINTS.findall(block)
    assert len(printed) == len(expected), (printed, expected)
    for line, text in zip(printed, expected):
        assert line == text or line.startswith(text + " "), f"printed {line!r}, the README says {text!r}"
