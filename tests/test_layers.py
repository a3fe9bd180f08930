"""The package layering, read from the source with `ast` (nothing is imported):

    cepo_kernels (torch, triton) -> the method in cepo -> trainers, integrations, offline kit

Every import counts, at module level and inside functions (a function-level import still closes
a circle at run time, it only hides it from a quick read). An edge goes to the module an import
names: ``from cepo import checkpoint`` is an edge to ``cepo.checkpoint``, ``from cepo.data import
Example`` one to ``cepo.data``; the parent packages a submodule import runs are not edges (a
package's ``__init__`` importing its own children is not a circle).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cepo", "cepo_kernels")
# The method core: what both trainers build on. None of it may reach up to the offline kit, the
# integrations or the native trainer (the core meets the offline kit only through the name
# registry, `cepo.registry`, which the offline kit fills from above).
CORE = ("cepo.batch", "cepo.contexts", "cepo.data", "cepo.diagnostics", "cepo.experience",
        "cepo.grading", "cepo.group_advantages", "cepo.models", "cepo.negatives", "cepo.prefix",
        "cepo.registry", "cepo.reward", "cepo.rollout", "cepo.schedule", "cepo.scoring",
        "cepo.sources", "cepo.update")
UPPER = ("cepo.offline", "cepo.integrations", "cepo.train")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the first-party modules it imports, for every .py under `PACKAGES`."""
    files = {module_name(p, root): p for pkg in PACKAGES for p in (root / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the importing module's package
                    package = name.split(".") if is_package else name.split(".")[:-1]
                    package = package[: len(package) - (node.level - 1)]
                    base = ".".join(package + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base
                           for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in files:  # `import a.b.c` of a non-module name
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]], among: str) -> list[str] | None:
    """One import circle among the modules under package `among`, as a closed path, or None."""
    nodes = {m for m in graph if m == among or m.startswith(among + ".")}
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node] & nodes):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(nodes):
        if node not in state and (found := visit(node)):
            return found
    return None


def under(module: str, packages) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_graph_sees_function_level_and_relative_imports(graph):
    # the reader itself: a function-level import (cepo.eval -> cepo.config inside a function)
    # and `from cepo import checkpoint as ckpt` both count
    assert "cepo.config" in graph["cepo.eval"] or "cepo.config" in graph["cepo.train"]
    assert "cepo.checkpoint" in graph["cepo.train"]
    assert graph["cepo_kernels.functional"], "cepo_kernels.functional imports its siblings"


def test_no_import_circle_in_cepo(graph):
    cycle = find_cycle(graph, "cepo")
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_no_import_circle_in_cepo_kernels(graph):
    cycle = find_cycle(graph, "cepo_kernels")
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_kernel_library_does_not_import_cepo(graph):
    upward = sorted(f"{m} -> {t}" for m, targets in graph.items() if under(m, ["cepo_kernels"])
                    for t in targets if under(t, ["cepo"]))
    assert not upward, "cepo_kernels imports the application: " + ", ".join(upward)


def test_core_does_not_import_upper_layers(graph):
    missing = [m for m in CORE if m not in graph]
    assert not missing, f"core modules not found (renamed? update CORE): {missing}"
    upward = sorted(f"{m} -> {t}" for m in CORE for t in graph[m] if under(t, UPPER))
    assert not upward, "the method core imports an upper layer: " + ", ".join(upward)


def test_cycle_finder_reports_a_circle():
    graph = {"cepo.a": {"cepo.b"}, "cepo.b": {"cepo.c"}, "cepo.c": {"cepo.a"}, "cepo.d": set()}
    assert find_cycle(graph, "cepo") == ["cepo.a", "cepo.b", "cepo.c", "cepo.a"]
    graph["cepo.c"] = {"cepo.d"}
    assert find_cycle(graph, "cepo") is None


def test_offline_names_come_from_the_offline_kit_only():
    """At run time too: importing the core registers nothing and loads no offline module;
    importing `cepo.offline` registers the tiny models and synthetic sets (built only on use)."""
    code = (
        "import sys\n"
        "import cepo.data, cepo.models, cepo.scoring, cepo.experience\n"
        "from cepo.registry import registered\n"
        "assert registered() == {'models': [], 'datasets': []}, registered()\n"
        "assert not [m for m in sys.modules if m.startswith('cepo.offline')]\n"
        "import cepo.offline\n"
        "names = registered()\n"
        "assert names['models'] == ['tiny', 'tiny-mini', 'tiny-qwen', 'tiny-text', 'tiny-warm']\n"
        "assert names['datasets'] == ['synthetic', 'synthetic-text'], names\n"
        "assert 'cepo.offline.warmup' not in sys.modules  # built on first use only\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
