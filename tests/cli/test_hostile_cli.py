"""Hostile and careless input to the command line, the report and the runtime (issue 17).

Flags, shapes entries and settings are bounded before anything is opened; import uses the kernels' rules; the report
escapes every stored value (checked in headless Chromium: no injected script runs); prune without a terminal or
--yes deletes nothing; terminal output holds no control characters; the runtime reads a database it cannot write
and never shows a password; a search marks a killed search's run crashed and replaces a stored best that cannot
run; three quick Ctrl-C's end a search cleanly."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner

import autotune
from autotune.cli.app import main
from autotune.device import current_device
from autotune.keys import make_key
from db import Store, TuningKey
from kernels import Problem, gpu
from tests import toy_kernel

ROOT = Path(__file__).resolve().parents[2]
TOY = "tests.toy_kernel"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
SMALL = ["--batch", "1", "--seq-len", "32", "--heads", "1", "--head-dim", "16"]


def invoke(*args: str, input: str | None = None, env: dict | None = None):
    return CliRunner().invoke(main, [str(a) for a in args], input=input, env=env)


def one_line_error(result) -> str:
    """The command's error, which must be one line with no traceback."""
    assert "Traceback" not in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("Error"), result.output
    return lines[-1]


# -- flags, shapes and settings: refused before anything is opened --------------------------------------------------

@pytest.mark.parametrize("args, named", [
    (["--batch", "1", "--seq-len", "32", "--heads", "1", "--head-dim", "100000"], "'--head-dim'"),
    (["--batch", "9223372036854775807", "--seq-len", "32", "--heads", "1", "--head-dim", "16"], "batch"),
    ([*SMALL, "--segments", "1000"], "segments"),
    ([*SMALL, "--seed", "-5"], "--seed"),
    ([*SMALL, "--seed", "99999999999"], "--seed"),
    ([*SMALL, "--timeout", "nan"], "--timeout"),
    ([*SMALL, "--timeout", "inf"], "--timeout"),
    ([*SMALL, "--trial-timeout", "inf"], "--trial-timeout"),
    ([*SMALL, "--trials", "99999999999"], "--trials"),
])
def test_search_flags_are_bounded_before_anything_is_written(tmp_path: Path, args: list[str], named: str) -> None:
    db = tmp_path / "new.db"
    result = invoke("search", *args, "--kernel", TOY, "--quiet", "--db", db)
    assert result.exit_code == 2, result.output
    assert named in one_line_error(result)
    assert os.listdir(tmp_path) == []


def test_a_shapes_file_is_bounded_like_the_flags(tmp_path: Path) -> None:
    shapes = tmp_path / "shapes.json"
    shapes.write_text(json.dumps([{"batch": 1, "seq_len": 32, "heads": 1, "head_dim": 16},
                                  {"batch": 2**62, "seq_len": 32, "heads": 1, "head_dim": 16}]))
    result = invoke("search", "--shapes", shapes, "--kernel", TOY, "--quiet", "--db", tmp_path / "new.db")
    assert result.exit_code == 2 and "problem 2: field 'batch'" in one_line_error(result)
    assert sorted(os.listdir(tmp_path)) == ["shapes.json"]


@pytest.mark.parametrize("value", ["inf", "nan", "1e300", "-1"])
def test_a_busy_timeout_setting_is_bounded(tmp_path: Path, value: str) -> None:
    result = invoke("search", *SMALL, "--kernel", TOY, "--quiet", "--db", tmp_path / "new.db",
                    env={"AUTOTUNE_DB_BUSY_TIMEOUT": value})
    assert result.exit_code == 2 and "AUTOTUNE_DB_BUSY_TIMEOUT" in one_line_error(result)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("db", ["sqlite:///:memory:", "sqlite://"])
def test_in_memory_database_urls_are_refused(db: str) -> None:
    result = invoke("import", "-", "--db", db, input=json.dumps({"format": "pallas-autotune-results", "version": 1,
                                                                 "exported_at": "2025-01-01T00:00:00", "records": []}))
    assert result.exit_code == 1 and "in-memory SQLite database" in one_line_error(result)


@pytest.mark.parametrize("db", ["mysql://bob:pw-s3cr3t@db.example/r", "oracle://bob:pw-s3cr3t@db/r",
                                "what://bob:pw-s3cr3t@db/r"])
def test_no_command_shows_the_password(tmp_path: Path, db: str) -> None:
    for args in (["list"], ["show", "--id", "1"], ["export", "-"], ["prune", "--kernel", "x", "--yes"],
                 ["report", str(tmp_path / "r.html")]):
        result = invoke(*args, "--db", db)
        assert result.exit_code == 1, result.output
        assert "pw-s3cr3t" not in result.output and "***" in one_line_error(result), result.output


# -- import ---------------------------------------------------------------------------------------------------------

