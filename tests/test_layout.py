"""The package layout keeps its promises: every module imports on its own, imports never run in a circle, and
only the parallel layer touches torch.distributed."""
from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest

from tests.conftest import PYTHON, ROOT

PACKAGE = ROOT / "dist_hrnas"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path) -> set[str]:
    """dist_hrnas modules that loading ``name`` runs first (top-level imports only: function-local ones run
    later). Importing a.b.c runs the faces a and a.b before it; those edges count unless they are ``name``'s own
    ancestors (already running when ``name`` loads). ``from a.b import x`` with ``x`` a name, not a submodule,
    needs a.b's face complete: that edge always counts."""
    own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    out: set[str] = set()

    def module_and_faces(mod: str) -> set[str]:
        parts = mod.split(".")
        return {".".join(parts[:i]) for i in range(2, len(parts) + 1)} - own

    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in MODULES:
                    out |= module_and_faces(alias.name)
        elif isinstance(node, ast.ImportFrom) and node.module in MODULES:
            out |= module_and_faces(node.module)
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                if sub in MODULES:
                    out |= module_and_faces(sub)
                else:
                    out.add(node.module)  # a name from that module (or face): it must have finished loading
    return (out & set(MODULES)) - {name}


def test_no_import_circle():
    graph = {name: _imports(name, path) for name, path in MODULES.items()}
    done, on_path = set(), []

    def visit(node: str) -> None:
        if node in on_path:
            pytest.fail("import circle: " + " -> ".join(on_path[on_path.index(node):] + [node]))
        if node in done:
            return
        on_path.append(node)
        for nxt in sorted(graph[node]):
            visit(nxt)
        on_path.pop()
        done.add(node)

    for name in MODULES:
        visit(name)


def test_only_the_parallel_layer_touches_torch_distributed():
    users = {name for name, path in MODULES.items()
             if "torch.distributed" in path.read_text() and "import torch.distributed" in path.read_text()}
    assert users and all(name.startswith("dist_hrnas.parallel.") for name in users), users


@pytest.mark.slow
def test_every_module_imports_on_its_own_in_a_fresh_interpreter():
    procs = {name: subprocess.Popen([PYTHON, "-c", f"import {name}"], cwd=ROOT, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True) for name in MODULES}
    failed = {}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=300)
        if proc.returncode:
            failed[name] = out.strip().splitlines()[-1]
    assert not failed, failed
