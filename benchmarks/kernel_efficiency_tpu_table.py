"""Markdown tables of two `kernel_efficiency_tpu.py` runs (before and after a change) for the TPU section of
`benchmarks/results/kernel-efficiency.md`."""
from __future__ import annotations

import json
from pathlib import Path

UNITS = ("VALU", "XLU", "MXU", "EUP", "VLOAD", "VSTORE")
KERNELS = {"fwd": ("forward",), "bwd": ("forward", "dq", "dkv")}


def _pair(a, b) -> str:
    if a is None and b is None:
        return "-"
    if a is None or a == b:
        return str(b)
    return f"{a} → {b}"


def _get(row: dict | None, kernel: str, *keys):
    value = (row or {}).get(kernel)
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _per_head(a: dict | None, b: dict | None = None, kernel: str | None = None) -> str:
    """Heads one grid step works on (a alone: before → after heads), or the bundles per head, before → after."""
    heads = lambda row: (row or {}).get("heads_per_step", 1)  # noqa: E731
    if kernel is None:
        return _pair(heads(a), heads(b)) if b is not None else str(heads(a))
    per = lambda row: None if _get(row, kernel, "bundles") is None else round(  # noqa: E731
        _get(row, kernel, "bundles") / heads(row))
    return _pair(per(a), per(b))


def _edges(row: dict | None, kernel: str) -> str:
    """' (e)': the bundles of the step's init and finish regions, which run once per output block."""
    edges = _get(row, kernel, "edges")
    return "" if edges is None else f" ({edges})"


def _steps(before: list[dict], after: list[dict], problems) -> list[str]:
    index = lambda rows: {(r["target"], r["problem"], r["pass_"], r["impl"]): r for r in rows}  # noqa: E731
    old, new = index(before), index(after)
    version = next((r["model_version"] for r in after if "model_version" in r), "?")
    out = []
    for target in sorted({r["target"] for r in after}):
        out += [f"#### {target}", "",
                "| problem | pass | kernel | bundles / step (init + finish) | heads / step | bundles / head | JAX's | "
                "MXU share % | " + " | ".join(
                    f"{u} %" for u in UNITS) + f" | predicted µs ({version}), whole pass |",
                "|---|---|---|---|---|---|---|---|" + "---|" * len(UNITS) + "---|"]
        for problem in problems:
            for pass_ in ("fwd", "bwd"):
                a, b = old.get((target, problem.name, pass_, "ours")), new.get((target, problem.name, pass_, "ours"))
                if b is None:
                    continue
                if "error" in b:
                    out.append(f"| {problem.name} | {pass_} | error: {b['error']} |" + " |" * (9 + len(UNITS)))
                    continue
                jax_row = new.get((target, problem.name, pass_, "jax"))
                for i, kernel in enumerate(KERNELS[pass_]):
                    units = " | ".join(_pair(_get(a, kernel, "slots", u), _get(b, kernel, "slots", u)) for u in UNITS)
                    predicted = _pair((a or {}).get("predicted_us"), b.get("predicted_us")) if i == 0 else ""
                    name = {"forward": "forward" + (" (+lse)" if pass_ == "bwd" else ""), "dq": "dq",
                            "dkv": "dk/dv"}[kernel]
                    out.append(f"| {problem.name} | {pass_} | {name} | "
                               f"{_pair(_get(a, kernel, 'bundles'), _get(b, kernel, 'bundles'))}"
                               f"{_edges(b, kernel)} | {_per_head(a, b)} | {_per_head(a, b, kernel)} | "
                               f"{_get(jax_row, kernel, 'bundles') or '-'}"
                               f"{_edges(jax_row, kernel)} | "
                               f"{_pair(_get(a, kernel, 'mxu_share'), _get(b, kernel, 'mxu_share'))} | {units} | "
                               f"{predicted} |")
        out.append("")
    return out


def _layout(before: list[dict], after: list[dict]) -> list[str]:
    out = ["| head_dim | form | pass | q, k layout XLA gives the inputs | copies, transposes, reshapes "
           "(before → after) | other XLA ops around the kernels |", "|---|---|---|---|---|---|"]
    moves = lambda r: [o for o in r["ops"] if any(w in o for w in ("copy", "transpose", "reshape"))]  # noqa: E731
    old = {(r["head_dim"], r.get("form", "params"), r["pass_"]): r for r in before}
    for r in after:
        form = r.get("form", "params")
        a = old.get((r["head_dim"], form, r["pass_"]))
        other = [o for o in r["ops"] if o not in moves(r)]
        out.append(f"| {r['head_dim']} | {form} | {r['pass_']} | `{r['q_layout']}`, `{r['k_layout']}` | "
                   f"{_pair(None if a is None else len(moves(a)), len(moves(r)))} | "
                   f"{len(other)}: {', '.join(o.split(':')[0] for o in other) or '-'} |")
    return out + [""]


def _extraction(rows: list[dict]) -> list[str]:
    out = ["| dtype | heads | caller layout [256, h, 128] blocks: bundles / step | kernel layout [h, 256, 128]: "
           "bundles / step | ratio | copies the kernel layout needs around it |", "|---|---|---|---|---|---|"]
    by = {(r["dtype"], r["heads"], r["layout"]): r for r in rows}
    for dtype, heads in sorted({(r["dtype"], r["heads"]) for r in rows}, key=lambda k: (k[0], -k[1])):
        caller, kernel = by[(dtype, heads, "caller")], by[(dtype, heads, "kernel")]
        out.append(f"| {dtype} | {heads} | {caller['bundles']} | {kernel['bundles']} | "
                   f"{caller['bundles'] / kernel['bundles']:.2f} | {len(kernel['ops'])} |")
    return out + [""]


def render(before_path: str, after_path: str, *, problems) -> str:
    """The step table (per target), the layout table and the head-extraction probe, before → after."""
    before, after = json.loads(Path(before_path).read_text()), json.loads(Path(after_path).read_text())
    out = ["### Bundles per grid step and slot use (before → after; JAX's kernel beside ours)", ""]
    out += _steps(before.get("steps", []), after.get("steps", []), problems)
    if after.get("layout"):
        out += ["### XLA ops around the kernels (v5e, 2k tokens, batch 2, GQA 8/2, bf16, causal)", ""]
        out += _layout(before.get("layout", []), after["layout"])
    if after.get("head_extraction"):
        out += ["### Reading one head out of the caller's layout (probe kernel, v5e)", ""]
        out += _extraction(after["head_extraction"])
    return "\n".join(out) + "\n"
