"""Markdown tables of two `kernel_efficiency_gpu.py` runs (before -> after), one row per target, problem and kernel.

Per kernel: registers and spills, then per iteration of its plain (unmasked) block: instructions (and of a masked
edge block), tensor-core work over the useful work, MUFU, FFMA / FMUL / FADD, shared and global loads, barriers,
and ptxas's C7515 warning. A plain block is the split loops' shortest loop, or in one loop the body less the edge
mask its branch jumps over.
"""
from __future__ import annotations

MATMULS = {"fwd": 2, "dq": 3, "dkv": 4}


def _role(name: str) -> str:
    return "dkv" if name.endswith("dkv") else "dq" if name.endswith("dq") else "fwd"


def _blocks(config: dict, role: str) -> tuple[int, int, int]:
    if role == "fwd":
        return config["block_q"], config["block_k"], config["num_warps"]
    return config["bwd_block_q"], config["bwd_block_k"], config["bwd_num_warps"]


def loop_figures(kernel: dict, config: dict, head_dim: int) -> dict:
    """The plain block's figures of one kernel (see the module doc) and its masked block's instructions."""
    loops = kernel["loops"]
    plain = min(loops, key=lambda b: b["instructions"] - b.get("branch_skipped", 0))
    masked = max(b["instructions"] for b in loops)
    role = _role(kernel["name"])
    bq, bk, warps = _blocks(config, role)
    done = 0  # HGMMA runs per warpgroup, HMMA per warp: "HGMMA.64x64x16 x12"
    for mma in plain["mmas"]:
        shape, count = mma.split(" x")
        m, n, k = (int(x) for x in shape.split(".")[1].split("x"))
        done += 2 * m * n * k * int(count) * (warps // 4 if shape.startswith("HGMMA") else warps)
    useful = 2 * bq * bk * head_dim * MATMULS[role]
    op = plain["opcodes"]
    return dict(
        plain=plain["instructions"] - plain.get("branch_skipped", 0), masked=masked,
        mma=f"{sum(int(m.rsplit('x', 1)[1]) for m in plain['mmas'])} ({done / useful:.2f}×)",
        mufu=op.get("MUFU", 0), ffma=op.get("FFMA", 0), fmul=op.get("FMUL", 0), fadd=op.get("FADD", 0),
        loads=sum(plain["classes"].get(c, 0) for c in ("lds", "ldgsts", "ldg")), bar=plain["classes"].get("bar", 0),
        regs=kernel["registers"], spill=kernel["spill_bytes"], c7515="yes" if kernel["c7515"] else "-",
    )


def _config(config: dict) -> str:
    """fwd BQxBK wW sS / bwd BQxBK wW sS."""
    fwd = f"{config['block_q']}x{config['block_k']} w{config['num_warps']} s{config['num_stages']}"
    bwd = f"{config['bwd_block_q']}x{config['bwd_block_k']} w{config['bwd_num_warps']} s{config['bwd_num_stages']}"
    return f"{fwd} / {bwd}"


def _pair(a, b) -> str:
    return f"{a}" if a == b else f"{a} → {b}"


def tables(before: list[dict], after: list[dict]) -> str:
    """Per-kernel SASS figures and per-call predicted times, before -> after, as markdown."""
    later = {(r["target"], r["problem_name"], r["variant"]): r for r in after}
    head = ("| target | problem | config | kernel | regs | spill | instr. plain / masked block "
            "| MMA instr. (× useful) | MUFU | FFMA | FMUL | FADD | LDS+LDGSTS | BAR | C7515 |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    predicted = ["| target | problem | config (fwd / bwd) | predicted µs before | after | model |",
                 "|---|---|---|---|---|---|"]
    for row in before:
        key = (row["target"], row["problem_name"], row["variant"])
        new = later.get(key)
        d = int(row["problem_name"].rsplit("-d", 1)[1])
        if new is None or "kernels" not in row:
            continue
        if "kernels" not in new:
            predicted.append(f"| {key[0]} | {key[1]} | {key[2]} | {row['predicted_us']:.0f} | "
                             f"refused: {'; '.join(new.get('invalid') or [new.get('error', '')])[:90]} | |")
            continue
        refused = " (refused now)" if new.get("invalid") else ""
        predicted.append(f"| {key[0]} | {key[1]} | {_config(row['config'])} → {_config(new['config'])}{refused} | "
                         f"{row['predicted_us']:.0f} | {new['predicted_us']:.0f} | "
                         f"{row['model_version']} → {new['model_version']} |")
        after_kernels = {k["name"]: k for k in new["kernels"]}
        for kernel in row["kernels"]:
            if kernel["name"] not in after_kernels:
                continue
            a = loop_figures(kernel, row["config"], d)
            b = loop_figures(after_kernels[kernel["name"]], new["config"], d)
            cells = [_pair(a[f], b[f]) for f in ("regs", "spill")]
            cells.append(f"{_pair(a['plain'], b['plain'])} / {_pair(a['masked'], b['masked'])}")
            cells += [_pair(a[f], b[f]) for f in ("mma", "mufu", "ffma", "fmul", "fadd", "loads", "bar", "c7515")]
            lines.append(f"| {key[0]} | {key[1]} | {key[2]}{refused} | {_role(kernel['name'])} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + "\n".join(predicted)


def sweep_table(rows: list[dict]) -> str:
    """Tensor-core work over the useful work (and exponentials per score) per kernel of each swept config."""
    lines = ["| target | config | kernel | MMA instr. per iteration | × useful tensor work | MUFU.EX2 per score |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        if "kernels" not in row:
            lines.append(f"| {row['target']} | {row['variant']} | - | {row.get('error', '')[:80]} | | |")
            continue
        side = "fwd" if row["variant"].startswith("fwd") else "bwd"
        for kernel in row["kernels"]:
            if (_role(kernel["name"]) == "fwd") != (side == "fwd"):
                continue
            figures = loop_figures(kernel, row["config"], 64)
            bq, bk, warps = _blocks(row["config"], _role(kernel["name"]))
            per_score = figures["mufu"] * 32 * warps / (bq * bk)
            lines.append(f"| {row['target']} | {row['variant']} | {_role(kernel['name'])} | "
                         f"{', '.join(min(kernel['loops'], key=lambda b: b['instructions'])['mmas'])} | "
                         f"{figures['mma'].split('(')[1].rstrip(')')} | {per_score:.2f} |")
    return "\n".join(lines)
