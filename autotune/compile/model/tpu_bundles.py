"""Read a libtpu LLO dump into per-program facts a time model can weigh: loops, trip counts, predicated regions.

libtpu writes its final VLIW schedule when `LIBTPU_INIT_ARGS="--xla_jf_dump_to=DIR
--xla_jf_dump_llo_pass_label_regex=final"` is set before jax starts (`dump_flags`). Per program (a Pallas kernel is
named after its custom call, e.g. `flash_attention.1`; XLA fusions and copies; `TLP`, the top-level program) the
`*-final_bundles.txt` file has one bundle per line, `ADDR MARKS: >>… { op ;; op }`; the number of `>` is the loop
depth, `LB` opens a loop body, `/* loop exit test */` carries its constant trip bound, and a forward `sbr.rel ...
target = $regionN` skips a predicated region that ends at the bundle opening region N. What the bundles cannot show
(how often a predicated region runs, how long an MXU is busy) is left to `tpu_model`.
"""
from __future__ import annotations

import glob
import os
import re
from collections import Counter
from dataclasses import dataclass, field

_LINE = re.compile(r"^\s*(0x[0-9a-f]+|\d+)\s+([A-Z]{2})?:?\s*(>*)\s*\{(.*)\}(.*)$")
_EXIT = re.compile(r"scmp\.(ge|gt)\.s32\.totalorder\s+%\w+,\s*(-?\d+)\s*/\*\s*loop exit test")
_BRANCH = re.compile(r"sbr\.rel\s*\(([^)]*)\)\s*target\s*=\s*\$region(\d+)")
_MATMUL = re.compile(r"vmatmul[\w.\[\]]*")
_DMA_WAIT = re.compile(r"dma\.done\.wait\s*(\([^)]*\))?\s*,?\s*%\w+\s*,\s*(\d+)")
_START = re.compile(r"^\s*(0x[0-9a-f]+|\d+)\s+([A-Z]{2})?:")
_SHAPE = re.compile(r"\b(pred|[a-z]+\d+[a-z0-9]*)\[([\d,]*)\]")
_CALL = re.compile(r"\s[a-z][\w\-]*\(")
_ITEM_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
               "s64": 8, "u64": 8, "f64": 8}
_FILE = re.compile(r"^(\d+)-(.+)-\d\d-final_bundles\.txt$")


def dump_flags(folder: str) -> str:
    """The LIBTPU_INIT_ARGS that make libtpu write the final bundles (about 2 MB per compile) into `folder`."""
    return f"--xla_jf_dump_to={folder} --xla_jf_dump_llo_pass_label_regex=final"


@dataclass(frozen=True)
class Bundle:
    """One VLIW bundle: its loop depth, mark (LB, PF, ...), and what it issues."""

    depth: int
    mark: str
    empty: bool
    matmuls: tuple[str, ...]  # the MXU unit of each vmatmul ('mxu0'.., 'mrb' or '' when not named)
    dma_granules: int  # DMA granules this bundle waits for (`dma.done.wait` carries the count as an immediate;
    # the granule's size is the chip's, `hardware.TpuHardware.dma_granule_bytes`)
    predicated_dma_granules: int  # of those, the ones whose wait is guarded by a predicate (may not run every trip)
    dma_count: int  # DMAs waited for
    exit_trips: int | None  # the constant bound of a `loop exit test` in this bundle
    branch_region: int | None  # target of a forward conditional branch
    opens: frozenset[int]  # regions whose start this bundle carries


@dataclass(frozen=True)
class Loop:
    """A loop: bundle range [start, end) in the program, its depth, trip count (None: not a constant)."""

    start: int
    end: int
    depth: int
    trips: int | None
    children: tuple[Loop, ...] = ()


@dataclass(frozen=True)
class Region:
    """A predicated region: bundles [start, end) skipped when its branch is taken."""

    start: int
    end: int
    region: int


