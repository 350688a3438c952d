"""The package reads as rooms on floors: every import of ``ssl_zoo`` by ``ssl_zoo``, found in the source text.

Floors, bottom first (a module may import its own room and the floors below it):

1. ``utils``, ``augment``
2. ``losses``, ``data``, ``models``, ``checkpoints``
3. ``methods``, ``eval``, ``transfer``
4. ``cli``, ``tables``, ``__main__`` (the tools)

Rooms on one floor may use one another in one direction only (the rooms' graph has no circle), and no module
imports another that imports it back, directly or through others. No file in ``ssl_zoo/`` is over 500 lines,
and no module reaches into another's private names (``from x import _name``, ``x._name``): a helper another
room needs is public in the room where it belongs.

Every ``import`` statement counts, also those inside functions (imported on first use, but still a dependency
a reader follows). A package's own ``__init__`` running before its submodules is not counted as an import.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "ssl_zoo"
PACKAGE = PACKAGE_DIR.name
FLOORS: tuple[tuple[str, ...], ...] = (
    ("utils", "augment"),
    ("losses", "data", "models", "checkpoints"),
    ("methods", "eval", "transfer"),
    ("cli", "tables", "__main__"),
)
FLOOR_OF = {room: level for level, rooms in enumerate(FLOORS) for room in rooms}
MAX_LINES = 500


@cache
def modules(package_dir: Path = PACKAGE_DIR) -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__``)."""
    found = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def room(module: str) -> str | None:
    """``ssl_zoo.<room>...`` -> ``<room>``; the top-level ``ssl_zoo`` package itself has none."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def absolute(node: ast.ImportFrom, importer: str, path: Path) -> str:
    """The module an ``ImportFrom`` names, relative imports resolved against ``importer`` (at ``path``)'s package."""
    if not node.level:
        return node.module or ""
    package = importer if path.name == "__init__.py" else importer.rpartition(".")[0]
    base = package.split(".")[: len(package.split(".")) - node.level + 1]
    return ".".join([*base, node.module] if node.module else base)


@cache
def imports(package_dir: Path = PACKAGE_DIR) -> dict[str, list[tuple[str, int]]]:
    """``{module: [(imported package module, line), ...]}``: ``from a.b import c`` imports ``a.b``, and ``a.b.c``
    when that is a module."""
    known = modules(package_dir)
    graph: dict[str, list[tuple[str, int]]] = {}
    for name, path in known.items():
        edges = graph.setdefault(name, [])
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                source = absolute(node, name, path)
                targets = [source, *(f"{source}.{alias.name}" for alias in node.names)]
            else:
                continue
            edges += [(t, node.lineno) for t in targets if t in known and t != name and t != PACKAGE]
    return graph


def private_reaches(package_dir: Path = PACKAGE_DIR) -> list[str]:
    """Every use of another package module's private name: ``from x import _name`` or ``x._name``."""
    known = modules(package_dir)
    found = []
    for name, path in known.items():
        where = path.relative_to(package_dir.parent)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        aliases: dict[str, str] = {}  # local name -> package module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                source = absolute(node, name, path)
                if source not in known:
                    continue
                for alias in node.names:
                    if f"{source}.{alias.name}" in known:
                        aliases[alias.asname or alias.name] = f"{source}.{alias.name}"
                    elif alias.name.startswith("_") and source != name:
                        found.append(f"{where}:{node.lineno}: from {source} import {alias.name}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname and alias.name in known:
                        aliases[alias.asname] = alias.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.endswith("__") and aliases[node.value.id] != name):
                found.append(f"{where}:{node.lineno}: {aliases[node.value.id]}.{node.attr}")
    return found


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """The circles of ``graph``: its strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return circles


def test_graph_reader_sees_every_kind_of_import(tmp_path):
    """The checks below are only as good as the import reader: a hand-made package with a function-level import,
    a relative import, ``from pkg import module``, a private name and a module alias."""
    package = tmp_path / "ssl_zoo"
    for folder in ("utils", "data"):
        (package / folder).mkdir(parents=True)
        (package / folder / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "utils" / "a.py").write_text("def f():\n    from ssl_zoo.data.b import _g\n    return _g\n")
    (package / "data" / "b.py").write_text("from . import c\nimport ssl_zoo.utils.a as a\n\n\ndef _g():\n"
                                           "    return a._h, c\n")
    (package / "data" / "c.py").write_text("from .b import _g\n")
    graph = imports(package)
    assert {t for t, _ in graph["ssl_zoo.utils.a"]} == {"ssl_zoo.data.b"}
    assert {t for t, _ in graph["ssl_zoo.data.b"]} == {"ssl_zoo.data", "ssl_zoo.data.c", "ssl_zoo.utils.a"}
    assert {t for t, _ in graph["ssl_zoo.data.c"]} == {"ssl_zoo.data.b"}
    assert strongly_connected({m: {t for t, _ in e} for m, e in graph.items()}) == [
        ["ssl_zoo.data.b", "ssl_zoo.data.c", "ssl_zoo.utils.a"]]
    assert sorted(r.split(": ", 1)[1] for r in private_reaches(package)) == [
        "from ssl_zoo.data.b import _g", "from ssl_zoo.data.b import _g", "ssl_zoo.utils.a._h"]


def test_every_module_lies_in_a_room_on_a_floor():
    strays = [name for name in modules() if name != PACKAGE and room(name) not in FLOOR_OF]
    assert not strays, f"modules outside the rooms {FLOORS}: {strays}"


def test_no_module_imports_one_that_imports_it_back():
    graph = {name: {target for target, _ in edges} for name, edges in imports().items()}
    circles = strongly_connected(graph)
    assert not circles, "import circles (each line: modules that reach one another):\n" + "\n".join(
        " <-> ".join(circle) for circle in circles)


def test_no_import_reaches_up_a_floor():
    upward = [
        f"{modules()[name].relative_to(PACKAGE_DIR.parent)}:{line}: {room(name)} (floor {FLOOR_OF[room(name)] + 1}) "
        f"imports {target} (floor {FLOOR_OF[room(target)] + 1})"
        for name, edges in imports().items() if room(name) in FLOOR_OF
        for target, line in edges if room(target) in FLOOR_OF and FLOOR_OF[room(target)] > FLOOR_OF[room(name)]
    ]
    assert not upward, "imports from a lower floor up to a higher one:\n" + "\n".join(upward)


def test_rooms_use_one_another_in_one_direction():
    between: dict[str, set[str]] = {}
    for name, edges in imports().items():
        for target, _ in edges:
            if room(name) and room(target) and room(name) != room(target):
                between.setdefault(room(name), set()).add(room(target))
    circles = strongly_connected(between)
    assert not circles, "rooms that import one another: " + "; ".join(" <-> ".join(c) for c in circles)


def test_no_file_is_over_500_lines():
    long = {str(path.relative_to(PACKAGE_DIR.parent)): n for path in sorted(PACKAGE_DIR.rglob("*"))
            if path.is_file() and path.suffix in (".py", ".md")
            and (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_no_module_reaches_into_another_modules_private_names():
    reaches = private_reaches()
    assert not reaches, ("private names used across modules (make the helper public in the room where it "
                         "belongs):\n" + "\n".join(reaches))
