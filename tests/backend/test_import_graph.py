"""The backend's layout: every module imports on its own, the import graph has no cycle (counting imports inside
functions too), no module is named after a plan phase, and the backend never imports Qt or napari."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "backend" / "neuromf"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = sorted(_module_name(p) for p in PACKAGE.rglob("*.py") if p.name != "__main__.py")


def _imports(path: Path, name: str) -> set[str]:
    """neuromf modules imported anywhere in the file (module level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import: resolve against this module's package
                parents = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parents + ([base] if base else []))
            submodules = {f"{base}.{alias.name}" for alias in node.names} & set(MODULES)
            found |= submodules  # `from pkg import submodule` needs the submodule, not what pkg/__init__ defines
            if len(submodules) < len(node.names):
                found.add(base)
    return {m for m in found if m in MODULES and m != name}


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        if path.name != "__main__.py":
            graph[_module_name(path)] = _imports(path, _module_name(path))
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_has_no_cycle():
    graph = import_graph()  # a package's __init__ counts as a module: a submodule importing it back is a cycle
    assert len(graph) > 40 and sum(map(len, graph.values())) > 150
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_module_imports_in_a_fresh_interpreter():
    code = ("import importlib, sys\nfailed = []\nfor name in sys.argv[1:]:\n    try:\n"
            "        importlib.import_module(name)\n    except Exception as err:\n"
            "        failed.append(f'{name}: {type(err).__name__}: {err}')\n"
            "print('\\n'.join(failed))\nprint('qt' if any(m.startswith(('PyQt', 'qtpy', 'napari')) "
            "for m in sys.modules) else 'no qt')")
    out = subprocess.run([sys.executable, "-c", code, *MODULES], capture_output=True, text=True, timeout=300)
    lines = out.stdout.strip().splitlines()
    assert out.returncode == 0, out.stderr
    assert lines[-1] == "no qt", "the backend imported Qt or napari"
    assert lines[:-1] == [], "\n".join(lines[:-1])


@pytest.mark.parametrize("word", ["phase", "stage2_", "_t1", "p7"])
def test_no_module_is_named_after_a_plan_phase(word):
    assert not [m for m in MODULES if word in m.rpartition(".")[2]], MODULES
