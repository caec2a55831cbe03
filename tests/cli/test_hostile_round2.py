"""Hostile input, round 2 (issue 24), at the command line: secrets in URL query parameters, bad compile-only rows,
unrunnable missed keys."""
from __future__ import annotations

import shlex
from types import SimpleNamespace

from click.testing import CliRunner

from autotune.cli.app import main
from autotune.cli.search import print_summary
from db import TuningKey

SECRET = "S3cret"
DEAD_SERVER = f"postgresql://tuner@127.0.0.1:1/autotune?password={SECRET}&sslpassword={SECRET}2"


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_an_unreachable_server_url_is_shown_without_its_query_password() -> None:
    result = invoke("list", "--db", DEAD_SERVER)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert SECRET not in result.output and "password=***" in result.output


def test_the_search_hints_can_be_pasted_and_say_how_to_give_the_password(capsys) -> None:
    key = TuningKey(kernel="k", kernel_version="v", platform="gpu", device_kind="H100", jax_version="0.10.2",
                    batch=1, q_len=128, kv_len=128, heads=2, kv_heads=1, head_dim=32, dtype="float32", causal=True,
                    segments=False, backward=False)
    result = SimpleNamespace(problem=key, key=key, best_config={"block_q": 64}, best_time_s=1e-3,
                             default_time_s=2e-3, speedup=2.0, xla_time_s=None, trials_run=4, trials_failed=0,
                             wall_s=1.0, best_id=7, ahead_of_time=None, budget_met_before=False, stored=True,
                             best_trial_s=None, implementation="pallas", times={"pallas": 1e-3},
                             predicted_rank=None)
    print_summary([result], f"postgresql:///autotune?host=db-host&user=tuner&password={SECRET}")
    out = capsys.readouterr().out
    assert SECRET not in out and "***" not in out
    next_line = next(line for line in out.splitlines() if line.startswith("Next:"))
    db_arg = shlex.split(next_line.split("(")[0])[-1]  # the shell would hand this word to --db
    assert db_arg == "postgresql+psycopg:///autotune?host=db-host&user=tuner"
    assert "autotune.configure(db='postgresql+psycopg:///autotune?host=db-host&user=tuner')" in out
    assert "PGPASSWORD" in out and ".pgpass" in out


def test_search_misses_skips_keys_no_config_can_run_and_tunes_the_others(tmp_path) -> None:
    """Issue 24, item 3: a missed key past the flags' limits (head_dim 2048) or one the kernel refuses (a backward
    whose smallest tiles overflow shared memory) made every `search --misses` exit with a traceback."""
    from autotune.device import current_device
    from autotune.keys import make_key
    from db import Store
    from kernels import Problem, gpu

    db = tmp_path / "misses.db"
    device = current_device()
    small = Problem(batch=1, q_len=16, kv_len=16, heads=1, kv_heads=1, head_dim=16)
    with Store(db) as store:
        for problem in (small.replace(head_dim=2048), small.replace(q_len=64, kv_len=64, head_dim=768, backward=True),
                        small):
            for _ in range(2 if problem is not small else 1):  # the unrunnable ones are the most frequent
                store.record_miss(make_key(gpu, problem, device))
    for _ in range(2):  # and the next run says the same, not a traceback
        result = invoke("search", "--misses", "--trials", "1", "--samples", "3", "--no-xla", "--quiet", "--db", db)
        assert result.exit_code == 0 and "Traceback" not in result.output, result.output
        skipped = sorted(line for line in result.output.splitlines() if line.startswith("Skipping"))
        assert len(skipped) == 2, result.output
        assert "d2048" in skipped[0] and "'head_dim': must be at most" in skipped[0]
        assert "d768" in skipped[1] and "cannot run it: its default config" in skipped[1]
    with Store(db) as store:
        assert store.get_best(make_key(gpu, small, device)) is not None
        assert {key.head_dim for key, _ in store.misses()} == {2048, 768}  # kept: nothing stored is lost


def test_a_search_the_kernel_cannot_run_is_refused_before_anything_is_written(tmp_path) -> None:
    result = invoke("search", "--batch", "1", "--seq-len", "64", "--heads", "1", "--head-dim", "768", "--backward",
                    "--quiet", "--db", tmp_path / "new.db")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "cannot run b1 q64 kv64 h1/1 d768 float32 +bwd: its default config" in result.output
    assert list(tmp_path.iterdir()) == []


def test_show_target_report_and_the_device_search_read_past_bad_compile_rows(tmp_path) -> None:
    """Issue 24, item 2: rows an older version or a hand edit left (figures {"kernels": "x"} or 5, a config
    {"block_q": [1, 2]}) crashed `show --target` and `report` for the whole database, and the device search."""
    import json
    import sqlite3

    import jax

    from autotune.compile.results import ahead_of_time, compile_key
    from autotune.compile.targets import TARGETS
    from db import Store
    from kernels import Problem, gpu
    from tests.db.test_compile_figures import compiled_figures

    db = tmp_path / "old.db"
    problem = Problem(batch=1, q_len=32, kv_len=32, heads=1, kv_heads=1, head_dim=16)
    key = compile_key(gpu.NAME, gpu.VERSION, "gpu", TARGETS["h100"].device_kind, jax.__version__, problem)
    configs = [{**gpu.Config.default(problem, device_kind=None).to_dict(), "block_q": q} for q in (16, 32, 64, 128)]
    with Store(db) as store:
        ids = [store.add_trial(key, config=config, status="compiled", compile_s=1.0, figures=compiled_figures())
               for config in configs]
    connection = sqlite3.connect(db)
    for trial_id, column, value in ((ids[0], "figures", {"kernels": "x"}), (ids[1], "figures", {"kernels": 5}),
                                    (ids[2], "config", {"block_q": [1, 2]})):
        connection.execute(f"UPDATE autotune_trials SET {column} = ? WHERE id = ?", (json.dumps(value), trial_id))
    connection.commit()
    connection.close()
    flags = ["--batch", "1", "--seq-len", "32", "--heads", "1", "--head-dim", "16"]
    shown = invoke("show", "--target", "h100", *flags, "--db", db)
    assert shown.exit_code == 0 and "Traceback" not in shown.output, shown.output
    assert "fwd 52.0 KiB r96" in shown.output  # the good row's figures
    as_json = invoke("show", "--target", "h100", *flags, "--json", "--db", db)
    assert as_json.exit_code == 0 and len(json.loads(as_json.output)["trials"]) == 4
    page = tmp_path / "report.html"
    report = invoke("report", page, "--db", db)
    assert report.exit_code == 0 and "Traceback" not in report.output, report.output
    with Store(db) as store:
        device_key = key.__class__(**{**key.to_dict(), "platform": "gpu"})
        ahead = ahead_of_time(store, device_key)
    assert ahead is not None and ahead.rejected == frozenset() and ahead.spills == frozenset()


def test_a_malformed_database_url_is_bad_input_named_before_anything_is_written(tmp_path, monkeypatch) -> None:
    flags = ["search", "--batch", "1", "--seq-len", "16", "--heads", "1", "--head-dim", "16", "--quiet"]
    monkeypatch.chdir(tmp_path)
    result = invoke(*flags, "--db", f"postgresql://tuner@db-host:port/autotune?password={SECRET}")
    assert result.exit_code == 2 and "--db" in result.output and SECRET not in result.output
    monkeypatch.setenv("AUTOTUNE_DB", "postgresql://tuner@db-host:port/autotune")
    result = invoke(*flags)
    assert result.exit_code == 2 and "$AUTOTUNE_DB: cannot parse the database URL" in result.output
    assert list(tmp_path.iterdir()) == []
