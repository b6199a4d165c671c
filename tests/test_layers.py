"""The layer rules of DESIGN.md, read from the source: who may import whom.

Every import counts, at module level or inside a function: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("rollback", "activities", "workflows")
# What the workflow sandbox must never load, directly or through another module: I/O clients and
# process control belong in activities.
NOT_IN_WORKFLOWS = ("asyncpg", "httpx", "prometheus_client", "subprocess")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, module: str) -> set[str]:
    """Every module the file names in an import, and for `from X import Y` also X.Y (Y may be a module)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against the importing package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return found


def _project() -> dict[str, set[str]]:
    files = [p for package in PACKAGES for p in (ROOT / package).rglob("*.py")] + [ROOT / "worker.py"]
    return {_module_name(p): _imports(p, _module_name(p)) for p in files}


PROJECT = _project()


def _is_demo_stack(module: str) -> bool:
    return module == "rollback.dev" or module.startswith("rollback.dev.")


def _product_modules() -> list[str]:
    return sorted(m for m in PROJECT if not _is_demo_stack(m))


def _internal_edges(module: str) -> set[str]:
    return {name for name in PROJECT[module] if name in PROJECT and name != module}


def test_the_scan_sees_the_project():
    # A rule checked over nothing passes: make sure the walk found the modules and their imports.
    assert {"workflows.rollback", "activities.database", "rollback.cli", "rollback.dev.stack", "worker"} <= set(PROJECT)
    assert "rollback.models" in _internal_edges("workflows.rollback")


@pytest.mark.parametrize("module", _product_modules())
def test_product_code_never_imports_the_demo_stack_tests_or_benchmarks(module):
    bad = sorted(name for name in PROJECT[module]
                 if _is_demo_stack(name) or name.split(".")[0] in ("tests", "bench"))
    assert not bad, f"{module} imports {bad}: only rollback/dev, tests and bench may"


def test_there_are_no_import_cycles():
    graph = {module: _internal_edges(module) for module in PROJECT}
    cycles = []
    state: dict[str, str] = {}  # "open" while on the current path, "done" after

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append(" -> ".join([*path[path.index(target):], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles: " + "; ".join(cycles)


def _reachable(module: str) -> dict[str, list[str]]:
    """Every project module the module loads, directly or not, with the chain that loads it."""
    chains = {module: [module]}
    frontier = [module]
    while frontier:
        current = frontier.pop()
        for target in sorted(_internal_edges(current)):
            if target not in chains:
                chains[target] = [*chains[current], target]
                frontier.append(target)
    return chains


@pytest.mark.parametrize("module", sorted(m for m in PROJECT if m.split(".")[0] == "workflows"))
def test_workflow_modules_load_no_io_client_or_process_control(module):
    bad = [f"{' -> '.join(chain)} imports {heavy}"
           for loaded, chain in _reachable(module).items()
           for heavy in sorted({name.split(".")[0] for name in PROJECT[loaded]} & set(NOT_IN_WORKFLOWS))]
    assert not bad, "; ".join(bad)


@pytest.mark.parametrize("module", _product_modules())
def test_layers_point_one_way(module):
    """The domain (rollback/) imports neither activities nor workflows; activities import no workflow;
    workflows call activities by name, never by importing them."""
    layer = module.split(".")[0]
    forbidden = {"rollback": ("activities", "workflows", "worker"), "activities": ("workflows", "worker"),
                 "workflows": ("activities", "worker")}.get(layer, ())
    bad = sorted(name for name in _internal_edges(module) if name.split(".")[0] in forbidden)
    assert not bad, f"{module} ({layer}) imports {bad}"