def gpu_document(config: dict | None = None, **key_changes) -> dict:
    problem = Problem(batch=1, q_len=128, kv_len=128, heads=2, kv_heads=1, head_dim=32)
    key = dict(kernel=gpu.NAME, kernel_version=gpu.VERSION, platform="gpu", device_kind="NVIDIA H100 80GB HBM3",
               jax_version="0.10.2", **problem.to_dict())
    key.update(key_changes)
    config = gpu.Config.default(problem, device_kind=None).to_dict() if config is None else config
    return {"format": "pallas-autotune-results", "version": 1, "exported_at": "2025-01-01T00:00:00+00:00",
            "records": [{"key": key, "config": config, "time_s": 1e-3, "default_time_s": 2e-3, "trials": 4,
                         "updated_at": "2025-01-01T00:00:00+00:00"}]}


def test_import_uses_the_kernels_rules(tmp_path: Path) -> None:
    db = tmp_path / "results.db"
    good = gpu_document()["records"][0]["config"]
    for config in ({**good, "block_q": -64}, {**good, "block_q": "64"}, {}, {**good, "colour": 1}):
        result = invoke("import", "-", "--db", db, input=json.dumps(gpu_document(config)))
        assert result.exit_code == 1 and "record 0, field 'config'" in one_line_error(result), result.output
    for text, expected in ((json.dumps(gpu_document(kv_heads=3)), "kv_heads must divide heads"),
                           (json.dumps(gpu_document(dtype="int8")), "dtype"),
                           ("[" * 200_000 + "]" * 200_000, "nested"),
                           ('{"format": 1, "format": 2}', "appears twice"),
                           (json.dumps(gpu_document()).replace('"trials": 4', '"trials": 1e30'), "trials")):
        result = invoke("import", "-", "--db", db, input=text)
        assert result.exit_code == 1 and expected in one_line_error(result), result.output
    assert not db.exists()  # every refusal came before the database was opened
    result = invoke("import", "-", "--db", db, input=json.dumps(gpu_document()))
    assert result.exit_code == 0 and "Imported 1 of 1" in result.output, result.output


# -- reading commands, prune and the terminal ------------------------------------------------------------------------

def hostile_database(path: Path) -> Path:
    """A database a user kernel with string tunables and hostile names could leave behind."""
    problem = Problem(batch=1, q_len=32, kv_len=32, heads=1, kv_heads=1, head_dim=16)
    key = TuningKey(kernel="<img src=x onerror=alert(1)>", kernel_version="v1", platform="gpu",
                    device_kind="<script>document.title='owned'</script>", jax_version="0.10.2",
                    **problem.to_dict())
    script = "<script>document.body.setAttribute('data-owned', 'yes')</script>"
    with Store(path) as store:
        store.put_best(key, config={"block_q": script, "block_k": 32}, time_s=1e-3, default_time_s=2e-3, trials=3)
        store.add_trial(key, config={"block_q": script, "block_k": 32}, status="ok", time_s=1e-3, number=0)
        store.add_trial(key, config={"block_q": 64, "block_k": "</text></svg>" + script}, status="ok", time_s=2e-3,
                        number=1)
        store.add_trial(key, config={"block_q": 16, "block_k": 32}, status="compile_error", number=2,
                        error_class="Boom\x1b[2J", error_message="failed \x1b]0;owned\x07 \x1b[31mred\r\x08 here")
    return path


def test_report_escapes_every_stored_value_and_no_script_runs(tmp_path: Path) -> None:
    db = hostile_database(tmp_path / "hostile.db")
    out = tmp_path / "report.html"
    result = invoke("report", out, "--db", db)
    assert result.exit_code == 0, result.output
    page = out.read_text()
    assert "<script>document" not in page and "<img src" not in page and "</text></svg><script>" not in page
    assert page.count("<script>") == 1  # only the page's own check script
    browser = next((shutil.which(name) for name in BROWSERS if shutil.which(name)), None)
    if browser is None:
        pytest.skip("no Chromium found (apt-get install chromium) to run the page")
    dom = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'p'}",
         "--dump-dom", out.resolve().as_uri()], capture_output=True, text=True, timeout=120, check=True).stdout
    assert 'data-checked="yes"' in dom  # the page's own script ran ...
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert "data-owned" not in body and "<title>Autotuning report</title>" in dom  # ... and nothing injected did
    assert "<img" not in dom and "<script>document" not in dom


def test_terminal_output_holds_no_control_characters(tmp_path: Path) -> None:
    db = hostile_database(tmp_path / "hostile.db")
    best_id = Store(db, read_only=True).bests()[0].id
    for args in (["list"], ["show", "--id", str(best_id)]):
        result = invoke(*args, "--db", db)
        assert result.exit_code == 0, result.output
        assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", result.output), repr(result.output)
    assert "failed" in result.output and "[31mred" in result.output  # the text stays, without its ESC


def test_prune_without_a_terminal_or_yes_deletes_nothing(tmp_path: Path) -> None:
    db = hostile_database(tmp_path / "hostile.db")
    before = db.read_bytes()
    command = [sys.executable, "-m", "autotune", "prune", "--kernel", "<img src=x onerror=alert(1)>", "--db", str(db)]
    closed = subprocess.run(["sh", "-c", 'exec "$@" <&-', "sh", *command], capture_output=True, text=True,
                            cwd=ROOT, timeout=300)
    assert closed.returncode == 1, closed.stderr
    assert "Traceback" not in closed.stderr and "--yes" in closed.stderr.strip().splitlines()[-1], closed.stderr
    assert db.read_bytes() == before


