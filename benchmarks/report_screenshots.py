"""Screenshots of `autotune report` in headless Chromium at a narrow and a wide window, from a database made the way
the README makes one: two small searches on this CPU (one forward+backward with a window and a cap: the longest
labels) and compile-only sweeps for h100 and v5e. Writes benchmarks/results/report-{narrow,wide}.png and prints each
chart's layout check (text drawn outside its chart, overlapping text), which tests/cli/test_report.py asserts.

    python benchmarks/report_screenshots.py            # about 2 minutes on a 2-core CPU
"""
from __future__ import annotations

import html
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SIZES = {"narrow": (420, 4200), "wide": (1400, 3000)}
SEARCHES = (
    ["search", "--batch", "1", "--seq-len", "128", "--heads", "2", "--kv-heads", "1", "--head-dim", "32", "--causal",
     "--segments", "3", "--trials", "8"],
    ["search", "--batch", "1", "--seq-len", "64", "--heads", "2", "--kv-heads", "1", "--head-dim", "16", "--causal",
     "--backward", "--window", "32,0", "--softcap", "30", "--trials", "6"],
    ["search", "--target", "h100,v5e", "--batch", "1", "--seq-len", "256", "--heads", "2", "--kv-heads", "1",
     "--head-dim", "128", "--dtype", "bfloat16", "--causal", "--trials", "6"],
)


def autotune(*args: str, db: Path) -> None:
    subprocess.run([sys.executable, "-m", "autotune", *args, "--quiet", "--db", str(db)], check=True,
                   stdout=subprocess.DEVNULL)


def main() -> None:
    browser = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)),
                   None)
    if browser is None:
        sys.exit("no Chromium found: apt-get install chromium")
    with tempfile.TemporaryDirectory() as folder:
        db, page = Path(folder) / "results.db", Path(folder) / "report.html"
        for args in SEARCHES:
            autotune(*args, db=db)
        subprocess.run([sys.executable, "-m", "autotune", "report", str(page), "--db", str(db)], check=True)
        common = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                  f"--user-data-dir={folder}/profile"]
        for name, (width, height) in SIZES.items():
            out = RESULTS / f"report-{name}.png"
            subprocess.run(common + [f"--window-size={width},{height}", f"--screenshot={out}", page.as_uri()],
                           check=True, capture_output=True)
            dom = subprocess.run(common + [f"--window-size={width},{height}", "--dump-dom", page.as_uri()],
                                 check=True, capture_output=True, text=True).stdout
            overflow = re.search(r'data-overflow="(-?[0-9]+)"', dom).group(1)
            print(f"{name} ({width} px): wrote {out.relative_to(RESULTS.parent.parent)}; sideways overflow "
                  f"{overflow} px")
            for tag in re.findall(r"<svg\b[^>]*>", dom):
                attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', tag))
                print(f"  {attrs['data-chart']}: {attrs['data-drawn']} marks drawn, {attrs['data-clipped']} clipped, "
                      f"{attrs['data-overlaps']} overlapping {html.unescape(attrs['data-layout-faults'])}")


if __name__ == "__main__":
    main()
