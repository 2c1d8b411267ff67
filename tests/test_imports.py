"""Import structure: the core never loads the simulator, and zk0's modules import each other without cycles.

A node that trains on a hub or local dataset must not need MuJoCo (nor pay for loading it), and a
cycle among module-level imports breaks as soon as someone imports the modules in another order.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from waits import deadline

import zk0

PACKAGE = Path(zk0.__file__).resolve().parent
SIMULATOR = ("mujoco", "zk0.sim")
CORE = ("zk0.data", "zk0.client_app", "zk0.server_app")


def test_core_modules_do_not_load_the_simulator():
    """One interpreter imports them in turn and notes the simulator after each: the first that loads it is named
    (a fresh interpreter each would import torch three times)."""
    code = ("import importlib, json, sys\n"
            f"for module in {CORE!r}:\n"
            "    importlib.import_module(module)\n"
            f"    print('LOADED', json.dumps([module, [m for m in {SIMULATOR!r} if m in sys.modules]]))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=deadline())
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = dict(json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("LOADED "))
    assert loaded == {module: [] for module in CORE}


def test_module_level_imports_have_no_cycle():
    graph = import_graph()
    assert "zk0.registry" in graph["zk0.data"] and "zk0.data" in graph["zk0.sim.embedded"]  # the walk sees imports
    assert "zk0.sim.embedded" not in graph["zk0.data"]  # imported on first use of an embedded: URI only
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_core_imports_no_edge_at_module_level():
    """DESIGN: the core (zk0.*, outside sim, deploy, tools and cli) loads no edge when it is imported."""
    edges = ("zk0.sim", "zk0.deploy", "zk0.tools", "zk0.cli")
    graph = import_graph()
    core = [name for name in graph if name not in ("zk0", "zk0.__main__") and not name.startswith(edges)]
    assert "zk0.server_app" in core and "zk0.strategy" in core
    leaks = {name: sorted(t for t in graph[name] if t.startswith(edges)) for name in core}
    assert not {name: targets for name, targets in leaks.items() if targets}


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def import_graph() -> dict[str, set[str]]:
    """Each zk0 module and the zk0 modules it imports when it is itself imported."""
    files = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: {target for node in _module_level_imports(ast.parse(path.read_text()))
                   for target in _targets(node, name, path.name == "__init__.py", files)}
            for name, path in files.items()}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_level_imports(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Imports that run on import: not those inside functions, nor under ``if TYPE_CHECKING``."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        elif isinstance(child, ast.If) and isinstance(child.test, ast.Name) and child.test.id == "TYPE_CHECKING":
            for statement in child.orelse:
                yield from _module_level_imports(ast.Module(body=[statement], type_ignores=[]))
        else:
            yield from _module_level_imports(child)


def _targets(node: ast.Import | ast.ImportFrom, name: str, is_package: bool, modules: dict) -> set[str]:
    """The zk0 modules one import statement loads (``from pkg import mod`` names the submodule)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in modules}
    base = node.module or ""
    if node.level:
        anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
        base = ".".join([*anchor, *([base] if base else [])])
    found = {f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names}
    return found & set(modules)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that ends where it starts, or None when it is a DAG."""
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str] | None:
        if module in path:
            return path[path.index(module):] + [module]
        if module in done:
            return None
        for target in sorted(graph.get(module, ())):
            if cycle := visit(target, [*path, module]):
                return cycle
        done.add(module)
        return None

    return next((cycle for module in sorted(graph) if (cycle := visit(module, []))), None)
