"""The README's code blocks, taken apart for tests/test_readme.py: which block is which, the commands of a shell
block, the commands and expected outputs of a console block, and the normal form both outputs are compared in.

Outputs are compared after masking what changes from run to run (numbers, digests, paths of files, the spacing of
tables); a README output line `...` stands for any number of lines.
"""
from __future__ import annotations

import ast
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", flags=re.S | re.M)
KINDS = ("python", "sh", "console", "text", "toml")


@dataclass(frozen=True)
class Block:
    kind: str
    body: str
    section: str  # the heading it sits under, to name its test

    @property
    def name(self) -> str:
        return self.section.lower().replace(" ", "-").replace("`", "")


def blocks() -> list[Block]:
    found = []
    for match in BLOCK.finditer(README):
        headings = re.findall(r"^#{2,3} (.+)$", README[:match.start()], flags=re.M)
        found.append(Block(match.group(1), match.group(2), headings[-1] if headings else "top"))
    return found


# ---------------------------------------------------------------- shell blocks


def shell_commands(body: str) -> list[str]:
    """The commands of a shell block: continuation lines joined, comments dropped, split at && ; | and &, loops'
    keywords and environment assignments left out."""
    text = re.sub(r"\\\n\s*", " ", body)
    commands = []
    for line in text.splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        if not line or line.startswith("#"):
            continue
        for part in re.split(r"&&|;|\||(?<![>&])&(?!&)", line):
            words = shlex.split(part, posix=True) if part.strip() else []
            while words and (re.fullmatch(r"[A-Z_]+=\S*", words[0]) or words[0] in ("do", "done", "wait")):
                words = words[1:]
            if words and words[0] != "for":
                commands.append(shlex.join(words))
    return commands


# ---------------------------------------------------------------- console blocks


@dataclass(frozen=True)
class Step:
    command: str  # as typed after `$ `
    expected: list[str]


def console_steps(body: str) -> list[Step]:
    steps: list[Step] = []
    for line in body.splitlines():
        if line.startswith("$ "):
            steps.append(Step(line[2:], []))
        elif steps:
            steps[-1].expected.append(line)
    return steps


_PATH = re.compile(r"(?:~/|/)(?:[\w.+-]+/)*([\w.-]+\.(?:db|json|html|toml))")
_DIGEST = re.compile(r"\b[0-9a-f]{12,40}\b")
_NUMBER = re.compile(r"\d+(?:\.\d+)?(?:e[-+]?\d+)?")


_CHANCE = re.compile(r" \((?:default|stored best|default, stored best)\)|the default config \(timed once\)")


def normal(line: str) -> str:
    """A line with what changes between runs masked: table rules, file paths to their names, digests, numbers,
    spacing, and what depends on which config won (which trial row is the stored best; bench's note when it is the
    default)."""
    if re.fullmatch(r"[-\s]*-[-\s]*", line):  # a table's rule: its widths follow the values (11 trials: "--")
        return "--"
    line = _CHANCE.sub("", line)
    line = _PATH.sub(r"<path>/\1", line)
    line = _DIGEST.sub("<hex>", line)
    line = _NUMBER.sub("#", line)
    line = re.sub(r"-{2,}", "--", line)
    return " ".join(line.split())


def matches(actual: list[str], expected: list[str]) -> bool:
    """Whether the output lines match the README's, line by line in normal form (blank lines aside); a README line
    `...` matches any number of lines."""
    pattern = "".join(r"(?:[^\n]*\n)*?" if line.strip() == "..." else re.escape(normal(line)) + "\n"
                      for line in expected if line.strip())
    return re.fullmatch(pattern, "".join(normal(line) + "\n" for line in actual if line.strip())) is not None


# ---------------------------------------------------------------- text blocks: words the code really prints


def source_literals() -> list[str]:
    """Every string literal of the project's code (f-strings' literal parts, implicit concatenations joined)."""
    found = []
    for package in ("autotune", "db", "kernels"):
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    found.append(node.value)
    return found


def literal_fragment(line: str) -> str:
    """The longest stretch of a printed line with no number, path, quoted value or flag value in it: what the code
    must print literally."""
    line = re.sub(r"^(?:\S*: )?(?:Error|\w*Warning): ", "", line)  # what click and warnings put before a message
    pieces = re.split(r"\S*\d\S*|/\S+|'[^']*'|`[^`]*`|\$\w+|\[[^\]]*\]|\w+=\S*|\([^)]*\)", line)
    return max((p.strip(" :;,.") for p in pieces), key=len, default="")


def pieces_printed(fragment: str, literals: list[str], most: int = 5) -> bool:
    """Whether `fragment` is at most `most` literals of the code put one after the other (a message built from an
    f-string and the text of its placeholder), each piece the longest one a literal holds and at least 8 characters."""
    corpus = "\0".join(literals)
    start, pieces = 0, 0
    while start < len(fragment):
        low, high = 0, len(fragment) - start
        while low < high:  # the longest prefix of what is left that some literal holds
            middle = (low + high + 1) // 2
            if fragment[start:start + middle] in corpus:
                low = middle
            else:
                high = middle - 1
        if low < min(8, len(fragment) - start):  # a piece shorter than a few words proves nothing
            return False
        start, pieces = start + low, pieces + 1
    return pieces <= most
