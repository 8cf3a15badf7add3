"""The backend's layout: every module imports on its own, the import graph has no cycle (counting imports inside
functions too), packages import only packages below them (docs/architecture.md), no module is named after a plan
phase, and the backend never imports Qt or napari."""

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


# The package layers, lowest first (docs/architecture.md, "Which package may import which"): a package imports only
# packages of LOWER layers (and its own modules). Top-level modules count as packages of their own. The root
# `neuromf` (a lazy facade that imports nothing when imported) is left out.
LAYERS = [
    {"utils"},
    {"config", "events", "weights"},
    {"io", "vae"},
    {"meanflow", "data", "train"},
    {"models"},
    {"eval"},
    {"generation"},  # below pipelines: the ablation pipeline trains, then generates; generation uses no training
    {"pipelines", "generate"},  # generate: the deprecated name of generation.images (one release)
    {"api"},
    {"cli"},  # the command is a thin front-end over the Python API
]


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def upward_imports(graph: dict[str, set[str]], layers: list[set[str]]) -> list[str]:
    """Every import of a package from the same or a higher layer, as "a -> b (layer i -> j)"."""
    layer = {name: i for i, names in enumerate(layers) for name in names}
    bad = []
    for module, imported in sorted(graph.items()):
        for other in sorted(imported):
            src, dst = package_of(module), package_of(other)
            if src == dst or "neuromf" in (src, dst):
                continue
            if layer[dst] >= layer[src]:
                bad.append(f"{module} -> {other} (layer {layer[src]} -> {layer[dst]})")
    return bad


def test_packages_import_only_lower_layers():
    graph = import_graph()
    packages = {package_of(m) for m in graph} - {"neuromf"}
    assert packages == set().union(*LAYERS), "a new package: give it a layer here and in docs/architecture.md"
    assert upward_imports(graph, LAYERS) == []


def test_the_layer_check_finds_an_upward_import():
    graph = {"neuromf.train.launch": {"neuromf.pipelines.joint"}, "neuromf.pipelines.joint": {"neuromf.train.loop"}}
    assert upward_imports(graph, LAYERS) == ["neuromf.train.launch -> neuromf.pipelines.joint (layer 3 -> 7)"]
    assert upward_imports({"neuromf.data.a": {"neuromf.train.loop"}}, LAYERS) == [
        "neuromf.data.a -> neuromf.train.loop (layer 3 -> 3)"]


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
