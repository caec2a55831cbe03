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
                             best_trial_s=None)
    print_summary([result], f"postgresql:///autotune?host=db-host&user=tuner&password={SECRET}")
    out = capsys.readouterr().out
    assert SECRET not in out and "***" not in out
    next_line = next(line for line in out.splitlines() if line.startswith("Next:"))
    db_arg = shlex.split(next_line.split("(")[0])[-1]  # the shell would hand this word to --db
    assert db_arg == "postgresql+psycopg:///autotune?host=db-host&user=tuner"
    assert "autotune.configure(db='postgresql+psycopg:///autotune?host=db-host&user=tuner')" in out
    assert "PGPASSWORD" in out and ".pgpass" in out
