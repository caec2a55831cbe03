"""`autotune report OUT.html`: one self-contained page of charts over the results database.

The page is plain HTML with inline SVG and CSS, so it opens offline and needs no plotting library: the speedup over
the default per tuned key, each search's convergence (best time so far against the trial number), a block_q by
block_k map of one key's trial times, and the failure classes. A short inline script marks each chart with the
number of marks the browser actually drew (`data-drawn`), which is what the test reads back from headless Chromium.
"""
from __future__ import annotations

import html
import math
from collections import Counter
from datetime import datetime, timezone

import click

from autotune.cli.block_cells import CHAR_W, block_cells
from autotune.cli.compile_report import compile_section
from autotune.cli.winners import others_text
from autotune.compile.results import XLA_KERNEL, is_compile_only
from autotune.cli.common import (database_errors, db_option, describe_problem, filter_options, first_line,
                                      key_filters, key_matches, open_existing, table_config, where)
from db.records import RESOURCE_EXHAUSTED

BASELINE_WON_COLOUR = "#f28e2b"  # a key where jax.nn's XLA or cuDNN attention beat the kernel
FAILURE_COLORS = {"compile_error": "#d95f02", RESOURCE_EXHAUSTED: "#7570b3", "mismatch": "#e7298a",
                  "runtime_error": "#a6761d", "timeout": "#525252", "invalid": "#969696"}
