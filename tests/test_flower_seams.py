"""zk0.flower_seams is the only place that uses Flower internals, and it refuses any Flower but the pinned one."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import ROOT
from waits import deadline

SRC = ROOT / "src" / "zk0"
SEAM = SRC / "flower_seams.py"
PRIVATE_MODULES = ("flwr.supercore", "flwr.proto", "flwr.common.serde", "flwr.supernode", "flwr.superlink",
                   "flwr.server", "flwr.common.constant")
PUBLIC_NAMES = {"flwr.common.config": {"get_fused_config_from_dir", "parse_config_args"},
                "flwr.common.logger": {"log"}, "flwr.simulation.run_simulation": {"run_simulation"}}


def private_module(module: str) -> bool:
    """Whether importing ``module`` reaches into Flower's internals (``flwr.server`` is not ``flwr.serverapp``)."""
    parts = module.split(".")
    return parts[0] == "flwr" and (any(part.startswith("_") for part in parts)
                                   or any(module == p or module.startswith(p + ".") for p in PRIVATE_MODULES))


def private_name(module: str, name: str) -> bool:
    """Whether ``from module import name`` takes a private Flower name."""
    if module.split(".")[0] != "flwr":
        return False
    return private_module(module) or name.startswith("_") or name not in PUBLIC_NAMES.get(module, {name})


def dict_write(node: ast.AST) -> bool:
    """``x.__dict__[key] = …`` (or ``del``): a write Flower's metadata has no public setter for."""
    return (isinstance(node, ast.Subscript) and isinstance(node.ctx, (ast.Store, ast.Del))
            and isinstance(node.value, ast.Attribute) and node.value.attr == "__dict__")


def violations(path: Path, root: Path = ROOT) -> list[str]:
    """``file:line: what`` (``file`` relative to ``root``) for each use of a Flower internal in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            bad = [alias.name for alias in node.names if private_module(alias.name)]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            bad = [f"{node.module}.{alias.name}" for alias in node.names if private_name(node.module, alias.name)]
        else:
            bad = ["a write to __dict__[…]"] if dict_write(node) else []
        found += [f"{path.relative_to(root)}:{node.lineno}: {what}" for what in bad]
    return found


def test_flower_internals_are_used_only_in_the_seam():
    modules = sorted(p for p in SRC.rglob("*.py") if p != SEAM)
    assert modules
    found = [line for path in modules for line in violations(path)]
    assert not found, "Flower internals outside zk0/flower_seams.py (move them behind a seam function):\n" + \
        "\n".join(found)


def test_the_scan_sees_what_it_must(tmp_path):
    """The rules above, on a module that breaks each of them once and uses the public API otherwise."""
    module = tmp_path / "sample.py"
    module.write_text("from flwr.app import Message\nfrom flwr.serverapp import Grid\n"
                      "from flwr.common.config import get_fused_config_from_dir\n"
                      "import flwr.supercore.run\nfrom flwr.server.grid import Grid\n"
                      "from flwr.common.constant import ErrorCode\nfrom flwr.common.config import get_fab_config\n"
                      "from flwr.simulation.run_simulation import _run_simulation\n"
                      "def f(m):\n    m.metadata.__dict__['_src_node_id'] = 1\n")
    lines = [line.split(": ", 1)[0] for line in violations(module, tmp_path)]
    assert lines == [f"sample.py:{n}" for n in (4, 5, 6, 7, 8, 10)]


def test_another_flower_version_is_refused_in_one_line():
    code = ("import importlib.metadata as m\nreal = m.version\n"
            "m.version = lambda name: '1.99.0' if name == 'flwr' else real(name)\nimport zk0.flower_seams\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=deadline(300))
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: zk0 needs flwr==1.42.0")
    assert "found 1.99.0" in last and "pip install" in last