def test_reading_commands_never_write(tmp_path: Path) -> None:
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    for args in (["list"], ["show", "--id", "1"], ["export", "-"], ["report", str(tmp_path / "r.html")],
                 ["prune", "--kernel", "x", "--yes"]):
        result = invoke(*args, "--db", empty)
        assert result.exit_code == 1, result.output
        one_line_error(result)
    assert empty.read_bytes() == b"" and sorted(os.listdir(tmp_path)) == ["empty.db"]


# -- the runtime ----------------------------------------------------------------------------------------------------

def test_the_runtime_hides_passwords_and_never_writes_an_empty_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    for db in ("postgresql://bob:pw-s3cr3t@127.0.0.1:1/results", str(empty)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with autotune.using(db=db, on_miss="heuristic"):
                autotune.reload()
                found = autotune.lookup((1, 32, 1, 16), (1, 32, 1, 16), "float32")
        assert found.source != "tuned"
        text = " ".join(str(w.message) for w in caught) + found.detail  # lookup() only inspects: the why is here
        assert "pw-s3cr3t" not in text, text
    autotune.reload()
    assert empty.read_bytes() == b"" and sorted(os.listdir(tmp_path)) == ["empty.db"]


# -- the search: crashed runs, unusable bests, Ctrl-C ---------------------------------------------------------------

def test_a_search_marks_dead_runs_and_replaces_a_best_that_cannot_run(tmp_path: Path, monkeypatch) -> None:
    db = tmp_path / "results.db"
    device = current_device()
    problem = Problem(batch=1, q_len=32, kv_len=32, heads=1, kv_heads=1, head_dim=16)
    key = make_key(toy_kernel, problem, device)
    with Store(db) as store:
        dead = store.start_run(host="gone", device_kind=device.device_kind, platform=device.platform,
                               jax_version=device.jax_version, arguments={})
        store.put_best(key, config={**toy_kernel.Config.default(problem).to_dict(), "block_q": -64}, time_s=1e-9,
                       default_time_s=None, trials=1)
    connection = sqlite3.connect(db)  # the dead run's last heartbeat, an hour ago
    connection.execute("UPDATE autotune_claims SET heartbeat_at = '2000-01-01 00:00:00.000000' WHERE name = ?",
                       (f"run:{dead}",))
    connection.commit()
    connection.close()
    result = invoke("search", *SMALL, "--kernel", TOY, "--trials", "2", "--samples", "3", "--no-xla", "--quiet",
                    "--seed", "1", "--db", db)
    assert result.exit_code == 0, result.output
    with Store(db, read_only=True) as store:
        runs = {run.id: run.status for run in store.runs()}
        best = store.get_best(key)
    assert runs[dead] == "crashed" and sorted(runs.values()) == ["crashed", "ok"]
    assert best.config["block_q"] > 0 and best.time_s > 1e-9


def test_three_quick_ctrl_c_end_a_search_cleanly(tmp_path: Path) -> None:
    """Ctrl-C while candidates compile in background threads: the later presses land in the shutdown (joining those
    threads), where they used to give tracebacks and a C++ abort."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    child = subprocess.Popen([sys.executable, "-m", "autotune", "search", "--batch", "1", "--seq-len", "64",
                              "--heads", "2", "--head-dim", "32", "--trials", "30", "--no-xla", "--quiet",
                              "--db", str(tmp_path / "r.db")], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in child.stderr:
            if line.startswith("Tuning"):
                break
        time.sleep(3.0)  # compiling by now
        for _ in range(3):
            child.send_signal(signal.SIGINT)
            time.sleep(0.1)
        _, errors = child.communicate(timeout=240)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    assert child.returncode == 130, errors
    assert "Traceback" not in errors and "terminate called" not in errors and "FATAL" not in errors, errors
    with Store(tmp_path / "r.db", read_only=True) as store:
        assert [run.status for run in store.runs()] == ["interrupted"]


def test_a_database_error_raised_while_ctrl_c_unwinds_is_the_interrupt(tmp_path: Path) -> None:
    """Ctrl-C landing in the middle of a commit surfaces as SQLAlchemy's "This transaction is closed" (seen in CI):
    the command must end as interrupted (exit 130), not blame the database; a database error alone still does."""
    import click
    from sqlalchemy.exc import InvalidRequestError

    from autotune.cli.common import database_errors

    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    try:
        with pytest.raises(KeyboardInterrupt):
            with database_errors(store):
                try:
                    raise KeyboardInterrupt
                except KeyboardInterrupt:
                    raise InvalidRequestError("This transaction is closed")
        with pytest.raises(click.ClickException, match="cannot be used: it failed: This transaction is closed"):
            with database_errors(store):
                raise InvalidRequestError("This transaction is closed")
    finally:
        store.close()
