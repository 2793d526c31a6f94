"""The package's structure, read from its source: imports run one way (no cycle), every module
lists its public names in `__all__` at its top, a module takes only public names from another
package's modules, and no module of the model adapters grows past one concept's size."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tokenreduce"
MAX_PATCH_MODULE_LINES = 500


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}
TREES = {name: ast.parse(path.read_text()) for name, path in MODULES.items()}


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def package_of(name: str) -> str:
    return name if is_package(name) else name.rpartition(".")[0]


def public_names(name: str) -> list[str] | None:
    for node in TREES[name].body:
        targets = node.targets if isinstance(node, ast.Assign) else []
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
            return [element.value for element in node.value.elts]
    return None


def imports(name: str) -> list[tuple[str, str | None]]:
    """(module, name) for every import of a tokenreduce module in `name`, anywhere in it; name
    None for `import tokenreduce.x`."""
    found = []
    for node in ast.walk(TREES[name]):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] == "tokenreduce":
                found += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(a.name, None) for a in node.names if a.name.split(".")[0] == "tokenreduce"]
    return found


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name in MODULES:
        for module, imported in imports(name):
            submodule = f"{module}.{imported}"
            graph[name].add(submodule if submodule in MODULES else module)
    return graph


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                cycle = path[path.index(target) :] + [target]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if target not in state:
                visit(target, [*path, target])
        state[name] = 2

    for name in MODULES:
        if name not in state:
            visit(name, [name])


@pytest.mark.parametrize("name", [n for n in MODULES if not n.endswith("__main__")])
def test_every_module_lists_its_public_names_at_its_top(name):
    body = TREES[name].body
    names = public_names(name)
    assert names is not None, f"{name} has no __all__"
    first_definition = next(
        (i for i, n in enumerate(body) if isinstance(n, (ast.FunctionDef, ast.ClassDef))), None
    )
    position = next(
        i
        for i, n in enumerate(body)
        if isinstance(n, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in n.targets)
    )
    assert first_definition is None or position < first_definition, f"{name}: __all__ is late"
    defined = {n.name for n in body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    defined |= {
        t.id
        for n in body
        if isinstance(n, (ast.Assign, ast.AnnAssign))
        for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
        if isinstance(t, ast.Name)
    }
    defined |= {a.asname or a.name for n in body if isinstance(n, ast.ImportFrom) for a in n.names}
    if "__getattr__" in defined:
        # names the module serves on first use, from a literal table of its own
        defined |= {
            key.value
            for n in body
            if isinstance(n, ast.Assign) and isinstance(n.value, ast.Dict)
            for key in n.value.keys
            if isinstance(key, ast.Constant)
        }
        module = importlib.import_module(name)
        assert all(getattr(module, public, None) is not None for public in names)
    assert not set(names) - defined, f"{name}.__all__ names what it does not define"


def test_modules_take_only_public_names_from_other_packages():
    private = []
    for name in MODULES:
        for module, imported in imports(name):
            if imported is None or f"{module}.{imported}" in MODULES or module not in MODULES:
                continue
            if package_of(module) == package_of(name):
                continue  # a package's own modules share their helpers
            if imported.startswith("_") or imported not in (public_names(module) or []):
                private.append(f"{name} takes {imported} from {module}")
    assert not private, "\n".join(private)


def test_no_adapter_module_holds_more_than_one_concept():
    long = {
        path.name: lines
        for path in (PACKAGE / "patch").glob("*.py")
        if (lines := len(path.read_text().splitlines())) > MAX_PATCH_MODULE_LINES
    }
    assert not long, f"modules of tokenreduce/patch/ over {MAX_PATCH_MODULE_LINES} lines: {long}"
