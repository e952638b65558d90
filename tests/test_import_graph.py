"""The package's import graph: no cycles, and each stage imports only the stages below it.

Every import statement of every module counts, the ones inside functions too (an import
deferred into a function hides a cycle without removing it); only `if TYPE_CHECKING:` blocks,
which never run, are left out. `from a import b` is an edge to the module a.b when b is a
module, else to a. The layers are docs/architecture.md's table.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "edgeseq"
# stage -> the stages it may import (besides itself and the root contract)
MAY_IMPORT = {
    "data": set(),
    "train": {"data"},
    "export": {"data", "train", "runtime"},
    "runtime": set(),
    "daemon": {"runtime"},
    "deploy": {"runtime"},
    "bench": {"data", "train", "export", "runtime", "daemon"},
    "cli": {"data", "train", "export", "runtime", "daemon", "deploy", "bench"},
}
# rooms of the runtime -> the rooms they may import (besides their own)
RUNTIME_ROOMS = {
    "kernels": set(),
    "graphs": set(),
    "planning": {"graphs", "kernels"},
    "pools": {"graphs", "kernels", "planning"},
}
NEVER_ON_THE_DEVICE = {"torch", "pandas", "matplotlib", "statsmodels"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> list[str]:
    """Every module an import statement under `tree` names, outside TYPE_CHECKING blocks."""
    found: list[str] = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            found += [m for child in node.orelse for m in _imports(ast.Module([child], []))]
            continue
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.append(sub if sub in MODULES else node.module)
        found += _imports(node)
    return found


GRAPH = {name: set(_imports(ast.parse(path.read_text(encoding="utf-8")))) for name, path in
         MODULES.items()}  # fmt: skip


def _stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in MAY_IMPORT else "root"


def _room(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) > 3 and parts[1] == "runtime" and parts[2] in RUNTIME_ROOMS:
        return parts[2]
    return None


def _cycle() -> list[str] | None:
    """One cycle among edgeseq's modules, or None."""
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(GRAPH.get(node, ())):
            if target not in MODULES:
                continue
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (found := visit(target)):
                return found
        path.pop()
        state[node] = 2
        return None

    for module in MODULES:
        if module not in state and (found := visit(module)):
            return found
    return None


def test_the_import_graph_has_no_cycle():
    assert _cycle() is None, " -> ".join(_cycle() or [])


def test_the_graph_sees_function_level_imports():
    """The engines import the model's own kernel compiler: an edge that once hid a cycle."""
    assert "edgeseq.runtime.planning.specialize" in GRAPH["edgeseq.runtime.engines"]
    assert "edgeseq.runtime.kernels.codes" in GRAPH["edgeseq.runtime.planning.specialize"]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_each_module_imports_only_the_stages_below_it(module):
    stage = _stage(module)
    if stage == "root":  # the package's public names load the runtime; `python -m` the CLI
        entry = {"edgeseq": {"runtime"}, "edgeseq.__main__": {"cli"}}
        allowed_stages: set[str] = entry.get(module, set())
    else:
        allowed_stages = MAY_IMPORT[stage] | {stage}
    for target in GRAPH[module]:
        if not target.startswith("edgeseq"):
            continue
        target_stage = _stage(target)
        assert target_stage == "root" or target_stage in allowed_stages, (
            f"{module} ({stage}) imports {target} ({target_stage})"
        )
        room, target_room = _room(module), _room(target)
        if room is not None and target_room is not None and target_room != room:
            assert target_room in RUNTIME_ROOMS[room], f"runtime/{room}: {module} -> {target}"
        if room is not None and target.startswith("edgeseq.runtime") and target_room is None:
            assert target == "edgeseq.runtime", f"runtime/{room} reaches up: {module} -> {target}"


@pytest.mark.parametrize(
    "module", [m for m in sorted(MODULES) if _stage(m) in ("runtime", "daemon")]
)
def test_the_runtime_and_the_daemon_never_import_training_or_torch(module):
    for target in GRAPH[module]:
        assert target.split(".")[0] not in NEVER_ON_THE_DEVICE, f"{module} imports {target}"
        assert _stage(target) not in {"data", "train", "export", "cli", "bench", "deploy"}, (
            f"{module} imports {target}"
        )
