"""The shape of the package: the import graph of invnet/ is a tree (no cycles), nothing
inside the package reaches back to the package root (``import invnet`` / a name defined in
``invnet/__init__.py``), and one module holds the execution context."""

from __future__ import annotations

import ast
from pathlib import Path

import invnet

PACKAGE = Path(invnet.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _resolve(name: str) -> str | None:
    """The invnet module an imported dotted name lives in (longest module prefix)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str) -> set[str]:
    """Every invnet module ``module`` imports, at module level or inside functions."""
    tree = ast.parse(MODULES[module].read_text())
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            target = _resolve(name)
            if target is not None and target != module:
                found.add(target)
    return found


def test_no_module_reaches_back_to_the_package_root():
    offenders = {
        module: "invnet"
        for module in MODULES
        if module != "invnet" and "invnet" in _imports(module)
    }
    assert not offenders, f"modules importing the package root: {sorted(offenders)}"


def test_the_import_graph_has_no_cycle():
    graph = {m: _imports(m) - {"invnet"} for m in MODULES if m != "invnet"}
    # parent packages' __init__ files are imported implicitly; only edges between modules
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            raise AssertionError(f"import cycle: {' -> '.join(cycle)}")


def test_one_module_holds_the_execution_context():
    holders = [m for m in MODULES if "ContextVar(" in MODULES[m].read_text()]
    assert holders == ["invnet._context"], holders


def test_the_package_shows_its_public_names_only():
    import invnet

    assert dir(invnet) == sorted(invnet.__all__)
    assert "core" not in dir(invnet) and "fit" in dir(invnet)
    assert "Reversible" not in invnet.__all__  # one name per concept: invnet.reversible


def test_no_private_name_is_imported_from_another_module():
    """``from invnet.x import _name`` reaches into another module's internals; a private
    module (``invnet._runtime``) is fine, a private name inside a module is not."""
    found = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or not (node.module or "").startswith("invnet"):
                continue
            for alias in node.names:
                private = alias.name.startswith("_") and not alias.name.startswith("__")
                if private and f"{node.module}.{alias.name}" not in MODULES:
                    found.append(f"{module}: from {node.module} import {alias.name}")
    assert not found, found
