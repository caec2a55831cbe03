"""`list`, `show`, `report` and the search summary show which implementation won each key and the others' times,
and `report` marks the keys where a baseline (jax.nn's XLA or cuDNN attention) won (issue 27). Nothing is compiled:
the bests are stored as a GPU search and a CPU search would store them."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from click.testing import CliRunner

from autotune.cli.app import main
from autotune.cli.search import print_summary
from autotune.keys import problem_of
from autotune.search.retime import SearchResult
from db import Store
from tests.db.test_db import make_key

CONFIG = {"block_k": 64, "block_q": 128, "num_stages": 2, "num_warps": 4}


@pytest.fixture
def filled(tmp_path: Path) -> tuple[Path, dict]:
    """A GPU key won by cuDNN and a CPU-interpret key the kernel kept against a faster XLA time."""
    cudnn = random.uniform(1e-4, 1e-3)
    times = {"gpu": {"pallas": cudnn * 1.6, "xla": cudnn * 2.4, "cudnn": cudnn},
             "cpu": {"pallas": cudnn * 9, "xla": cudnn * 3}}
    path = tmp_path / "results.db"
    with Store(path) as store:
        store.put_best(make_key(), config=CONFIG, time_s=cudnn, default_time_s=cudnn * 2, trials=8,
                       implementation="cudnn", times=times["gpu"])
        store.put_best(make_key(platform="cpu-interpret", device_kind="cpu", dtype="float32"), config=CONFIG,
                       time_s=times["cpu"]["pallas"], default_time_s=None, trials=3, times=times["cpu"])
    return path, times


def invoke(*args: str) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def test_list_shows_the_winner_and_the_others_times(filled) -> None:
    path, times = filled
    rows = invoke("list", "--db", str(path)).splitlines()
    assert "winner" in rows[0] and "others ms" in rows[0]
    gpu, cpu = rows[2], rows[3]
    assert " cudnn " in gpu and f"pallas {times['gpu']['pallas'] * 1e3:.3f}, xla {times['gpu']['xla'] * 1e3:.3f}" in gpu
    assert " pallas " in cpu and f"xla {times['cpu']['xla'] * 1e3:.3f}" in cpu
    listed = json.loads(invoke("list", "--json", "--db", str(path)))
    assert [(r["implementation"], r["times"]) for r in listed] == [("cudnn", times["gpu"]), ("pallas", times["cpu"])]


def test_show_names_the_baseline_and_says_why_the_interpret_kernel_kept_its_key(filled) -> None:
    path, times = filled
    won = invoke("show", "--id", "1", "--db", str(path))
    assert "best       cudnn (jax.nn.dot_product_attention); the kernel's best config: block_k=64" in won
    assert (f"winner     cudnn won: {times['gpu']['cudnn'] * 1e3:.3f} ms against the kernel's "
            f"{times['gpu']['pallas'] * 1e3:.3f} ms") in won
    kept = invoke("show", "--id", "2", "--db", str(path))
    assert "winner     pallas: xla timed" in kept and "never compared with compiled XLA" in kept


def test_report_marks_the_keys_a_baseline_won(filled, tmp_path: Path) -> None:
    path, _times = filled
    out = tmp_path / "report.html"
    invoke("report", str(out), "--db", str(path))
    page = out.read_text()
    assert "\u2605 #1 b2" in page and "\u2605 #2" not in page  # the speedup bars' labels
    assert page.count("cudnn won") == 1 and "<title>NVIDIA H100 80GB HBM3: 2.000x, cudnn won</title>" in page
    assert "1 key(s) marked" in page and "\u2605 cudnn" in page and "\u2605 pallas" not in page  # the table


def test_the_search_summary_names_the_winner_and_the_others_times(filled, capsys) -> None:
    path, times = filled
    with Store(path) as store:
        best = store.best_by_id(1)
    result = SearchResult(best.key, problem_of(best.key), CONFIG, best.time_s, best.default_time_s,
                          times["gpu"]["xla"], 8, 0, {"ok": 8}, 1.0, True, best_id=1, implementation="cudnn",
                          times=times["gpu"])
    print_summary([result], str(path))
    out = capsys.readouterr().out
    header, _rule, row = out.strip().splitlines()[:3]
    assert "winner" in header and "others ms" in header and " cudnn " in row
    assert "#1: winner cudnn won:" in out and "implementation='pallas' forces the kernel" in out