@dataclass(frozen=True)
class Program:
    """One compiled program of a dump: kind 'kernel' (a Pallas custom call), 'fusion', 'copy', 'tlp' or 'other'."""

    name: str
    kind: str
    bundles: tuple[Bundle, ...]
    loops: tuple[Loop, ...]  # outermost loops, in order
    regions: tuple[Region, ...]
    capacity: dict[str, int] = field(default_factory=dict)  # slots per bundle and unit
    slot_use: dict[str, int] = field(default_factory=dict)  # summed use over the program's bundles (static)
    output_bytes: int | None = None  # what the program's HLO instruction produces (None: not in the dump)

    @property
    def grid_loop(self) -> Loop | None:
        """The outermost loop with the most bundles (a Pallas grid is one flat loop of prod(grid)+2 trips)."""
        return max(self.loops, key=lambda lp: lp.end - lp.start, default=None)


def loop_bundles(loop: Loop) -> int:
    """Bundles one trip of `loop` steps through: its own, plus each nested loop's times its trips (predicated
    regions counted whole); for a Pallas grid loop, the bundles of one grid step."""
    inner = sum(child.end - child.start for child in loop.children)
    return loop.end - loop.start - inner + sum(loop_bundles(c) * max(c.trips or 1, 1) for c in loop.children)


def _unit(op: str) -> str:
    found = re.search(r"mxu\d+", op)
    return found.group(0) if found else ""


def _parse_bundle(text: str) -> Bundle | None:
    match = _LINE.match(text.replace("\n", " "))
    if match is None:
        return None
    _, mark, arrows, body, tail = match.groups()
    exit_match = _EXIT.search(body)
    branch = _BRANCH.search(body)
    granules, predicated, dma_count = 0, 0, 0
    for guard, size in _DMA_WAIT.findall(body):
        dma_count += 1
        granules += int(size)
        predicated += int(size) if guard else 0
    opens = frozenset(int(n) for n in re.findall(r"Start(?:/End empty)? region (\d+)", tail))
    return Bundle(depth=len(arrows), mark=mark or "", empty=not body.strip(),
                  matmuls=tuple(_unit(m) for m in _MATMUL.findall(body)), dma_granules=granules,
                  predicated_dma_granules=predicated, dma_count=dma_count,
                  exit_trips=int(exit_match.group(2)) + (exit_match.group(1) == "gt") if exit_match else None,
                  branch_region=int(branch.group(2)) if branch else None, opens=opens)


def _fill_empty_depths(bundles: list[Bundle]) -> list[Bundle]:
    """Empty bundles carry no `>`: give each the smaller depth of its nearest non-empty neighbours."""
    depths = [b.depth for b in bundles]
    filled = list(bundles)
    for i, b in enumerate(bundles):
        if not b.empty:
            continue
        before = next((depths[j] for j in range(i - 1, -1, -1) if not bundles[j].empty), 0)
        after = next((depths[j] for j in range(i + 1, len(bundles)) if not bundles[j].empty), 0)
        filled[i] = Bundle(min(before, after), b.mark, True, (), 0, 0, 0, None, None, b.opens)
    return filled


def _loops(bundles: list[Bundle], lo: int, hi: int, depth: int) -> tuple[Loop, ...]:
    """Loops at `depth` inside bundles [lo, hi): maximal runs at >= depth, split where a new `LB` opens."""
    found: list[Loop] = []
    i = lo
    while i < hi:
        if bundles[i].depth < depth:
            i += 1
            continue
        j = i + 1
        while j < hi and bundles[j].depth >= depth and not (bundles[j].mark == "LB" and bundles[j].depth == depth):
            j += 1
        trips = next((b.exit_trips for b in bundles[i:j] if b.depth == depth and b.exit_trips is not None), None)
        if trips is not None or bundles[i].mark == "LB":  # a stray deeper bundle outside any loop is no loop
            found.append(Loop(i, j, depth, trips, _loops(bundles, i, j, depth + 1)))
        i = j
    return tuple(found)


def _regions(bundles: list[Bundle]) -> tuple[Region, ...]:
    found = []
    for i, b in enumerate(bundles):
        if b.branch_region is None:
            continue
        end = next((j for j in range(i + 1, len(bundles)) if b.branch_region in bundles[j].opens), None)
        if end is not None and end > i + 1:  # forward branch: a predicated region; backward ones close loops
            found.append(Region(i + 1, end, b.branch_region))
    return tuple(found)


