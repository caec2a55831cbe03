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


# ---------------------------------------------------------------- layout in a real browser (issue 25, item 7)

NARROW, WIDE = (420, 900), (1400, 900)


def layout_database(directory: Path, filled: Path) -> tuple[Path, dict]:
    """The filled database plus what broke the layout: a long +bwd key (its label lost its start), compile-only
    maps one column narrow for a target typed as `h100` (their legends were clipped), and a stored best that is not
    the fastest trial (the frame marked the fastest)."""
    import jax

    from autotune.compile.results import compile_key
    from kernels import Problem, gpu
    from tests.cli.test_inspect import copy_database
    from tests.db.test_compile_figures import compiled_figures

    db = copy_database(filled, directory / "layout.db")
    long = Problem(batch=16, q_len=131072, kv_len=131072, heads=64, kv_heads=8, head_dim=256, dtype="bfloat16",
                   causal=True, segments=True, backward=True, window_left=4096, window_right=0, softcap=50.0,
                   lengths=True)
    with Store(db) as store:
        heat = max(store.bests(), key=lambda b: len(store.trials(b.key)))
        ok = sorted((t for t in store.trials(heat.key) if t.status == "ok"), key=lambda t: t.time_s)
        slower = ok[-1].config
        store.put_best(heat.key, config=slower, time_s=ok[0].time_s, default_time_s=ok[0].time_s, trials=len(ok))
        first = store.bests()[0]
        store.put_best(first.key.__class__(**{**first.key.to_dict(), **{f: getattr(long, f) for f in (
            "batch", "q_len", "kv_len", "heads", "kv_heads", "head_dim", "dtype", "causal", "segments", "backward",
            "window_left", "window_right", "softcap", "lengths")}}), config=first.config, time_s=1e-3,
            default_time_s=2e-3, trials=3)
        small = Problem(batch=1, q_len=64, kv_len=64, heads=1, kv_heads=1, head_dim=16)
        key = compile_key(gpu.NAME, gpu.VERSION, "gpu", "NVIDIA H100 80GB HBM3", jax.__version__, small)
        for q in (16, 32, 64):
            store.add_trial(key, config={**gpu.Config.default(small).to_dict(), "block_q": q, "block_k": 16},
                            status="compiled", compile_s=1.0, figures=compiled_figures())
    return db, {"stored_best": (slower.get("block_q"), slower.get("block_k")), "heat_id": heat.id}


def browser_layout(page: Path, profile: Path, size: tuple[int, int]) -> tuple[str, list[dict]]:
    """The DOM headless Chromium made of the page at a window size, and each chart's attributes."""
    browser = next((shutil.which(name) for name in BROWSERS if shutil.which(name)), None)
    if browser is None:
        pytest.skip("no Chromium found (apt-get install chromium); CI installs it")
    dom = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
         f"--window-size={size[0]},{size[1]}", "--dump-dom", page.resolve().as_uri()],
        capture_output=True, text=True, timeout=120, check=True).stdout
    assert 'data-checked="yes"' in dom, "the page's script did not run"
    return dom, [dict(re.findall(r'([\w-]+)="([^"]*)"', tag)) for tag in re.findall(r"<svg\b[^>]*>", dom)]


@pytest.mark.parametrize("size", [NARROW, WIDE], ids=["narrow", "wide"])
def test_report_layout_in_a_browser_has_no_clipped_or_overlapping_text(filled, tmp_path, size):
    db, facts = layout_database(tmp_path, filled)
    out = tmp_path / "layout.html"
    # the map's key named: two keys with as many trials would leave the choice to the order of the rows
    text = write_report(db, out, "--key-id", str(facts["heat_id"]))
    dom, charts = browser_layout(out, tmp_path / "profile", size)
    assert len(charts) >= 5
    for chart in charts:
        name = chart["data-chart"]
        faults = html.unescape(chart["data-layout-faults"])
        assert chart["data-clipped"] == "0", f"{name}: text drawn outside the chart at {size}: {faults}"
        assert chart["data-overlaps"] == "0", f"{name}: overlapping text at {size}: {faults}"
    assert int(re.search(r'data-overflow="(-?\d+)"', dom).group(1)) <= 0, "the page scrolls sideways"
    assert "#" in text and "+bwd win(4096,0) cap50 len" in text  # the long label keeps both its ends
    assert "<h3>h100 (NVIDIA H100 80GB HBM3, compile-only)</h3>" in text  # the target as the user typed it
    assert "measured in Pallas interpret mode on a CPU" in text
    q, k = facts["stored_best"]  # the frame is on the stored best's cell
    framed = re.search(r'<rect class="mark cell"[^>]*stroke="#000"[^>]*><title>([^<]*)</title>', text).group(1)
    assert framed.startswith(f"block_q={q} block_k={k}:")
