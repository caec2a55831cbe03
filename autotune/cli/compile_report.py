"""The `report` section for compile-only results (`search --target`): per target and problem, a block_q x block_k
map coloured by what the compiler said (compiled, spilled, rejected for resources, failed otherwise), each cell
labelled with the largest shared-memory or VMEM figure of its configs. Every stored value is HTML-escaped."""
from __future__ import annotations

import html

from autotune.cli.block_cells import CHAR_W, block_cells
from autotune.cli.common import describe_problem
from autotune.compile.ranking import rank_trials
from autotune.compile.results import peak_bytes, trial_spills
from db.records import RESOURCE_EXHAUSTED

OUTCOME_COLORS = {"compiled": "#1a9850", "spilled": "#fdae61", RESOURCE_EXHAUSTED: "#d73027",
                  "failed": "#7570b3"}
OUTCOME_WORDS = {"compiled": "compiled", "spilled": "compiled, spills", RESOURCE_EXHAUSTED: "out of memory",
                 "failed": "failed otherwise"}
SEVERITY = ("compiled", "spilled", "failed", RESOURCE_EXHAUSTED)  # a cell shows its worst config's outcome
MAX_MAPS = 24
RANKED_ROWS = 10  # configs per key in the predicted-time tables


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def outcome(trial) -> str:
    if trial.status == "compiled":
        return "spilled" if trial_spills(trial) else "compiled"
    return RESOURCE_EXHAUSTED if trial.status == RESOURCE_EXHAUSTED else "failed"


def target_name(key, trials: list) -> str:
    """The target as the user typed it (`--target h100`), from the trials' figures; else the one covering the key's
    device kind; else the device kind."""
    from autotune.compile.targets import target_for_device_kind

    for t in trials:
        name = (t.figures or {}).get("target")
        if isinstance(name, str) and name:
            return name
    target = target_for_device_kind(key.device_kind)
    return target.name if target is not None else key.device_kind


def legend(y: int) -> tuple[list[str], int]:
    """The outcome colours' legend on one row at height y, and the width it takes."""
    body, x = [], 8
    for name in SEVERITY:
        body.append(f'<rect x="{x}" y="{y}" width="12" height="10" fill="{OUTCOME_COLORS[name]}"/>'
                    f'<text x="{x + 16}" y="{y + 9}">{esc(OUTCOME_WORDS[name])}</text>')
        x += 28 + round(CHAR_W * len(OUTCOME_WORDS[name]))
    return body, x


def compile_map(key, trials: list) -> str | None:
    """One compile-only key's map (None when its configs have no block_q/block_k)."""
    cells, rows, cols = block_cells(trials)
    if not cells:
        return None
    cw, ch, left, top = 84, 40, 60, 52
    title = f"{target_name(key, trials)}: {describe_problem(key)}"
    legend_body, legend_w = legend(top + ch * len(rows) + 16)
    width = max(left + cw * len(cols) + 20, legend_w, 16 + round(CHAR_W * 1.1 * len(title)))
    height = top + ch * len(rows) + 40
    body = [f'<text class="title" x="8" y="14">{esc(title)}</text>',
            f'<text class="title" x="{left}" y="30">block_k</text>',
            f'<text class="title" x="4" y="{top - 6}">block_q</text>']
    for j, k in enumerate(cols):
        body.append(f'<text x="{left + j * cw + cw / 2}" y="{top - 6}" text-anchor="middle">{esc(k)}</text>')
    for i, q in enumerate(rows):
        body.append(f'<text x="{left - 6}" y="{top + i * ch + ch / 2 + 4}" text-anchor="end">{esc(q)}</text>')
        for j, k in enumerate(cols):
            ts = cells.get((q, k))
            if not ts:
                continue
            outcomes = [outcome(t) for t in ts]
            worst = max(outcomes, key=SEVERITY.index)
            peaks = [p for p in (peak_bytes(t) for t in ts) if p is not None]
            label = f"{max(peaks) / 1024:.0f} KiB" if peaks else "-"
            counts = ", ".join(f"{outcomes.count(o)} {OUTCOME_WORDS[o]}" for o in SEVERITY if o in outcomes)
            tip = f"block_q={q} block_k={k}: {counts}; largest memory figure {label} ({len(ts)} config(s))"
            x, y = left + j * cw, top + i * ch
            body.append(f'<rect class="mark cell" x="{x}" y="{y}" width="{cw}" height="{ch}" '
                        f'fill="{OUTCOME_COLORS[worst]}" stroke="#fff"><title>{esc(tip)}</title></rect>'
                        f'<text x="{x + cw / 2}" y="{y + ch / 2 + 4}" text-anchor="middle">'
                        f'{esc(label)} {outcomes.count("compiled")}/{len(ts)}</text>')
    body += legend_body
    return (f'<svg class="chart" data-chart="compile-{esc(key.digest()[:8])}" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="{esc("what compiles: " + title)}">'
            + "".join(body) + "</svg>")


