"""Markdown tables of two `kernel_efficiency.py` runs (before and after a change), one section per target."""
from __future__ import annotations

import json
from pathlib import Path


def _fmt_bytes(n) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def _pair(a, b, fmt=str) -> str:
    a, b = fmt(a), fmt(b)
    return a if a == b else f"{a} → {b}"


def _prefetch(a: dict, b: dict) -> str:
    pa, pb = a.get("prefetch_ops", 0), b.get("prefetch_ops", 0)
    return "" if pa == pb == 0 else f" (+{_pair(pa, pb)} async VMEM prefetch)"


def _config_text(config: dict) -> str:
    if "num_warps" in config:
        return (f"fwd {config['block_q']}x{config['block_k']} w{config['num_warps']} s{config['num_stages']}; "
                f"bwd {config['bwd_block_q']}x{config['bwd_block_k']} w{config['bwd_num_warps']} "
                f"s{config['bwd_num_stages']}")
    return (f"b{config['block_b']} q{config['block_q']} k{config['block_k_major']}/{config['block_k']}; bwd "
            f"q{config['bwd_block_q']} k{config['bwd_block_k_major']}/{config['bwd_block_k']}")


def render(before_path: str, after_path: str, *, problems, targets) -> str:
    """Markdown: per target, a program table and a per-kernel table, before → after."""
    before = {(r["target"], r["problem"], r["pass_"]): r for r in json.loads(Path(before_path).read_text())}
    after = {(r["target"], r["problem"], r["pass_"]): r for r in json.loads(Path(after_path).read_text())}
    out = []
    out.append("Problems (batch, q_len, kv_len, heads, kv_heads, head_dim, dtype, causal):\n")
    for name, *rest in problems:
        out.append(f"- `{name}`: {', '.join(str(x) for x in rest)}")
    for tname, target in targets.items():
        keys = [k for k in after if k[0] == tname]
        if not keys:
            continue
        out.append(f"\n## {tname} ({target.peak_source})\n")
        out.append("| problem | pass | config | pad/slice lowered | XLA ops around kernels | other ops' HBM bytes "
                   "| temp bytes | flops in cost_analysis | roofline µs (bound) | other ops at HBM peak µs |")
        out.append("|---|---|---|---|---|---|---|---|---|---|")
        for key in keys:
            a, b = before.get(key, {}), after[key]
            if "error" in b or "error" in a:
                out.append(f"| {key[1]} | {key[2]} | | error: {b.get('error') or a.get('error')} |||||||")
                continue
            roof = b["roofline"]
            bound = "compute" if roof["t_flops_us"] >= roof["t_bytes_us"] else "memory"
            ps = lambda r: f"{r['stablehlo']['pad']}/{r['stablehlo']['slice']}"  # noqa: E731
            other_us = lambda r: f"{r['other_bytes'] / target.peak_bytes * 1e6:.2f}"  # noqa: E731
            out.append(
                f"| {key[1]} | {key[2]} | {_config_text(b['config'])} | {_pair(ps(a), ps(b))} "
                f"| {_pair(len(a['other_ops']), len(b['other_ops']))}{_prefetch(a, b)} "
                f"| {_pair(a['other_bytes'], b['other_bytes'], _fmt_bytes)} "
                f"| {_pair(a['temp_bytes'], b['temp_bytes'], _fmt_bytes)} "
                f"| {_pair(a['xla_flops'], b['xla_flops'], lambda x: f'{x / 1e9:.2f} G')} "
                f"| {roof['t_roof_us']:.1f} ({bound}) | {_pair(other_us(a), other_us(b))} |")
        gpu = target.platform == "cuda"
        out.append("")
        if gpu:
            out.append("| problem | pass | kernel | grid | shared memory | registers | spill bytes (st/ld) | C7515 |")
            out.append("|---|---|---|---|---|---|---|---|")
        else:
            out.append("| problem | pass | kernel | scoped VMEM |")
            out.append("|---|---|---|---|")
        for key in keys:
            a, b = before.get(key, {}), after[key]
            for kname, kb in b.get("per_kernel", {}).items():
                ka = a.get("per_kernel", {}).get(kname, {})
                if gpu:
                    spill = lambda k: f"{k.get('spill_stores', '-')}/{k.get('spill_loads', '-')}"  # noqa: E731
                    c75 = lambda k: "yes" if k.get("c7515") else "no"  # noqa: E731
                    out.append(
                        f"| {key[1]} | {key[2]} | {kname} | {_pair(ka.get('grid'), kb.get('grid'))} "
                        f"| {_pair(ka.get('smem'), kb.get('smem'), _fmt_bytes)} "
                        f"| {_pair(ka.get('registers'), kb.get('registers'))} | {_pair(spill(ka), spill(kb))} "
                        f"| {_pair(c75(ka), c75(kb))} |")
                else:
                    out.append(f"| {key[1]} | {key[2]} | {kname} "
                               f"| {_pair(ka.get('vmem'), kb.get('vmem'), _fmt_bytes)} |")
    return "\n".join(out) + "\n"
