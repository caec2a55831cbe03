"""Each GPU kernel of a compile as its machine code: PTX from XLA's dump -> ptxas -> cuobjdump -sass -> counts.

XLA keeps each Triton kernel's PTX (`module_*.ptx`) and, in `*thunk_sequence.txt`, how it is launched (grid,
threads, shared memory), but no cubin; running ptxas on that PTX reproduces XLA's register counts exactly. The main
loop of a flash-attention kernel is the branch that jumps backwards; what one iteration costs is in the counts of
its instructions per class (tensor-core MMAs with their shapes, exponentials, FP32 math, loads, barriers). Parsed
kernels are cached per PTX hash (in memory and on disk), so the same kernel is never disassembled twice.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field

CACHE_ENV = "AUTOTUNE_SASS_CACHE"
PARSER_VERSION = "1"  # part of the cache key: a changed parser never reads an old parse
INSTALL_HINT = "pip install -e '.[compilers]'"

_CLASSES = (
    ("mma", ("HGMMA", "HMMA", "IMMA")), ("mufu", ("MUFU",)),
    ("fp32", ("FFMA", "FMUL", "FADD", "FMNMX", "FSWZADD")), ("conv", ("F2F", "F2FP", "I2F", "F2I", "I2FP")),
    ("ldg", ("LDG",)), ("ldgsts", ("LDGSTS",)), ("lds", ("LDS", "LDSM")), ("sts", ("STS",)), ("stg", ("STG",)),
    ("tma", ("UTMALDG", "UTMASTG", "UBLKCP")), ("bar", ("BAR",)), ("wait", ("DEPBAR", "WARPGROUP", "SYNCS")),
    ("branch", ("BRA", "EXIT", "BSYNC", "BSSY", "WARPSYNC", "NOP")),
)
_OPCODE_CLASS = {op: name for name, ops in _CLASSES for op in ops}
_LINE = re.compile(r"/\*(?P<addr>[0-9a-f]{4,})\*/\s+(?P<pred>@!?U?P[T0-9]+\s+)?(?P<op>[A-Z][A-Z0-9_]*)"
                   r"(?P<mods>[.\w]*)\s*(?P<args>[^;]*);")
_FUNCTION = re.compile(r"^\s*Function : (\S+)", re.M)
_HGMMA = re.compile(r"\.(\d+)x(\d+)x(\d+)")
_HMMA = re.compile(r"\.(16)(8)(8|16|32)")
_PTXAS = re.compile(r"Compiling entry function '(?P<name>[^']+)'.*?(?P<stack>\d+) bytes stack frame, "
                    r"(?P<stores>\d+) bytes spill stores, (?P<loads>\d+) bytes spill loads.*?Used (?P<regs>\d+) "
                    r"registers", re.S)
_THUNK = re.compile(r"kCustomKernel[^\n]*?\]\s+(?P<name>[\w.$]+)\s+grid: \[(?P<grid>[\d, ]+)\]\s+threads: "
                    r"\[(?P<threads>[\d, ]+)\]\s+shared_memory: (?P<smem>\d+) bytes")


@dataclass(frozen=True)
class Mma:
    """One kind of tensor-core instruction: HGMMA (per warpgroup) or HMMA (per warp), its m, n, k and count."""

    op: str
    m: int
    n: int
    k: int
    count: int
    tf32: bool = False

    @property
    def flops(self) -> int:
        return 2 * self.m * self.n * self.k * self.count


@dataclass(frozen=True)
class Block:
    """Instruction counts of one stretch of code (a loop body, or everything outside the loops), per warp."""

    start: int  # address of the first instruction
    end: int  # address of the last (the backward branch of a loop)
    counts: dict[str, int] = field(default_factory=dict)  # instructions per class
    mmas: tuple[Mma, ...] = ()
    full_waits: int = 0  # wgmma waits for every group in flight (`WARPGROUP.DEPBAR.LE gsb0, 0x0`)
    shared_bytes: int = 0  # shared-memory bytes moved per warp (LDS/LDSM/STS/LDGSTS)
    global_bytes: int = 0  # global-memory bytes loaded or stored per warp (LDG/LDGSTS/STG)

    @property
    def instructions(self) -> int:
        return sum(self.counts.values())


@dataclass(frozen=True)
class KernelSass:
    """One compiled kernel: launch figures from the thunk sequence, ptxas's report, and its loops' counts."""

    name: str
    grid: tuple[int, int, int]
    threads: int
    shared_memory: int
    registers: int
    spill_bytes: int
    loops: tuple[Block, ...]  # in program order; innermost backward branches
    rest: Block  # every instruction outside the loops
    arch: str

    @property
    def warps(self) -> int:
        return max(1, -(-self.threads // 32))

    @property
    def programs(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]


def tool_path(name: str) -> str | None:
    """ptxas / cuobjdump / nvdisasm: on PATH, else from the NVIDIA pip wheels next to this interpreter."""
    found = shutil.which(name)
    if found:
        return found
    for base in sys.path:
        for hit in sorted(glob.glob(os.path.join(base, "nvidia", "*", "bin", name))):
            if os.access(hit, os.X_OK):
                return hit
    return None


def tools_missing() -> str | None:
    """Why SASS cannot be read here (None when ptxas, cuobjdump and nvdisasm are all found)."""
    missing = [n for n in ("ptxas", "cuobjdump", "nvdisasm") if tool_path(n) is None]
    return f"{', '.join(missing)} not found ({INSTALL_HINT})" if missing else None


def _mma(op: str, mods: str, count: int) -> Mma | None:
    shape = _HGMMA.search(mods) if op == "HGMMA" else _HMMA.search(mods)
    if shape is None:
        return None
    return Mma(op=op, m=int(shape[1]), n=int(shape[2]), k=int(shape[3]), count=count, tf32="TF32" in mods)


def _shared_bytes(op: str, mods: str) -> int:
    if op == "LDSM":
        return 128 * (4 if ".X4" in mods.upper() else 2 if ".X2" in mods.upper() else 1)
    if op in ("LDS", "STS", "LDGSTS"):
        width = re.search(r"\.(128|64|U8|S8|U16|S16)\b", mods)
        return 32 * {"128": 16, "64": 8}.get(width[1] if width else "", 4)
    return 0


def _global_bytes(op: str, mods: str) -> int:
    if op not in ("LDG", "LDGSTS", "STG"):
        return 0
    width = re.search(r"\.(128|64)\b", mods)
    return 32 * {"128": 16, "64": 8}.get(width[1] if width else "", 4)


def _block(lines: list[tuple], start: int, end: int) -> Block:
    counts: Counter = Counter()
    mmas: Counter = Counter()
    waits = shared = global_ = 0
    for addr, op, mods, args, _ in lines:
        if not start <= addr <= end:
            continue
        counts[_OPCODE_CLASS.get(op, "other")] += 1
        if op in ("HGMMA", "HMMA", "IMMA"):
            mmas[(op, mods)] += 1
        if op == "WARPGROUP" and mods.startswith(".DEPBAR") and re.search(r"0x0\s*$", args):
            waits += 1
        shared += _shared_bytes(op, mods)
        global_ += _global_bytes(op, mods)
    found = tuple(m for (op, mods), n in sorted(mmas.items()) if (m := _mma(op, mods, n)) is not None)
    return Block(start=start, end=end, counts=dict(counts), mmas=found, full_waits=waits, shared_bytes=shared,
                 global_bytes=global_)


def parse_sass(sass: str) -> dict[str, tuple[list[tuple[Block, ...]], Block]]:
    """Per function in a `cuobjdump -sass` listing: its innermost loops (backward branches) and the rest."""
    found = {}
    starts = list(_FUNCTION.finditer(sass)) + [None]
    for here, after in zip(starts, starts[1:]):
        text = sass[here.end(): after.start() if after else len(sass)]
        lines = []
        for m in _LINE.finditer(text):
            lines.append((int(m["addr"], 16), m["op"], m["mods"], m["args"].strip(), m["pred"] or ""))
        spans = []
        for addr, op, _, args, _ in lines:
            target = re.match(r"0x([0-9a-f]+)", args) if op == "BRA" else None
            if target and int(target[1], 16) < addr:
                spans.append((int(target[1], 16), addr))
        inner = [s for s in spans if not any(o != s and s[0] <= o[0] and o[1] <= s[1] for o in spans)]
        loops = tuple(_block(lines, a, b) for a, b in sorted(inner))
        rest_lines = [ln for ln in lines if not any(a <= ln[0] <= b for a, b in inner)]
        rest = _block(rest_lines, 0, 1 << 62)
        found[here.group(1)] = (loops, rest)
    return found


def _ptxas_report(log: str) -> dict[str, tuple[int, int]]:
    return {m["name"]: (int(m["regs"]), int(m["stores"]) + int(m["loads"])) for m in _PTXAS.finditer(log)}


_MEMORY: dict[str, dict] = {}


def _cache_dir() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "autotune", "sass")


def compile_ptx(ptx: str, arch: str) -> dict:
    """ptxas + cuobjdump on one PTX module; {function: {registers, spill_bytes, loops, rest}}, cached per hash."""
    key = hashlib.sha256((PARSER_VERSION + arch + "\0" + ptx).encode()).hexdigest()[:32]
    if key in _MEMORY:
        return _MEMORY[key]
    path = os.path.join(_cache_dir(), key + ".json")
    if os.path.exists(path):
        with open(path) as f:
            _MEMORY[key] = json.load(f)
        return _MEMORY[key]
    reason = tools_missing()
    if reason:
        raise RuntimeError(reason)
    with tempfile.TemporaryDirectory(prefix="autotune-sass-") as folder:
        source, cubin = os.path.join(folder, "k.ptx"), os.path.join(folder, "k.cubin")
        with open(source, "w") as f:
            f.write(ptx)
        report = subprocess.run([tool_path("ptxas"), f"-arch={arch}", "-O3", "-v", source, "-o", cubin],
                                capture_output=True, text=True, check=True)
        env = {**os.environ, "PATH": os.path.dirname(tool_path("nvdisasm")) + os.pathsep + os.environ["PATH"]}
        sass = subprocess.run([tool_path("cuobjdump"), "-sass", cubin], capture_output=True, text=True, check=True,
                              env=env).stdout
    regs = _ptxas_report(report.stdout + report.stderr)
    data = {}
    for name, (loops, rest) in parse_sass(sass).items():
        r, spills = regs.get(name, (0, 0))
        data[name] = {"registers": r, "spill_bytes": spills, "loops": [_dump(b) for b in loops], "rest": _dump(rest)}
    os.makedirs(_cache_dir(), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(data, f)
    os.replace(path + ".tmp", path)
    _MEMORY[key] = data
    return data


def _dump(block: Block) -> dict:
    return asdict(block)


def _load(data: dict) -> Block:
    return Block(start=data["start"], end=data["end"], counts=dict(data["counts"]),
                 mmas=tuple(Mma(**m) for m in data["mmas"]), full_waits=data["full_waits"],
                 shared_bytes=data["shared_bytes"], global_bytes=data.get("global_bytes", 0))


def launches(dump_dir: str) -> list[tuple[str, tuple[int, int, int], int, int]]:
    """(kernel name, grid, threads, shared memory) of each kernel launch in the thunk sequence, in order."""
    text = "".join(open(p).read() for p in sorted(glob.glob(os.path.join(dump_dir, "*thunk_sequence.txt"))))
    found = []
    for m in _THUNK.finditer(text):
        grid = tuple(int(x) for x in m["grid"].split(","))
        threads = 1
        for x in m["threads"].split(","):
            threads *= int(x)
        found.append((m["name"], (grid + (1, 1))[:3], threads, int(m["smem"])))
    return found


def dump_kernels(dump_dir: str, arch: str, keep=None) -> list[KernelSass]:
    """Every launched kernel of a compile whose PTX is in the dump, parsed (XLA's library calls have none); with
    `keep` (a predicate on the kernel name) only those, so no time goes to disassembling the others."""
    ptx_files = [p for p in sorted(glob.glob(os.path.join(dump_dir, "*.ptx"))) if os.path.getsize(p)]
    entries: dict[str, str] = {}
    for p in ptx_files:
        text = open(p).read()
        for name in re.findall(r"\.entry\s+([\w.$]+)\s*\(", text):
            entries.setdefault(name, text)
    found = []
    for name, grid, threads, smem in launches(dump_dir):
        if name not in entries or (keep is not None and not keep(name)):
            continue
        data = compile_ptx(entries[name], arch).get(name)
        if data is None:
            continue
        found.append(KernelSass(name=name, grid=grid, threads=threads, shared_memory=smem,
                                registers=data["registers"], spill_bytes=data["spill_bytes"],
                                loops=tuple(_load(b) for b in data["loops"]), rest=_load(data["rest"]), arch=arch))
    return found


def kernel_to_dict(kernel: KernelSass) -> dict:
    """A parsed kernel as JSON-ready data (so a calibration can re-predict without compiling again)."""
    return asdict(kernel)


def kernel_from_dict(data: dict) -> KernelSass:
    return KernelSass(name=data["name"], grid=tuple(data["grid"]), threads=data["threads"],
                      shared_memory=data["shared_memory"], registers=data["registers"],
                      spill_bytes=data["spill_bytes"], loops=tuple(_load(b) for b in data["loops"]),
                      rest=_load(data["rest"]), arch=data["arch"])
