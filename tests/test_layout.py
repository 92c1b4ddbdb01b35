"""The package's layout rules (docs/architecture.md): the layers import only downward (no import circle, lazy
imports included), no private name is imported across modules except from a private module made for sharing,
and no module grows past 600 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "vae_fast"
MAX_LINES = 600
# The layers, bottom up: a module may import its own layer's modules and those of the layers below.
LAYERS = ("ops", "models", "train", "bench")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
EXTENSION = "vae_fast._C"  # the compiled ops: imports nothing of the package


def _imports(name: str):
    """(module imported, names taken from it) for every import in module ``name``, at any depth (lazy ones too)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("vae_fast"):
                continue
            names = [a.name for a in node.names]
            submodule = [f"{target}.{n}" in MODULES or f"{target}.{n}" == EXTENSION for n in names]
            yield from ((f"{target}.{n}", []) for n, sub in zip(names, submodule) if sub)
            if not all(submodule):
                yield target, [n for n, sub in zip(names, submodule) if not sub]


def _graph() -> dict[str, set[str]]:
    return {name: {m for m, _ in _imports(name) if m in MODULES and m != name} for name in MODULES}


def test_no_import_circle():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def _layer(name: str) -> int:
    parts = name.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else -1


def test_layers_import_downward_only():
    upward = [f"{name} imports {dep}" for name, deps in _graph().items() if _layer(name) >= 0
              for dep in deps if _layer(dep) > _layer(name)]
    assert not upward, upward


def test_no_private_name_imported_across_modules():
    crossing = []
    for name in MODULES:
        for target, names in _imports(name):
            shared = target.rsplit(".", 1)[-1].startswith("_")  # a private module made to be shared
            crossing += [f"{name}: from {target} import {n}" for n in names
                         if n.startswith("_") and not n.startswith("__") and not shared]
    assert not crossing, crossing


def test_no_module_over_600_lines():
    sizes = {name: path.read_text().count("\n") for name, path in MODULES.items()}
    assert len(sizes) > 30  # the walk found the package
    too_long = {name: n for name, n in sizes.items() if n > MAX_LINES}
    assert not too_long, f"split these by concern: {too_long}"
