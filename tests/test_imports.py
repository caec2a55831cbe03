"""The import graph of kernels/, db/ and autotune/: no cycles (function-level imports included), and the packages'
boundaries: kernels/ imports neither db/ nor autotune/, db/ never imports jax (nor kernels/ or autotune/).

The graph is read from the source with `ast`, so an import inside a function counts as much as one at the top: a
cycle that works only because of where a line sits is still a cycle.
"""
from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("kernels", "db", "autotune")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(path): path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}


def imported_names(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """Every module an import statement anywhere in the file names (`from a import b` is `a.b` when that is a
    module, else `a`); relative imports resolved against the file's package."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in modules else base)
    return found


def project_graph() -> dict[str, set[str]]:
    modules = project_modules()
    graph = {}
    for name, path in modules.items():
        graph[name] = {target for target in imported_names(path, name, modules)
                       if target in modules and target != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def all_imports(package: str) -> dict[str, set[str]]:
    """Every name each module of a package imports, project or not (top-level package names)."""
    modules = project_modules()
    return {name: {target.split(".")[0] for target in imported_names(path, name, modules)}
            for name, path in modules.items() if name.split(".")[0] == package}


def test_the_graph_is_read():
    graph = project_graph()
    assert "autotune.search.loop" in graph and "autotune.search.study" in graph["autotune.search.loop"]
    assert "autotune.measure.evaluation" in graph["autotune.measure.isolation"]  # a function-level import counts too: see below
    assert "autotune.search.loop" in graph["autotune.runtime.lookup"]  # imported inside a function there


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_the_project():
    cycle = find_cycle(project_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# The stages of autotune/, each importing only the ones before it (the shared nouns at the top come first).
STAGES = ("", "measure", "compile", "search", "runtime", "cli")


def stage_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in STAGES else ""


def test_every_autotune_module_sits_in_a_stage_or_at_the_top():
    top = sorted(name for name in project_modules() if name.count(".") == 1 and name.startswith("autotune.")
                 and name.split(".")[1] not in STAGES)
    folders = sorted(p.name for p in (ROOT / "autotune").iterdir() if p.is_dir() and p.name != "__pycache__")
    assert folders == sorted(STAGES[1:])
    assert len(top) <= 12, f"too many shared modules at the top of autotune/: {top}"


def test_stages_import_one_way():
    wrong = []
    for name, targets in project_graph().items():
        if not name.startswith("autotune.") or name == "autotune.__main__":  # the entry points run the app
            continue
        for target in targets:
            if target.startswith("autotune.") and target != "autotune" and \
                    STAGES.index(stage_of(target)) > STAGES.index(stage_of(name)):
                wrong.append(f"{name} -> {target}")
    assert not wrong, "a stage imports a later one: " + ", ".join(sorted(wrong))


def test_no_module_imports_a_private_name_of_another_package():
    modules = project_modules()
    wrong = []
    for name, path in modules.items():
        package = name.rpartition(".")[0] if path.name != "__init__.py" else name
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                source = node.module if node.module in modules else node.module.rpartition(".")[0]
                source_package = source if (ROOT / source.replace(".", "/")).is_dir() else source.rpartition(".")[0]
                if source_package != package:
                    wrong += [f"{name}: {node.module}.{a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__")]
    assert not wrong, "private names imported across packages: " + ", ".join(wrong)


@pytest.mark.parametrize("package, forbidden", [("kernels", {"db", "autotune"}),
                                                ("db", {"jax", "jaxlib", "kernels", "autotune"})])
def test_package_boundaries(package, forbidden):
    wrong = {name: sorted(names & forbidden) for name, names in all_imports(package).items() if names & forbidden}
    assert not wrong, f"{package}/ must not import {sorted(forbidden)}: {wrong}"


def test_the_database_keeps_every_problem_field():
    """db/ imports nothing of ours, so TuningKey and the key table list the problem's fields themselves: they must be
    the fields the field table sets (autotune/problem_fields.py), in its order."""
    from autotune.problem_fields import FIELDS
    from db import TuningKey
    from db.schema import KeyRow

    problem_fields = [name for field in FIELDS for name in field.problem]
    key_fields = [field.name for field in dataclasses.fields(TuningKey)]
    assert [name for name in key_fields if name in problem_fields] == problem_fields
    assert set(key_fields) - set(problem_fields) == {"kernel", "kernel_version", "platform", "device_kind",
                                                     "jax_version"}
    assert set(key_fields) <= set(KeyRow.__table__.columns.keys())
