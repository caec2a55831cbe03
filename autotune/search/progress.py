"""The progress bar of a search. What it shows as "best" is the fastest *trial* time so far; the stored best comes
from the final interleaved re-timing (retime.py), which the summary printed after the search reports."""
from __future__ import annotations

from tqdm import tqdm

from autotune.problem_fields import describe
from kernels import Problem


def trial_postfix(best: float | None, default: float | None) -> str:
    if best is None:
        return "best trial -"
    text = f"best trial {best * 1e3:.3f} ms"
    return text + (f" ({default / best:.2f}x default's trial)" if default else "")


def progress_bar(total: int, problem: Problem, *, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=describe(problem), unit="trial", disable=not enabled, leave=True, dynamic_ncols=True)
