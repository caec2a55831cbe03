"""Trials grouped into the cells of a block_q x block_k map, shared by the timing map and the compile-only map.

Config values come from the database and may be any JSON (a user kernel's tunables can be strings): numbers sort
first by value, anything else after them by its JSON text, so mixed values never fail to sort.
"""
from __future__ import annotations

import json
from collections import defaultdict

CHAR_W = 6.7  # px per character of the maps' and charts' 11px monospace text: what their layout reserves


def value_order(value) -> tuple:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return (0, value, "") if number else (1, 0, json.dumps(value, sort_keys=True, default=str))


def block_cells(trials: list) -> tuple[dict[tuple, list], list, list]:
    """({(block_q, block_k): trials}, sorted block_q values, sorted block_k values); empty when no config has both."""
    cells: dict[tuple, list] = defaultdict(list)
    for t in trials:
        cell = (t.config.get("block_q"), t.config.get("block_k"))
        if all(isinstance(value, (bool, int, float, str)) for value in cell):  # a list (a hand edit) has no cell
            cells[cell].append(t)
    rows = sorted({q for q, _ in cells}, key=value_order)
    cols = sorted({k for _, k in cells}, key=value_order)
    return dict(cells), rows, cols
