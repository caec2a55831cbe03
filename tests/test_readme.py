"""The README's code runs as written, block by block, as a new user pastes it into a fresh home directory.

- The main job of its set-up (the first `autotune search` of the set-up's first shell block) runs first and writes
  the default database; every later block may use what it tuned.
- ```python blocks run in order, each in its own process; a line whose comment says `# prints: TEXT` must print
  TEXT (`...` inside TEXT stands for anything), and `# warns: TEXT` names a warning it must print on stderr (one
  it does not name fails it).
- ```console blocks run in order, command by command, and must print what the README shows (tests/readme_blocks.py
  says how outputs are compared).
- ```sh blocks name real commands: every `autotune` command parses with the CLI's own flags and types, the test
  command is the one `.ci/run` runs, installs name extras the project has, files named exist.
- ```toml blocks are shapes files the search accepts; ```text blocks show messages the code prints (the literal
  part of each line is in the code).
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.readme_blocks import (KINDS, README, REPO, blocks, console_steps, literal_fragment, matches,
                                 pieces_printed, shell_commands, source_literals)

BLOCKS = blocks()
PYTHON_BLOCKS = [b for b in BLOCKS if b.kind == "python"]
PRINTS = re.compile(r"#\s*prints:\s*(.+?)\s*$", flags=re.M)
WARNS = re.compile(r"#\s*warns:\s*(.+?)\s*$", flags=re.M)

pytestmark = pytest.mark.slow


def main_job() -> list[str]:
    """The `autotune search ...` of the README's set-up (its first shell block), as an argument list."""
    setup = README.split("## Set-up", 1)[1]
    block = re.search(r"^```sh\n(.*?)^```", setup, flags=re.S | re.M).group(1)
    found = re.search(r"(?:^|&&\s*)(autotune search [^\n]*)", block, flags=re.M)
    assert found, f"no `autotune search` command in the README's set-up block:\n{block}"
    return shlex.split(found.group(1))


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
    assert "Pallas kernels run in interpret mode on this CPU" in run.stderr  # what a CPU search says first
    return home, env


def test_the_readme_has_the_blocks_it_promises():
    assert len(PYTHON_BLOCKS) >= 2
    assert any("source" in b.body and "# prints: tuned" in b.body for b in PYTHON_BLOCKS)
    assert main_job()[:2] == ["autotune", "search"]
    unknown = sorted({b.kind for b in BLOCKS} - set(KINDS))
    assert not unknown, f"README blocks of a kind no test covers: {unknown} (give them a kind of {KINDS})"