def compile_section(trials: list) -> str:
    """The report's section over every compile-only trial, grouped by target (device kind); '' when there are none."""
    if not trials:
        return ""
    by_key: dict[str, tuple] = {}
    for t in trials:
        by_key.setdefault(t.key.digest(), (t.key, []))[1].append(t)
    parts = ["<h2>What compiles, per target (compile-only searches)</h2>",
             "<p class='note'>Each cell: the block_q x block_k configs compiled for the target without the hardware, "
             "coloured by the worst outcome among them, labelled with the largest shared-memory (GPU) or scoped VMEM "
             "(TPU) figure of any kernel and how many compiled cleanly. Nothing here was timed.</p>"]
    keys = sorted(by_key.values(), key=lambda kt: (target_name(*kt), describe_problem(kt[0])))
    if len(keys) > MAX_MAPS:
        parts.append(f"<p class='note'>The first {MAX_MAPS} of {len(keys)} compile-only keys.</p>")
    current = None
    maps: list[str] = []
    for key, ts in keys[:MAX_MAPS]:
        name = target_name(key, ts)
        if name != current:
            if maps:
                parts.append("<div class='multiples'>" + "".join(maps) + "</div>")
                maps = []
            current = name
            parts.append(f"<h3>{esc(name)} ({esc(key.device_kind)}, compile-only)</h3>")
        drawn = compile_map(key, ts)
        if drawn:
            maps.append(drawn)
    if maps:
        parts.append("<div class='multiples'>" + "".join(maps) + "</div>")
    parts.append(predicted_tables([kt for kt in keys[:MAX_MAPS]]))
    return "".join(parts)


def predicted_tables(keys: list[tuple]) -> str:
    """Per compile-only key with predictions, its configs ranked by predicted time (the fastest RANKED_ROWS), every
    figure labelled predicted with the model version; '' when no key has predictions."""
    tables = []
    for key, trials in keys:
        ranking = rank_trials(key, trials)
        if ranking is None:
            continue
        rows = "".join(
            f"<tr><td>#{e.rank}</td><td>{esc(' '.join(f'{n}={v}' for n, v in sorted(e.config.items())))}</td>"
            f"<td>{e.prediction.seconds * 1e3:.4g}</td><td>{e.prediction.roofline_fraction:.0%}</td>"
            f"<td>{esc(e.prediction.bound)}</td><td>{'spills' if e.spills else ''}</td></tr>"
            for e in ranking.entries[:RANKED_ROWS])
        best = ranking.best
        best_text = ("none (every ranked config spills)" if best is None else
                     f"#{best.rank}, {best.prediction.seconds * 1e3:.4g} ms predicted")
        tables.append(f"<h3>{esc(key.device_kind)}: {esc(describe_problem(key))}</h3>"
                      f"<p class='note'>{len(ranking.entries)} compiled configs ranked by PREDICTED time (static "
                      f"model {esc(ranking.model_version)}; nothing was timed). Predicted best: {esc(best_text)}.</p>"
                      "<table class='predicted'><tr><th>predicted rank</th><th>config</th><th>predicted ms</th>"
                      f"<th>% of roofline</th><th>bound</th><th>note</th></tr>{rows}</table>")
    if not tables:
        return ""
    return "<h2>Predicted times, per target (static model, not timed)</h2>" + "".join(tables)
