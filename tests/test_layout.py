"""The layers stay visible: no import cycles, the core names nothing above it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("guarded_diffusers", "pytest_fluxguard")
# What each layer of guarded_diffusers may import from the package (module-level imports).
ALLOWED = {
    "guarded_diffusers.core": ("guarded_diffusers.core", "guarded_diffusers.strategies"),
    # stream_rescale finds the stream's writers with the bake's tracer and applies its scaling rules
    # at run time: strategies -> baking -> core, one way (baking never imports a strategy).
    "guarded_diffusers.strategies": (
        "guarded_diffusers.core",
        "guarded_diffusers.strategies",
        "guarded_diffusers.baking",
    ),
    "guarded_diffusers.testing": ("guarded_diffusers.testing",),
    # The bake sits beside the scan: it measures with core and reads the scan's headroom and plans.
    "guarded_diffusers.baking": (
        "guarded_diffusers.core",
        "guarded_diffusers.scan",
        "guarded_diffusers.baking",
    ),
}
# What pytest_fluxguard may import from guarded_diffusers: the public names and the test models.
PUBLIC = ("guarded_diffusers", "guarded_diffusers.testing")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, module: str) -> set[str]:
    """Absolute names ``path`` imports anywhere: at module level, in functions, under TYPE_CHECKING."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{alias.name}" for alias in node.names]
            found |= {base, *names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return {name for name in found if name.startswith(PACKAGES)}


def _graph() -> dict[str, set[str]]:
    files = {_module_name(path): path for package in PACKAGES for path in (ROOT / package).rglob("*.py")}
    graph = {}
    for module, path in files.items():
        graph[module] = {name for name in _imports(path, module) if name in files and name != module}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return [*stack[stack.index(target) :], target]
            if target not in state and (found := visit(target)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_even_through_imports_inside_functions():
    graph = _graph()
    # A package's __init__ importing its own modules is how it re-exports: not a cycle of layers.
    graph = {node: {t for t in targets if not node.startswith(f"{t}.")} for node, targets in graph.items()}
    assert _cycle(graph) is None


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_a_layer_imports_only_what_is_below_it(layer):
    graph = _graph()
    outside = {
        f"{module} -> {target}"
        for module, targets in graph.items()
        if module == layer or module.startswith(f"{layer}.")
        for target in targets
        if target.startswith("guarded_diffusers.") and not target.startswith(ALLOWED[layer])
    }
    assert outside == set()


def test_the_pytest_plugin_imports_only_public_names():
    files = [path for path in (ROOT / "pytest_fluxguard").rglob("*.py")]
    private = {
        f"{_module_name(path)} -> {name}"
        for path in files
        for name in _imports(path, _module_name(path))
        if name.startswith("guarded_diffusers")
        and name.rpartition(".")[0] not in PUBLIC
        and name not in PUBLIC
    }
    assert private == set()