def _utilization(path: str) -> tuple[dict[str, int], dict[str, int]]:
    """Slot capacity per unit and the program's summed static use per unit."""
    if not os.path.exists(path):
        return {}, {}
    with open(path, errors="replace") as handle:
        lines = handle.read().splitlines()
    try:
        at = next(i for i, line in enumerate(lines) if "CAPAC" in line)
    except StopIteration:
        return {}, {}
    units = [u.strip() for u in lines[at + 1].split(",")]
    capacity = dict(zip(units, (int(x) for x in lines[at + 2].split())))
    use = Counter()
    for line in lines[at + 3:]:
        parts = line.split()
        if len(parts) == len(units) and all(p.isdigit() for p in parts):
            for unit, value in zip(units, parts):
                use[unit] += int(value)
    return capacity, dict(use)


def output_bytes(path: str) -> int | None:
    """Bytes of the HLO result the program computes, from the first instruction line of its schedule analysis
    (`%fusion = bf16[8192,8192]{...} fusion(...)`; a tuple's elements summed); None when absent or unknown."""
    if not os.path.exists(path):
        return None
    with open(path, errors="replace") as handle:
        line = next((line for line in handle if " = " in line and "%" in line), "")
    result = line.split(" = ", 1)[-1] if line else ""
    call = _CALL.search(result)  # the opcode's call, e.g. ` fusion(`, ends the result type
    result = result[:call.start()] if call else ""
    total = 0
    for dtype, dims in _SHAPE.findall(result):
        if dtype not in _ITEM_BYTES:
            return None
        count = 1
        for dim in filter(None, dims.split(",")):
            count *= int(dim)
        total += count * _ITEM_BYTES[dtype]
    return total or None


def program_kind(name: str, custom_call: bool) -> str:
    """'tlp', 'kernel' (a Pallas custom call), 'copy', 'fusion' (any other XLA program) or 'other' (libtpu's own)."""
    if name == "TLP":
        return "tlp"
    if name.startswith("<"):
        return "other"
    if custom_call:
        return "kernel"
    return "copy" if name.split(".")[0] in ("copy", "transpose") else "fusion"


def parse_program(path: str) -> Program:
    """Parse one `*-final_bundles.txt` (and its utilization file beside it)."""
    match = _FILE.match(os.path.basename(path))
    name = match.group(2) if match else os.path.basename(path)
    with open(path, errors="replace") as handle:
        lines = handle.read().splitlines()
    entry = next((line for line in lines if "entry bundle:" in line), "")
    custom_call = "= custom-call(" in entry.split("entry bundle:")[-1]
    joined: list[str] = []
    for line in lines:  # a bundle's comment may run over several lines
        if _START.match(line) or not joined:
            joined.append(line)
        else:
            joined[-1] += " " + line
    parsed = [b for b in (_parse_bundle(line) for line in joined) if b is not None]
    bundles = _fill_empty_depths(parsed)
    util = glob.glob(path.rsplit("-", 2)[0] + "-*static-per-bundle-utilization.txt")
    capacity, use = _utilization(util[0]) if util else ({}, {})
    analysis = glob.glob(path.rsplit("-", 2)[0] + "-*schedule-analysis_final_bundles.txt")
    return Program(name=name, kind=program_kind(name, custom_call), bundles=tuple(bundles),
                   loops=_loops(bundles, 0, len(bundles), 1), regions=_regions(bundles), capacity=capacity,
                   slot_use=use, output_bytes=output_bytes(analysis[0]) if analysis else None)


def parse_dump(folder: str) -> list[Program]:
    """Every program in a dump folder (latest file per name when a folder holds several compiles' files)."""
    latest: dict[str, str] = {}
    for path in sorted(glob.glob(os.path.join(folder, "*-final_bundles.txt"))):
        base = os.path.basename(path)
        if "schedule-analysis" in base:
            continue
        match = _FILE.match(base)
        if match:
            latest[match.group(2)] = path
    return [parse_program(path) for path in latest.values()]
