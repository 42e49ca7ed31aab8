"""lineray's imports form no cycle, and the floors depend one way (DESIGN.md section 1).

The graph is read from the source with `ast`, not by importing: every `import` and `from ... import`
anywhere in a module (function-level ones too), relative imports, `importlib.import_module("...")`
with a literal name, and, in a module that calls importlib.import_module, every string constant
that names a lineray module (registries such as models/bundles.py's BUNDLES).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "lineray"

# floor -> the lineray floors it may import (top-level leaf modules such as validation.py are open to all)
FLOORS = {
    "kernels": set(),
    "cache": {"kernels"},
    "models": {"kernels", "cache"},
    "workers": {"kernels", "cache", "models"},
    "cluster": {"kernels", "cache", "models", "workers"},
    "pipelines": {"kernels", "cache", "models", "workers", "cluster"},
    "quality": {"kernels", "cache", "models"},
}
LEAVES = {"lineray", "lineray.validation", "lineray.yamlfile", "lineray.images"}


def module_names() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def add(target: str, attrs: list[str] = ()) -> None:
        submodules = {f"{target}.{a}" for a in attrs} & modules  # `from pkg import submodule`
        found.update(submodules)
        if attrs and len(submodules) == len(attrs):
            return  # only submodules: the package's own names are not used (as for `import pkg.sub`)
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target:
            found.add(target)

    uses_importlib = False
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            add(base, [a.name for a in node.names])
        elif isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name)):
            if (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id) == "import_module":
                uses_importlib = True
    if uses_importlib:
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in modules:
                add(node.value)
    return {m for m in found if m.startswith("lineray") and m != name}


def import_graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: imports_of(name, path, set(modules)) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def floor(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and module not in LEAVES and parts[1] in FLOORS) else None


def test_the_graph_sees_every_kind_of_import():
    graph = import_graph()
    assert "lineray.models.digits" in graph["lineray.models.bundles"]  # import_module via a registry dict
    assert "lineray.workers.replica" in graph["lineray.api"]  # a top-level from-import
    assert {"lineray.cache.spec", "lineray.cache.kv"} <= graph["lineray.cache"]  # relative or absolute, in __init__
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, f"import cycles: {[sorted(c) for c in found]}"


@pytest.mark.parametrize("room", sorted(FLOORS))
def test_floors_import_only_downwards(room):
    graph = import_graph()
    upward = sorted(f"{m} -> {t}" for m, targets in graph.items() if floor(m) == room
                    for t in targets if floor(t) not in (None, room, *FLOORS[room]) and t not in LEAVES)
    assert not upward, upward