HEAT_STOPS = ((0.0, (26, 152, 80)), (0.5, (254, 224, 139)), (1.0, (215, 48, 39)))  # fast green .. slow red
MAX_CONVERGENCE = 48

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px auto; max-width: 1100px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 32px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 12px; } td, th { padding: 2px 8px; text-align: left; }
tr:nth-child(even) { background: #f4f4f4; } .note { color: #666; }
svg.chart text { font: 11px monospace; fill: #333; } svg.chart .title { font: bold 11px sans-serif; }
.multiples { display: flex; flex-wrap: wrap; gap: 12px; } .axis { stroke: #999; } .grid { stroke: #e5e5e5; }
svg.chart { max-width: 100%; height: auto; } .scroll { overflow-x: auto; max-width: 100%; }
body { padding: 0 12px; } .caveat { background: #fff3cd; padding: 6px 10px; border-left: 4px solid #e0a800; }
"""
CHECK_SCRIPT = """
for (const svg of document.querySelectorAll('svg[data-chart]')) {
  let drawn = 0;
  for (const mark of svg.querySelectorAll('.mark')) {
    const box = mark.getBBox();
    if (box.width > 0 || box.height > 0) drawn++;
  }
  svg.setAttribute('data-drawn', drawn);
  const view = svg.viewBox.baseVal, texts = [...svg.querySelectorAll('text')];
  const boxes = texts.map(t => t.getBBox()), bad = [];
  const clipped = texts.filter((t, i) => {
    const b = boxes[i];
    return b.x < -0.5 || b.y < -0.5 || b.x + b.width > view.width + 0.5 || b.y + b.height > view.height + 0.5;
  });
  let overlaps = 0;
  for (let i = 0; i < boxes.length; i++) for (let j = i + 1; j < boxes.length; j++) {
    const a = boxes[i], b = boxes[j];
    if (a.x < b.x + b.width - 0.5 && b.x < a.x + a.width - 0.5 && a.y < b.y + b.height - 0.5
        && b.y < a.y + a.height - 0.5) { overlaps++; bad.push(texts[i].textContent + ' / ' + texts[j].textContent); }
  }
  svg.setAttribute('data-clipped', clipped.length);
  svg.setAttribute('data-overlaps', overlaps);
  svg.setAttribute('data-layout-faults', clipped.map(t => 'clipped: ' + t.textContent).concat(bad).join('; '));
}
document.body.setAttribute('data-overflow', document.documentElement.scrollWidth - window.innerWidth);
document.body.setAttribute('data-checked', 'yes');
"""
INTERPRET_NOTE = ("Times of keys on cpu [cpu-interpret] were measured in Pallas interpret mode on a CPU: they say "
                  "nothing about GPU or TPU speed.")


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: float) -> str:
    return f"{value:.3g}"


def nice_ticks(low: float, high: float, count: int = 5, *, integer: bool = False) -> list[float]:
    """Round tick values covering [low, high] (whole numbers only for counts)."""
    span = high - low or abs(high) or 1.0
    raw = span / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if raw <= m * magnitude)
    step = max(step, 1) if integer else step
    first = math.ceil(low / step - 1e-9) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def fit_label(label: str, most: int = 64) -> str:
    """A bar's label, at most `most` characters: a longer one keeps its start (the key's id) and its end (+bwd,
    the window, the cap) and loses its middle."""
    if len(label) <= most:
        return label
    half = (most - 3) // 2
    return label[:half] + "..." + label[len(label) - (most - 3 - half):]


def svg(name: str, width: int, height: int, body: list[str], label: str) -> str:
    return (f'<svg class="chart" data-chart="{esc(name)}" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="{esc(label)}">' + "".join(body) + "</svg>")


# ---------------------------------------------------------------- charts


def bar_chart(name: str, items: list[tuple[str, float, str, str]], unit: str, reference: float | None = None,
              *, integer: bool = False, digits: int | None = None) -> str:
    """Horizontal bars; items are (label, value, tooltip, colour); `digits` after the point on the bars' values."""
    labels = [fit_label(label) for label, _, _, _ in items]
    label_w, bar_w, row = max(80, round(max(map(len, labels), default=0) * CHAR_W) + 16), 360, 24
    width, height = label_w + bar_w + 70, 16 + row * len(items) + 28
    top = max([value for _, value, _, _ in items] + [reference or 0]) * 1.08 or 1.0
    scale = bar_w / top
    body = []
    for tick in nice_ticks(0, top, integer=integer):
        x = label_w + tick * scale
        body.append(f'<line class="grid" x1="{x:.1f}" x2="{x:.1f}" y1="8" y2="{height - 24}"/>'
                    f'<text x="{x:.1f}" y="{height - 8}" text-anchor="middle">{fmt(tick)}{esc(unit)}</text>')
    for i, ((_, value, tooltip, colour), label) in enumerate(zip(items, labels)):
        y = 12 + i * row
        body.append(f'<text x="{label_w - 8}" y="{y + 13}" text-anchor="end">{esc(label)}</text>'
                    f'<rect class="mark bar" x="{label_w}" y="{y}" width="{max(value * scale, 1):.1f}" height="17" '
                    f'fill="{colour}"><title>{esc(tooltip)}</title></rect>'
                    f'<text x="{label_w + value * scale + 4:.1f}" y="{y + 13}">'
                    f'{fmt(value) if digits is None else f"{value:.{digits}f}"}{esc(unit)}</text>')
    if reference is not None:
        x = label_w + reference * scale
        body.append(f'<line class="axis" x1="{x:.1f}" x2="{x:.1f}" y1="6" y2="{height - 24}" stroke-dasharray="4 3"/>')
    body.append(f'<line class="axis" x1="{label_w}" x2="{label_w}" y1="6" y2="{height - 24}"/>')
    return svg(name, width, height, body, name)


def convergence_chart(title: str, trials: list) -> str:
    """Best time so far (ms) against trial number for one key, with every ok trial as a dot, failures as red ticks."""
    width, height, left, right, top, bottom = 360, 220, 58, 12, 26, 34
    numbered = [(t.number if t.number is not None else i, t) for i, t in enumerate(trials)]
    ok = sorted((n, t.time_s * 1e3) for n, t in numbered if t.status == "ok" and t.time_s is not None)
    x_max = max([n for n, _ in numbered] + [1])
    shown_title = fit_label(title, int((width - 16) / CHAR_W))
    body = [f'<text class="title" x="8" y="14">{esc(shown_title)}<title>{esc(title)}</title></text>']
    if ok:
        low, high = min(v for _, v in ok), max(v for _, v in ok)
        pad = (high - low) * 0.08 or low * 0.1 or 1.0
        low, high = max(low - pad, 0), high + pad
    else:
        low, high = 0.0, 1.0
    y_ticks = nice_ticks(low, high, 4)
    # the tick labels end 4 px left of the axis and must clear the rotated "ms" (about 20 px from the edge)
    left = max(left, math.ceil(20 + CHAR_W * max(len(fmt(t)) for t in y_ticks) + 4))

    def px(n: float) -> float:  # half a trial of room at both ends, so no point sits on an axis
        return left + (width - left - right) * (n + 0.5) / (x_max + 1)

    def py(v: float) -> float:
        return top + (height - top - bottom) * (1 - (v - low) / (high - low))

    for tick in y_ticks:
        body.append(f'<line class="grid" x1="{left}" x2="{width - right}" y1="{py(tick):.1f}" y2="{py(tick):.1f}"/>'
                    f'<text x="{left - 4}" y="{py(tick) + 4:.1f}" text-anchor="end">{fmt(tick)}</text>')
    for tick in nice_ticks(0, x_max, 5, integer=True):
        if tick == int(tick):
            body.append(f'<text x="{px(tick):.1f}" y="{height - bottom + 14}" text-anchor="middle">{int(tick)}</text>')
    body.append(f'<text x="{left + (width - left - right) / 2}" y="{height - 4}" text-anchor="middle">trial</text>'
                f'<text x="12" y="{top + (height - top - bottom) / 2}" transform="rotate(-90 12 '
                f'{top + (height - top - bottom) / 2})" text-anchor="middle">ms</text>')
    body.append(f'<path class="axis" fill="none" d="M{left},{top} V{height - bottom} H{width - right}"/>')
    for n, t in numbered:
        if t.status != "ok":
            x = px(n)
            body.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{height - bottom - 6}" y2="{height - bottom}" '
                        f'stroke="#d73027" stroke-width="2"><title>trial {n}: {esc(t.status)}</title></line>')
    if ok:
        best = ok[0][1]
        steps = [f"M{px(ok[0][0]):.1f},{py(best):.1f}"]
        for n, value in ok[1:]:
            if value < best:
                best = value
                steps.append(f"H{px(n):.1f} V{py(best):.1f}")
        steps.append(f"H{px(x_max + 0.5):.1f}")
        body.append(f'<path class="mark line" fill="none" stroke="#2166ac" stroke-width="2" d="{" ".join(steps)}">'
                    f'<title>best so far: {fmt(best)} ms</title></path>')
        for n, value in ok:
            body.append(f'<circle class="pt" cx="{px(n):.1f}" cy="{py(value):.1f}" r="2.5" fill="#67a9cf">'
                        f'<title>trial {n}: {fmt(value)} ms</title></circle>')
    else:
        body.append(f'<text x="{left + 10}" y="{top + 30}">no trial passed</text>')
    return svg("convergence", width, height, body, f"convergence of {title}")


def heat_colour(fraction: float) -> str:
    for (f0, c0), (f1, c1) in zip(HEAT_STOPS, HEAT_STOPS[1:]):
        if fraction <= f1:
            w = (fraction - f0) / (f1 - f0)
            return "#" + "".join(f"{round(a + (b - a) * w):02x}" for a, b in zip(c0, c1))
    return "#%02x%02x%02x" % HEAT_STOPS[-1][1]


def heat_map(trials: list, best_config: dict | None = None) -> str | None:
    """The best ok time per (block_q, block_k) cell of one key's trials, the stored best's cell framed; None if its
    configs have no such fields."""
    cells, rows, cols = block_cells(trials)
    if not cells:
        return None
    times = {cell: min(t.time_s for t in ts if t.status == "ok" and t.time_s is not None)
             for cell, ts in cells.items() if any(t.status == "ok" and t.time_s is not None for t in ts)}
    low, high = (min(times.values()), max(times.values())) if times else (1.0, 1.0)
    stored = (best_config.get("block_q"), best_config.get("block_k")) if best_config else None
    cw, ch, left, top = 92, 44, 70, 40
    width, height = left + cw * len(cols) + 20, top + ch * len(rows) + 60
    body = [f'<text class="title" x="{left}" y="14">block_k</text>',
            f'<text class="title" x="8" y="{top - 8}">block_q</text>']
    for j, k in enumerate(cols):
        body.append(f'<text x="{left + j * cw + cw / 2}" y="{top - 8}" text-anchor="middle">{esc(k)}</text>')
    for i, q in enumerate(rows):
        body.append(f'<text x="{left - 8}" y="{top + i * ch + ch / 2 + 4}" text-anchor="end">{esc(q)}</text>')
        for j, k in enumerate(cols):
            if (q, k) not in cells:
                continue
            x, y = left + j * cw, top + i * ch
            ts = cells[(q, k)]
            if (q, k) in times:
                value = times[(q, k)]
                fraction = 0.0 if high == low else math.log(value / low) / math.log(high / low)
                fill, text = heat_colour(fraction), f"{fmt(value * 1e3)} ms"
            else:
                fill, text = "#d9d9d9", ", ".join(sorted({t.status for t in ts}))
            tip = f"block_q={q} block_k={k}: {text} ({len(ts)} trial(s))"
            stroke = ' stroke="#000" stroke-width="3"' if (q, k) == stored else ' stroke="#fff"'
            body.append(f'<rect class="mark cell" x="{x}" y="{y}" width="{cw}" height="{ch}" fill="{fill}"{stroke}>'
                        f'<title>{esc(tip)}</title></rect>'
                        f'<text x="{x + cw / 2}" y="{y + ch / 2 + 4}" text-anchor="middle">{esc(text[:14])}</text>')
    legend_y = top + ch * len(rows) + 18
    body.append('<defs><linearGradient id="heat">' + "".join(
        f'<stop offset="{f}" stop-color="{heat_colour(f)}"/>' for f, _ in HEAT_STOPS) + "</linearGradient></defs>"
        f'<rect x="{left}" y="{legend_y}" width="160" height="10" fill="url(#heat)"/>'
        f'<text x="{left}" y="{legend_y + 24}">{fmt(low * 1e3)} ms</text>'
        f'<text x="{left + 160}" y="{legend_y + 24}" text-anchor="end">{fmt(high * 1e3)} ms</text>'
        f'<rect x="{left + 180}" y="{legend_y}" width="14" height="10" fill="#d9d9d9"/>'
        f'<text x="{left + 198}" y="{legend_y + 9}">failed</text>'
        + (f'<rect x="{left + 260}" y="{legend_y - 1}" width="14" height="12" fill="none" stroke="#000" '
           f'stroke-width="2"/><text x="{left + 280}" y="{legend_y + 9}">stored best</text>' if stored else ""))
    return svg("heatmap", max(width, left + 370), height, body, "block_q by block_k trial times")


# ---------------------------------------------------------------- the page


def table(headers: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<div class='scroll'><table><tr>{head}</tr>{body}</table></div>"


def build_page(source: str, bests: list, by_key: dict, heat_digest: str | None, extra: str = "") -> str:
    """The whole HTML document. `by_key` maps a key digest to (key, its trials in number order)."""
    best_of = {b.key.digest(): b for b in bests}
    parts = [f"<h1>Autotuning report</h1><p class='note'>{esc(source)} &middot; generated "
             f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC &middot; {len(bests)} tuned key(s), "
             f"{sum(len(ts) for _, ts in by_key.values())} trial(s)</p>"]
    if any(key.platform == "cpu-interpret" for key, _ in by_key.values()):
        parts.append(f"<p class='caveat'>{esc(INTERPRET_NOTE)}</p>")

    parts.append("<h2>Speedup of the tuned config over the default</h2>")
    items = [(("\u2605 " if b.baseline_won else "") + f"#{b.id} {describe_problem(b.key)}",
              b.speedup, f"{b.key.device_kind}: {b.speedup:.3f}x" + (f", {b.implementation} won" if b.baseline_won
                                                                       else ""),
              BASELINE_WON_COLOUR if b.baseline_won else "#4393c3")
             for b in bests if b.speedup]
    parts.append(bar_chart("speedup", items, "x", reference=1.0, digits=2) if items
                 else "<p class='note'>No tuned key has a default time to compare with.</p>")
    won = sum(b.baseline_won for b in bests)
    if won:
        parts.append(f"<p class='note'>{won} key(s) marked &#9733; (orange bars): jax.nn's own attention beat every "
                     "kernel config by more than the margin there, and autotune.dot_product_attention runs it.</p>")
    parts.append(table(["id", "device", "kernel", "problem", "winner", "best config", "best ms", "default ms",
                        "others ms", "trials"],
                       [[b.id, b.key.device_kind, b.key.kernel, describe_problem(b.key),
                         f"\u2605 {b.implementation}" if b.baseline_won else b.implementation,
                         table_config(b.config, b.key),
                         fmt(b.time_s * 1e3), "-" if b.default_time_s is None else fmt(b.default_time_s * 1e3),
                         others_text(b.times, b.implementation), b.trials] for b in bests]))

    parts.append("<h2>Convergence: best time so far against trial number</h2>")
    shown = list(by_key.items())[:MAX_CONVERGENCE]
    if len(by_key) > MAX_CONVERGENCE:
        parts.append(f"<p class='note'>The first {MAX_CONVERGENCE} of {len(by_key)} keys.</p>")
    charts = []
    for digest, (key, trials) in shown:
        best = best_of.get(digest)
        charts.append(convergence_chart(f"{'#' + str(best.id) if best else digest[:8]} {describe_problem(key)}",
                                        trials))
    parts.append("<div class='multiples'>" + "".join(charts) + "</div>" if charts
                 else "<p class='note'>No trials recorded.</p>")

    parts.append("<h2>Trial times by block_q and block_k</h2>")
    if heat_digest is None:
        parts.append("<p class='note'>No trials recorded.</p>")
    else:
        key, trials = by_key[heat_digest]
        best = best_of.get(heat_digest)
        parts.append(f"<p class='note'>{'#' + str(best.id) if best else heat_digest} {esc(describe_problem(key))} on "
                     f"{esc(key.device_kind)}, {len(trials)} trial(s): each cell is the best trial time over the other "
                     "fields, as measured during the search (the stored best comes from a final re-timing).</p>")
        parts.append(heat_map(trials, best.config if best else None)
                     or "<p class='note'>This kernel's configs have no block_q/block_k.</p>")

    parts.append("<h2>Failure classes</h2>")
    all_trials = [t for _, ts in by_key.values() for t in ts]
    counts = Counter(t.status for t in all_trials if t.status != "ok")
    if counts:
        items = [(status, n, f"{n} trial(s) {status}", FAILURE_COLORS.get(status, "#999"))
                 for status, n in counts.most_common()]
        parts.append(bar_chart("failures", items, "", integer=True, digits=0))
        examples = Counter((t.status, t.error_class or "") for t in all_trials if t.status != "ok")
        message = {(t.status, t.error_class or ""): t.error_message for t in all_trials if t.status != "ok"}
        parts.append(table(["status", "error class", "trials", "example message"],
                           [[s, c, n, first_line(message[(s, c)], 140)] for (s, c), n in examples.most_common()]))
    else:
        parts.append("<p class='note'>No trial failed.</p>")
    parts.append(extra)  # the compile-only section (autotune/cli/compile_report.py)
    return ("<!doctype html><html lang='en'><head><meta charset='utf-8'><title>Autotuning report</title>"
            f"<style>{STYLE}</style></head><body>{''.join(parts)}<script>{CHECK_SCRIPT}</script></body></html>\n")


@click.command("report")
@click.argument("out", type=click.Path(dir_okay=False))
@filter_options
@click.option("--key-id", type=int, default=None,
              help="Key of the block_q x block_k map, by its id in `autotune list` [default: the most trials].")
@db_option
def report_command(out, device_kind, kernel_filter, dtype_filter, causal_filter, key_id, db):
    """Write a self-contained HTML page of charts.

    Speedup per tuned key, each search's convergence, a block_q x block_k map of one key's trial times and the
    failure classes; inline SVG only, so it opens offline.
    """
    store = open_existing(db)
    filters = key_filters(device_kind, kernel_filter, dtype_filter, causal_filter)
    with database_errors(store):
        bests = store.bests(**filters)
        trials = [t for t in store.trials() if key_matches(t.key, filters)]
        chosen = store.best_by_id(key_id) if key_id is not None else None
    # not timed: their own section, never in the charts (XLA's predicted attention shows in the search summary)
    compiled = [t for t in trials if is_compile_only(t.key) and t.key.kernel != XLA_KERNEL]
    trials = [t for t in trials if not is_compile_only(t.key)]
    if not bests and not trials and not compiled:
        raise click.ClickException(f"no tuned results in {where(store)}")
    if key_id is not None and chosen is None:
        raise click.ClickException(f"no tuned result with id {key_id} in {where(store)} "
                                   "(`autotune list` shows the ids)")
    by_key: dict[str, tuple] = {}
    for b in bests:
        by_key[b.key.digest()] = (b.key, [])
    for t in trials:
        by_key.setdefault(t.key.digest(), (t.key, []))[1].append(t)
    for _, ts in by_key.values():
        ts.sort(key=lambda t: (t.number is None, t.number or 0, t.id))
    if chosen is not None:
        heat = chosen.key.digest()
        by_key.setdefault(heat, (chosen.key, []))
    else:
        heat = max(by_key, key=lambda d: len(by_key[d][1])) if trials else None
    page = build_page(where(store), bests, by_key, heat, compile_section(compiled))
    try:
        with open(out, "w", encoding="utf-8") as handle:
            handle.write(page)
    except OSError as exc:
        raise click.ClickException(f"cannot write {out}: {exc.strerror or exc}") from None
    click.echo(f"Wrote {out}: {len(bests)} tuned key(s), {len(trials)} trial(s)"
               + (f", {len(compiled)} compile-only trial(s)" if compiled else "") + "; open it in any browser.")