# ---------------------------------------------------------------- python


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[b.name for b in PYTHON_BLOCKS])
def test_python_block_runs_as_written(new_user, block):
    home, env = new_user
    run = subprocess.run([sys.executable, "-c", block.body], cwd=home, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, f"the block failed:\n{block.body}\n{run.stdout}\n{run.stderr}"
    printed = run.stdout.splitlines()
    expected = PRINTS.findall(block.body)
    assert len(printed) == len(expected), (printed, expected)
    for line, text in zip(printed, expected):
        pattern = ".*".join(re.escape(part) for part in text.split("..."))
        assert re.fullmatch(pattern, line), f"printed {line!r}, the README says {text!r}"
    warned = [line for line in run.stderr.splitlines() if "Warning:" in line]
    announced = WARNS.findall(block.body)
    assert len(warned) == len(announced), f"warnings printed {warned}, the README shows {announced}"
    for line, text in zip(warned, announced):
        assert text in line, f"warned {line!r}, the README shows {text!r}"


# ---------------------------------------------------------------- console


def run_console(command: str, home: Path, env: dict[str, str]) -> list[str]:
    """The lines a console command prints (stdout and stderr, as a terminal shows them). `autotune ...` runs in
    this process (fast: no jax import per command); a pipe into python3 or head, and `; echo "exit $?"`, as a shell
    would."""
    from autotune.cli.app import main

    show_exit = command.endswith('; echo "exit $?"')
    command = command.removesuffix('; echo "exit $?"')
    stages = [part.strip() for part in command.split(" | ")]
    words = shlex.split(stages[0])
    assert words[0] == "autotune", f"console blocks run autotune commands, not {stages[0]!r}"
    runner = CliRunner(env={**{k: None for k in os.environ if k.startswith(("AUTOTUNE_", "XDG_"))},
                            "HOME": str(home)})
    cwd = os.getcwd()
    os.chdir(home)
    try:
        result = runner.invoke(main, words[1:], input="y\n" if "prune" in words and "--yes" not in words else None)
    finally:
        os.chdir(cwd)
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.output
    text = result.output
    for stage in stages[1:]:
        text = subprocess.run(stage, shell=True, input=text, capture_output=True, text=True, cwd=home, env=env,
                              timeout=60, check=True).stdout
    lines = text.splitlines()
    return lines + ([f"exit {result.exit_code}"] if show_exit else [])


def test_console_blocks_print_what_the_readme_shows(new_user):
    from autotune.compile.pool import INSTALL_HINT, compilers_missing

    if compilers_missing("gpu"):  # the outputs follow the CPU set-up, compile-only search included
        pytest.skip(f"the README's console blocks follow the CPU set-up, which has the compilers ({INSTALL_HINT})")
    home, env = new_user
    for block in [b for b in BLOCKS if b.kind == "console"]:
        for step in console_steps(block.body):
            actual = run_console(step.command, home, env)
            assert matches(actual, step.expected), (
                f"[{block.section}] $ {step.command}\nprinted:\n" + "\n".join(actual)
                + "\nthe README shows:\n" + "\n".join(step.expected))


# ---------------------------------------------------------------- sh, toml, text


def test_shell_blocks_name_real_commands_flags_and_files(tmp_path, monkeypatch):
    from autotune.cli.app import main

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    extras = set(pyproject["project"]["optional-dependencies"])
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    shapes = next(b for b in BLOCKS if b.kind == "toml").body
    (tmp_path / "shapes.toml").write_text(shapes)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DB", "postgresql+psycopg://tuner@db-host/autotune")
    tests = []
    for block in [b for b in BLOCKS if b.kind == "sh"]:
        for command in shell_commands(block.body):
            words = shlex.split(command)
            where = f"[{block.section}] {command}"
            if words[0] == "autotune":
                sub = main.get_command(None, words[1])
                assert sub is not None, f"{where}: no command {words[1]!r}"
                args = [w.replace("$DB", os.environ["DB"]) for w in words[2:]]
                sub.make_context(words[1], args)  # parses every flag with its type: a wrong one raises
            elif words[:3] == ["python3", "-m", "pytest"]:
                tests.append(command)
            elif words[:4] == ["python3", "-m", "pip", "install"] or words[:2] == ["pip", "install"]:
                for spec in words[words.index("install") + 1:]:
                    named = re.fullmatch(r"-e|\.\[([\w,]+)\]", spec)
                    if named and named.group(1):
                        assert set(named.group(1).split(",")) <= extras, f"{where}: no such extra"
            elif words[0] in ("python3", "bash"):
                assert (REPO / words[1]).is_file() or words[1] == "-m", f"{where}: no file {words[1]}"
            else:
                assert words[0] in (".", "optuna-dashboard", "createdb"), f"{where}: a command no test covers"
    assert tests and tests[0] == ci, f"the README's test command {tests[:1]} is not what .ci/run runs ({ci})"


def test_the_toml_blocks_are_shapes_files_the_search_accepts(tmp_path):
    from autotune.shapes import load_shapes

    for block in [b for b in BLOCKS if b.kind == "toml"]:
        path = tmp_path / "shapes.toml"
        path.write_text(block.body)
        assert load_shapes(path), block.body


def test_text_blocks_show_what_the_code_prints():
    literals = source_literals()
    for block in [b for b in BLOCKS if b.kind == "text"]:
        for line in block.body.splitlines():
            if line.startswith("$ "):  # a command typed, not printed
                continue
            fragment = literal_fragment(line)
            if len(fragment) < 20:
                continue
            assert pieces_printed(fragment, literals), (
                f"[{block.section}] {line!r}: {fragment!r} is printed by no code of autotune/, db/ or kernels/")
