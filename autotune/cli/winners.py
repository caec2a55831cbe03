"""How the commands show which implementation won a key: the tuned kernel ("pallas") or jax.nn's XLA or cuDNN
attention, and the others' times from the same final re-timing (autotune.search.winner says how it is chosen)."""
from __future__ import annotations

from collections.abc import Mapping

from autotune.cli.common import format_ms
from db import KERNEL_IMPLEMENTATION as KERNEL
from kernels.devices import INTERPRET

INTERPRET_NOTE = ("on the CPU interpret platform the kernel stays the winner: its interpret-mode times are never "
                  "compared with compiled XLA")


def others_text(times: Mapping[str, float], winner: str) -> str:
    """'pallas 1.020, xla 2.973': the times (ms) of the implementations that did not win, fastest first; '-' when
    none was timed beside the winner."""
    others = sorted((name for name in times if name != winner), key=lambda name: times[name])
    return ", ".join(f"{name} {format_ms(times[name])}" for name in others) or "-"


def winner_note(platform: str, winner: str, times: Mapping[str, float]) -> str:
    """One line on which implementation won and how, starting with its name, for the search summary and `show`."""
    baselines = [name for name in times if name != KERNEL]
    if not baselines:
        return (f"{KERNEL}: no baseline was timed beside the kernel (--no-xla, or a result from before baselines "
                "competed)")
    if platform == INTERPRET:
        return f"{KERNEL}: {' and '.join(baselines)} timed ({others_text(times, KERNEL)} ms); {INTERPRET_NOTE}"
    if winner == KERNEL:
        return (f"{KERNEL}: the kernel won against {others_text(times, KERNEL)} ms (a baseline wins only when it is "
                "faster by more than the margin, --baseline-margin)")
    return (f"{winner} won: {format_ms(times[winner])} ms against the kernel's {format_ms(times[KERNEL])} ms; "
            f"autotune.dot_product_attention runs jax.nn's {winner} attention for this key (implementation='pallas' "
            "forces the kernel)")
