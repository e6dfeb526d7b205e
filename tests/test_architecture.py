"""How the code depends on itself and on others, beyond import-linter's contracts in ``make
lint``: no module of kubetune imports itself back through another (a cycle makes import order
matter and hides which module owns what), and the benchmarks import only what they declare."""

from __future__ import annotations

import ast
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import grimp
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]

PACKAGES = (
    "kubetune",
    "kubetune_runtime",
    "kubetune_api",
    "kubetune_operator",
    "kubetune_trainer",
    "kubetune_cli",
    "kubetune_local",
)


def cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """One import chain per direct import that is also reached back from the imported module."""
    found = []
    for module in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            if imported in graph.modules:
                back = graph.find_shortest_chain(importer=imported, imported=module)
                if back:
                    found.append([module, *back])
    return found


def test_no_module_imports_itself_back() -> None:
    assert cycles(grimp.build_graph(*PACKAGES)) == []


def test_a_cycle_would_be_found() -> None:
    graph = grimp.ImportGraph()
    for module in ("p", "p.a", "p.b"):
        graph.add_module(module)
    graph.add_import(importer="p.a", imported="p.b")
    graph.add_import(importer="p.b", imported="p.a")
    assert cycles(graph) == [["p.a", "p.b", "p.a"], ["p.b", "p.a", "p.b"]]


FIRST_PARTY = frozenset({*PACKAGES, "tests", "benchmarks"})


def imported_modules(path: Path) -> set[str]:
    """The top-level modules a file imports (anywhere in it)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def declared(extra: str) -> set[str]:
    """The distributions an extra of this project brings, transitively (canonical names)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    found: set[str] = set()
    pending = [Requirement(r) for r in project["optional-dependencies"][extra]]
    pending += [Requirement(r) for r in project["dependencies"]]
    while pending:
        requirement = pending.pop()
        if requirement.name == project["name"]:
            pending += [
                Requirement(r)
                for e in requirement.extras
                for r in project["optional-dependencies"][e]
            ]
            continue
        name = canonicalize_name(requirement.name)
        if name in found:
            continue
        found.add(name)
        for line in metadata.requires(name) or []:
            nested = Requirement(line)
            if nested.marker is None or nested.marker.evaluate({"extra": ""}):
                pending.append(nested)
    return found


def test_benchmarks_import_only_what_their_extra_declares() -> None:
    distributions = metadata.packages_distributions()
    allowed = declared("bench")
    for path in sorted((REPO / "benchmarks").glob("*.py")):
        for module in imported_modules(path) - FIRST_PARTY - set(sys.stdlib_module_names):
            owners = {canonicalize_name(d) for d in distributions.get(module, [])}
            assert owners & allowed, f"{path.name} imports {module}, not in the bench extra"
