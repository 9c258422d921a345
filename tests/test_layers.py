"""The floors of lmech (issue 15): a module imports only from its own floor or below.

Every ``import`` in ``src/lmech`` is read from the source (``ast``), the ones inside functions
(lazy imports) included, so an upward import cannot hide in a function body. Besides the floors:
no import circle between the top-level packages, no source file over 700 lines, the probes import
no optimizer (``lmech.optim``), nothing outside the catalog imports its private modules or names,
and the readers (``report``, ``lab``) import neither a catalog entry nor an executor (``sweeps``,
``compare``) nor the CLI: they may import the catalog's table (``lmech.experiments``) and its
figures (``lmech.experiments.figures``), which are not entries.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lmech"

# low -> high; a package may import its own floor and every floor below
FLOORS = [
    ["errors", "plotting"],
    ["core", "contract"],
    ["probes", "theory", "optim", "tasks", "models", "mup"],
    ["monitor", "stopping", "prune", "dpo", "train"],
    ["integrations", "runs"],
    ["experiments"],
    ["sweeps", "compare", "verify", "report", "lab"],
    ["cli"],
]
FLOOR_OF = {package: i for i, packages in enumerate(FLOORS) for package in packages}
MAX_LINES = 700
READERS = ("report", "lab")
NOT_FOR_READERS = ("lmech.sweeps", "lmech.compare", "lmech.cli")
READER_MAY_USE = ("lmech.experiments", "lmech.experiments.figures")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top(module: str) -> str | None:
    """``lmech.x.y`` -> ``x``; ``None`` for the root package and for other packages."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "lmech" else None


def imports_of(path: Path) -> list[tuple[int, str]]:
    """``(line, imported module)`` for every import statement of the file, at any depth;
    ``from lmech import x`` counts as ``lmech.x``, relative imports are resolved."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            if target == "lmech":
                found += [(node.lineno, f"lmech.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, target))
    return found


SOURCES = sorted(SRC.rglob("*.py"))
EDGES = [(path, line, target) for path in SOURCES for line, target in imports_of(path)]


def where(path: Path, line: int) -> str:
    return f"{path.relative_to(SRC.parent)}:{line}"


def test_every_package_has_a_floor():
    packages = {top(module_name(p)) for p in SOURCES} - {None}
    imported = {top(t) for _, _, t in EDGES} - {None}
    assert sorted((packages | imported) - set(FLOOR_OF)) == [], "add the new package to FLOORS"


def test_no_upward_import():
    upward = [f"{where(p, line)}  {top(module_name(p))} -> {top(t)}  ({t})" for p, line, t in EDGES
              if top(module_name(p)) and top(t) and FLOOR_OF[top(t)] > FLOOR_OF[top(module_name(p))]]
    assert upward == []


def test_no_import_circle_between_packages():
    graph: dict[str, set[str]] = {}
    for p, _, t in EDGES:
        a, b = top(module_name(p)), top(t)
        if a and b and a != b:
            graph.setdefault(a, set()).add(b)
    circles = []

    def visit(node: str, trail: list[str]):
        for nxt in sorted(graph.get(node, ())):
            if nxt == trail[0]:
                circles.append(" -> ".join(trail + [nxt]))
            elif nxt not in trail and nxt > trail[0]:  # each circle once, from its smallest package
                visit(nxt, trail + [nxt])

    for start in sorted(graph):
        visit(start, [start])
    assert circles == []


def catalog_entries() -> set[str]:
    """The modules the catalog registers (read from ``lmech/experiments/__init__.py``)."""
    tree = ast.parse((SRC / "experiments" / "__init__.py").read_text())
    return {node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and node.value.startswith("lmech.experiments.")}


def test_the_catalog_table_is_read():
    entries = catalog_entries()
    assert "lmech.experiments.grokking" in entries and len(entries) >= 20


def forbidden_for_readers(target: str, entries: set[str]) -> bool:
    """An executor, the CLI, a catalog entry, or any other catalog module than its table and figures."""
    executor = any(target == x or target.startswith(x + ".") for x in NOT_FOR_READERS)
    catalog_code = (target.startswith("lmech.experiments.") and target not in READER_MAY_USE
                    and not target.startswith("lmech.experiments.figures."))
    return executor or catalog_code or target in entries


@pytest.mark.parametrize("reader", READERS)
def test_readers_import_no_entry_no_executor_no_cli(reader):
    entries = catalog_entries()
    bad = [f"{where(p, line)}  {t}" for p, line, t in EDGES
           if top(module_name(p)) == reader and forbidden_for_readers(t, entries)]
    assert bad == []


def test_the_reader_rule_flags_entries_executors_and_the_cli():
    entries = catalog_entries()
    targets = ["lmech.experiments.grokking", "lmech.experiments.runner", "lmech.sweeps.plan", "lmech.compare",
               "lmech.cli", "lmech.experiments", "lmech.experiments.figures.grokking", "lmech.runs.runner",
               "lmech.contract.registry"]
    assert [t for t in targets if forbidden_for_readers(t, entries)] == targets[:5]


def test_probes_import_no_optimizer():
    # same floor, so the floor rule allows it; the instruments measure any optimizer, and import none
    found = [f"{where(p, line)}  {t}" for p, line, t in EDGES
             if top(module_name(p)) == "probes" and top(t) == "optim"]
    assert found == []


def test_nothing_outside_the_catalog_imports_its_private_names():
    private = []
    for path in SOURCES:
        if top(module_name(path)) == "experiments":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lmech.experiments"):
                names = [a.name for a in node.names if a.name.startswith("_")]
                if names or any(part.startswith("_") for part in node.module.split(".")):
                    private.append(f"{where(path, node.lineno)}  {node.module} {names}")
            elif isinstance(node, ast.Import):
                private += [f"{where(path, node.lineno)}  {a.name}" for a in node.names
                            if a.name.startswith("lmech.experiments.") and "._" in a.name]
    assert private == []


def test_no_source_file_over_700_lines():
    long = [f"{p.relative_to(SRC.parent)}: {n} lines" for p in SOURCES
            if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert long == []


def test_imports_seen_inside_functions():
    # a lazy import (inside a function) is an edge like any other
    lazy = [t for p, _, t in EDGES if p == SRC / "experiments" / "__init__.py"]
    assert "lmech.runs.runner" in lazy
