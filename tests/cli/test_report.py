"""`autotune report`: a self-contained HTML page whose charts really draw in a browser (headless Chromium)."""
from __future__ import annotations

import html
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner

from autotune.cli.app import main
from db import Store
from tests.cli.test_inspect import fill_database

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


@pytest.fixture(scope="module")
def filled(tmp_path_factory) -> Path:
    return fill_database(tmp_path_factory.mktemp("report"))


def write_report(db: Path, out: Path, *args: str) -> str:
    result = CliRunner().invoke(main, ["report", str(out), *args, "--db", str(db)])
    assert result.exit_code == 0, result.output
    return out.read_text()


def rendered_charts(page: Path, profile: Path) -> list[tuple[str, int]]:
    """(chart name, marks drawn) per chart, from the DOM headless Chromium made of the page."""
    browser = next((shutil.which(name) for name in BROWSERS if shutil.which(name)), None)
    if browser is None:
        pytest.skip("no Chromium found (apt-get install chromium); CI installs it")
    dom = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
         "--dump-dom", page.resolve().as_uri()],
        capture_output=True, text=True, timeout=120, check=True).stdout
    assert 'data-checked="yes"' in dom, "the page's script did not run"
    charts = []
    for tag in re.findall(r"<svg\b[^>]*>", dom):
        attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', tag))
        charts.append((html.unescape(attrs["data-chart"]), int(attrs["data-drawn"])))
    return charts


def test_report_is_self_contained_and_every_chart_draws(filled, tmp_path):
    out = tmp_path / "report.html"
    text = write_report(filled, out)
    assert "http" not in text and " src=" not in text and "@import" not in text  # opens offline
    store = Store(filled)
    bests, trials = store.bests(), store.trials()
    charts = rendered_charts(out, tmp_path / "profile")
    assert [name for name, _ in charts] == ["speedup"] + ["convergence"] * len(bests) + ["heatmap", "failures"]
    drawn = dict(charts[:1] + charts[-2:])
    assert drawn["speedup"] == len(bests)  # one bar per tuned key
    assert all(n == 1 for name, n in charts if name == "convergence")  # one best-so-far line per search
    most = Counter(t.key.digest() for t in trials).most_common(1)[0][1]
    assert drawn["heatmap"] == most  # the default key: the most trials, each its own (block_q, block_k) cell
    assert drawn["failures"] == len({t.status for t in trials if t.status != "ok"}) == 2


def test_report_key_id_picks_the_heat_map(filled, tmp_path):
    plain = next(b for b in Store(filled).bests() if not b.key.causal)
    out = tmp_path / "plain.html"
    text = write_report(filled, out, "--key-id", str(plain.id))
    assert text.count('class="mark cell"') == 2
    assert f"#{plain.id} b1 q32 kv32 h1/1 d16 float32" in text
    charts = dict((name, n) for name, n in rendered_charts(out, tmp_path / "profile") if name == "heatmap")
    assert charts == {"heatmap": 2}


def test_report_errors_are_clear(filled, tmp_path):
    unknown = CliRunner().invoke(main, ["report", str(tmp_path / "r.html"), "--key-id", "999", "--db", str(filled)])
    assert unknown.exit_code == 1 and "no tuned result with id 999" in unknown.output
    Store(tmp_path / "empty.db").close()
    empty = CliRunner().invoke(main, ["report", str(tmp_path / "r.html"), "--db", str(tmp_path / "empty.db")])
    assert empty.exit_code == 1 and "no tuned results in" in empty.output
    assert isinstance(empty.exception, SystemExit) and not (tmp_path / "r.html").exists()
    missing = CliRunner().invoke(main, ["report", str(tmp_path / "r.html"), "--db", str(tmp_path / "none.db")])
    assert missing.exit_code == 1 and "no results database at" in missing.output
