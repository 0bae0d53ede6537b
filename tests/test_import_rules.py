"""The layering rules of the design, checked on the import graph of the source tree.

Mostly module-level imports: what importing a module loads (torch and export are refused in function bodies too).
Optional engines are imported by name at run time through
`runtime/engines/registry.py`, which is how a torch-free process serves a bundle.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {folder: f"cosmos_edge.{folder}" for folder in ("runtime", "export", "robot_bridge", "kernels", "cli")}
ROBOT_BRIDGE_MAY_USE = (
    "cosmos_edge.runtime.errors",
    "cosmos_edge.runtime.platforms",
    "cosmos_edge.runtime.policy.api",
    "cosmos_edge.runtime.checks",
    "cosmos_edge.runtime.version",
)


def module_files() -> dict[str, Path]:
    modules = {}
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            modules[name] = path
    return modules


MODULES = module_files()


def top_level_imports(path: Path) -> set[str]:
    """Modules imported at module level (including inside top-level `if`/`try`, excluding TYPE_CHECKING blocks)."""
    found: set[str] = set()

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
                visit(node.body + node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body + node.orelse + node.finalbody)

    visit(ast.parse(path.read_text()).body)
    return found


def every_import(path: Path) -> set[str]:
    """Modules imported anywhere in the file, function bodies included: what running it may load."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def closure(module: str) -> set[str]:
    """Every module `module` loads at import time, transitively (external packages by their full import name)."""
    seen: set[str] = set()
    pending = [module]
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        if current in MODULES:
            pending.extend(name for name in top_level_imports(MODULES[current]) if name not in seen)
            parent = current.rpartition(".")[0]
            if parent in MODULES:  # importing a submodule runs its package's __init__
                pending.append(parent)
    return seen - {module}


def in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


TORCH_FREE = [
    name
    for name in MODULES
    if in_package(name, "cosmos_edge.runtime.policy")
    or in_package(name, "cosmos_edge.runtime.bundle")
    or in_package(name, "cosmos_edge.robot_bridge")
    or name in ("cosmos_edge.runtime.engines.onnxruntime_runner", "cosmos_edge.runtime.engines.registry")
    or in_package(name, "cosmos_edge.runtime.engines.tensorrt")
]


def test_the_rules_see_the_whole_tree() -> None:
    assert {"cosmos_edge.runtime.policy.reactive", "cosmos_edge.runtime.bundle.loader"} <= set(TORCH_FREE)
    assert "torch" in closure("cosmos_edge.runtime.engines.torch_networks")  # the check detects torch
    assert "numpy" in closure("cosmos_edge.runtime.policy.steps")  # and external packages
    assert "cosmos_edge.runtime.bundle.loader" in closure("cosmos_edge.cli.serve_cmd")  # and the command line's


@pytest.mark.parametrize("module", sorted(TORCH_FREE))
def test_serving_layers_never_import_torch(module: str) -> None:
    assert not any(in_package(name, "torch") for name in closure(module)), f"{module} imports torch"


@pytest.mark.parametrize("module", sorted(TORCH_FREE))
def test_serving_layers_import_torch_in_no_function_either(module: str) -> None:
    lazy = [name for name in every_import(MODULES[module]) if in_package(name, "torch")]
    assert not lazy, f"{module} imports {lazy} at run time (the registry loads the torch backend by name)"


@pytest.mark.parametrize("module", sorted(name for name in MODULES if in_package(name, "cosmos_edge.runtime")))
def test_runtime_imports_export_in_no_function_either(module: str) -> None:
    assert not [name for name in every_import(MODULES[module]) if in_package(name, "cosmos_edge.export")]


@pytest.mark.parametrize("module", sorted(name for name in MODULES if in_package(name, "cosmos_edge.runtime")))
def test_runtime_never_imports_export(module: str) -> None:
    assert not any(in_package(name, "cosmos_edge.export") for name in closure(module))


@pytest.mark.parametrize("module", sorted(name for name in MODULES if in_package(name, "cosmos_edge.runtime")))
def test_runtime_never_imports_the_command_line_or_the_robot_bridge(module: str) -> None:
    above = ("cosmos_edge.cli", "cosmos_edge.robot_bridge")
    assert not [name for name in closure(module) if any(in_package(name, package) for package in above)]


@pytest.mark.parametrize("module", sorted(name for name in MODULES if in_package(name, "cosmos_edge.runtime.policy")))
def test_the_policy_layer_needs_numpy_and_pillow_only(module: str) -> None:
    external = {name.partition(".")[0] for name in closure(module) if not in_package(name, "cosmos_edge")}
    assert external <= {*sys.stdlib_module_names, "numpy", "PIL"}, f"{module} imports {sorted(external)}"


@pytest.mark.parametrize("module", sorted(name for name in MODULES if in_package(name, "cosmos_edge.runtime.engines")))
def test_backends_do_not_know_bundles(module: str) -> None:
    assert not any(in_package(name, "cosmos_edge.runtime.bundle") for name in closure(module))


@pytest.mark.parametrize("module", sorted(name for name in MODULES if in_package(name, "cosmos_edge.robot_bridge")))
def test_robot_bridge_uses_only_the_policy_api_of_the_runtime(module: str) -> None:
    direct = {name for name in top_level_imports(MODULES[module]) if name in MODULES}
    runtime = {name for name in direct if in_package(name, "cosmos_edge.runtime")}
    assert runtime <= set(ROBOT_BRIDGE_MAY_USE), f"{module} imports {sorted(runtime - set(ROBOT_BRIDGE_MAY_USE))}"
