"""Imports run one way: read from the source with `ast` (nothing is imported), every import
of proxy/ and gateway.py, at the top of a module, inside a function or under TYPE_CHECKING.

No module or package may take part in an import circle, and no package may import one on a
floor above its own. The floors, bottom first, are the code's real order:

- the kernel (settings, errors, record, encodings): what every room shares;
- upstream and quota: the attempt loop and the admission policy know nothing of keys;
- keys and observe: a key is configured with targets and providers (upstream) and with
  limits, budgets and scopes (quota), so keys imports both, and the quota reads a key through
  protocols of its own (quota/subjects.py); /health reports the breakers (observe imports
  upstream);
- usage and cache: a background response is owed and claimed through the quota for a key;
  the cache keeps answers per key;
- relay, realtime, exchange and endpoints: the request handlers;
- app (the composition root), then runtime, then gateway.py.

A new package, or a new kernel module, must be put on a floor here before it can land.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

FLOORS: tuple[tuple[str, ...], ...] = (
    ("settings", "errors", "record", "encodings"),
    ("upstream", "quota"),
    ("keys", "observe"),
    ("usage", "cache"),
    ("relay", "realtime", "exchange", "endpoints"),
    ("app",),
    ("runtime",),
    ("gateway",),
)

# Imports that break the rules today, each being cut; delete a line once its import is gone
# (the test fails while a listed import no longer exists, so the list cannot go stale).
KNOWN: Mapping[tuple[str, str], str] = {}

Edge = tuple[str, str]


def modules() -> dict[str, Path]:
    """Every module of proxy/, and gateway.py, by dotted name."""
    found = {"gateway": ROOT / "gateway.py"}
    for path in sorted((ROOT / "proxy").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(known: Mapping[str, Path]) -> set[Edge]:
    """(importer, imported) for every import of one of `known` by another."""
    edges: set[Edge] = set()
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            for target in _targets(node, package, known):
                if target in known and target != name:
                    edges.add((name, target))
    return edges


def _targets(node: ast.AST, package: str, known: Mapping[str, Path]) -> Iterable[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:  # relative: from the importer's package up
        anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join([*anchor, base] if base else anchor)
    # `from proxy.quota import ratelimit` imports a module; `from proxy.record import Usage`
    # a name of one.
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]


def unit(module: str) -> str:
    """The room a module belongs to: its package, or itself for a kernel module."""
    parts = module.split(".")
    return parts[1] if parts[0] == "proxy" and len(parts) > 1 else parts[0]


def floor(room: str) -> int:
    for level, rooms in enumerate(FLOORS):
        if room in rooms:
            return level
    raise AssertionError(f"{room} is on no floor: put it on one in FLOORS")


def upward(edges: Iterable[Edge]) -> list[str]:
    """Each import of a room on a higher floor than the importer's."""
    return sorted(
        f"{a} -> {b} (floor {floor(unit(a))} up to {floor(unit(b))})"
        for a, b in edges
        if unit(a) != "proxy" and unit(b) != "proxy" and floor(unit(b)) > floor(unit(a))
    )


def circles(edges: Iterable[Edge]) -> list[list[str]]:
    """The strongly connected parts of more than one node (Tarjan), each sorted."""
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            part = [stack.pop()]
            while part[-1] != node:
                part.append(stack.pop())
            if len(part) > 1:
                found.append(sorted(part))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def rooms(edges: Iterable[Edge]) -> set[Edge]:
    """The imports between rooms (packages, kernel modules), each room as one node."""
    return {(unit(a), unit(b)) for a, b in edges if unit(a) != unit(b)}


@pytest.fixture(scope="module")
def edges() -> set[Edge]:
    return imports(modules())


def test_no_import_runs_up_a_floor(edges: set[Edge]) -> None:
    assert upward(edges - KNOWN.keys()) == []


def test_no_module_is_in_an_import_circle(edges: set[Edge]) -> None:
    assert circles(edges - KNOWN.keys()) == []


def test_no_package_is_in_an_import_circle(edges: set[Edge]) -> None:
    assert circles(rooms(edges - KNOWN.keys())) == []


def test_every_known_exception_still_exists(edges: set[Edge]) -> None:
    assert [edge for edge in KNOWN if edge not in edges] == [], "cut: delete it from KNOWN"


def test_every_room_is_on_a_floor(edges: set[Edge]) -> None:
    for room in {unit(module) for module in modules()} - {"proxy"}:
        floor(room)


def test_the_checks_see_an_upward_import_and_circles() -> None:
    drawn = {
        ("proxy.settings", "proxy.quota.tracker"),  # the kernel reaching up
        ("proxy.keys.keys", "proxy.upstream.targets"),  # down: fine
        ("proxy.quota.quota", "proxy.quota.tracker"),
        ("proxy.quota.tracker", "proxy.quota.quota"),  # a module circle
        ("proxy.usage.usage", "proxy.cache.cache"),
        ("proxy.cache.store", "proxy.usage.pricing"),  # a package circle, not of modules
    }
    assert upward(drawn) == ["proxy.settings -> proxy.quota.tracker (floor 0 up to 1)"]
    assert circles(drawn) == [["proxy.quota.quota", "proxy.quota.tracker"]]
    assert circles(rooms(drawn)) == [["cache", "usage"]]


def test_imports_are_read_from_every_form(tmp_path: Path) -> None:
    (tmp_path / "proxy" / "quota").mkdir(parents=True)
    files = {
        "proxy.quota.quota": tmp_path / "proxy" / "quota" / "quota.py",
        "proxy.quota.ratelimit": tmp_path / "proxy" / "quota" / "ratelimit.py",
        "proxy.quota": tmp_path / "proxy" / "quota" / "__init__.py",
        "proxy.record": tmp_path / "proxy" / "record.py",
        "proxy.errors": tmp_path / "proxy" / "errors.py",
        "proxy.settings": tmp_path / "proxy" / "settings.py",
    }
    for path in files.values():
        path.write_text("")
    files["proxy.quota.quota"].write_text(
        "from typing import TYPE_CHECKING\n"
        "from proxy.quota import ratelimit\n"
        "from . import ratelimit as again\n"
        "from ..record import Usage\n"
        "if TYPE_CHECKING:\n"
        "    from proxy.errors import GatewayError\n"
        "def late():\n"
        "    import proxy.settings\n"
    )
    assert imports(files) == {
        ("proxy.quota.quota", "proxy.quota.ratelimit"),
        ("proxy.quota.quota", "proxy.record"),
        ("proxy.quota.quota", "proxy.errors"),
        ("proxy.quota.quota", "proxy.settings"),
    }
