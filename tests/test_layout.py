"""The library's shape: subpackages in layers, imports running one way (docs/design.md, "Layout").

Each layer imports only from the layers before it, so that every module can be read, imported and tested
on top of the ones it names; a wrong-way import or an import circle fails here, with no exceptions listed.
"""
import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import snlp_lab

PKG = Path(snlp_lab.__file__).parent
# bottom to top; packages of one rank may not import each other
LAYERS = [{"core"}, {"data"}, {"models"}, {"solvers"}, {"decoding", "training"}, {"measurement"}, {"lab"}]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}
COMMANDS = {"bench", "claims", "evaluate", "figures", "generate", "gpu_check", "gpu_study", "train", "train_speed"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PKG.rglob("*.py")}


def imports(path: Path) -> set[str]:
    """The snlp_lab modules that `path` imports, anywhere in it (inside functions too)."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("snlp_lab"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("snlp_lab"):
                target = node.module
            else:
                continue
            for a in node.names:  # `from . import report` names a module
                out.add(f"{target}.{a.name}" if f"{target}.{a.name}" in MODULES else target)
    return {m for m in out if m in MODULES and m != me}


GRAPH = {m: imports(p) for m, p in MODULES.items()}


def place(module: str) -> str:
    """The subpackage a module belongs to ("" for the package itself, the command name for a command)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_the_top_level_holds_the_api_and_the_commands_only():
    top = {p.stem for p in PKG.glob("*.py")} - {"__init__"}
    assert top == COMMANDS
    folders = {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders == set(RANK)
    for name in COMMANDS:
        assert 'if __name__ == "__main__":' in (PKG / f"{name}.py").read_text(), name


@pytest.mark.parametrize("module", sorted(m for m in MODULES if place(m) in RANK))
def test_imports_run_one_way(module):
    here = place(module)
    for target in GRAPH[module]:
        there = place(target)
        assert there in RANK, f"{module} imports {target}: a library module never imports a command or the API"
        assert there == here or RANK[there] < RANK[here], \
            f"{module} ({here}) imports {target} ({there}): layers import only from the layers before them"


def test_no_import_circles():
    """Every strongly connected component of the import graph is a single module (Tarjan's algorithm)."""
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def connect(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            connect(v)
    assert not circles, circles


def test_no_command_line_code_inside_the_library():
    """Parsers and `__main__` blocks live in the command modules; core.cli holds the plumbing they share."""
    for module, path in MODULES.items():
        if place(module) not in RANK or module == "snlp_lab.core.cli":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            assert not (isinstance(node, ast.Import) and any(a.name == "argparse" for a in node.names)), module
            assert not (isinstance(node, ast.Compare) and getattr(node.left, "id", None) == "__name__"), module


def test_every_built_in_surrogate_is_known_without_importing_its_model():
    """Method names come from the solvers' own registry, not from a model module imported for its side effect."""
    code = "from snlp_lab.solvers.grammar import parse_config; print(parse_config('hcn:K=1').method)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PKG.parent)
    assert out.stdout.strip() == "hcn", out.stderr


def test_solve_is_the_function():
    assert callable(snlp_lab.solve) and importlib.import_module("snlp_lab.solvers.solver").solve is snlp_lab.solve


def test_generate_is_the_function_whatever_was_imported():
    from snlp_lab.decoding.decoder import generate
    for name in COMMANDS:
        importlib.import_module(f"snlp_lab.{name}")
    assert snlp_lab.generate is generate
    for name in snlp_lab.__all__:
        assert getattr(snlp_lab, name) is not None
