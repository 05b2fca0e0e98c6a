"""The library's shape: imports between its modules run one way (no cycles), so that each module can
be read, imported and tested on top of the ones it names."""
import ast
from pathlib import Path

import snlp_lab

PKG = Path(snlp_lab.__file__).parent
# A known cycle, both sides imported inside functions: a fine-tuned transformers model's checkpoint is a
# save_pretrained folder that checkpoint.load_checkpoint opens with hf.load_hf, and hf.load_hf accepts
# such a run folder.
KNOWN = {frozenset({"checkpoint", "hf"})}


def imports(path: Path) -> set[str]:
    """The package modules `path` imports, anywhere but under `if __name__ == "__main__":`."""
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Compare) and \
                getattr(node.test.left, "id", None) == "__name__":
            node.body = []  # the command-line entry: not part of the module's dependencies
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                out.add(node.module.split(".")[0])
            else:
                out.update(a.name for a in node.names)
    return out & {p.stem for p in PKG.glob("*.py")}


def test_no_import_cycles():
    graph = {p.stem: imports(p) for p in PKG.glob("*.py") if p.stem != "__init__"}
    cycles = set()

    def visit(start, node, path):
        for nxt in graph.get(node, ()):
            if nxt == start:
                cycles.add(frozenset(path))
            elif nxt not in path:
                visit(start, nxt, path + [nxt])

    for m in graph:
        visit(m, m, [m])
    assert cycles <= KNOWN, sorted(map(sorted, cycles - KNOWN))


def test_solve_is_the_function():
    import importlib
    assert callable(snlp_lab.solve) and importlib.import_module("snlp_lab.solver").solve is snlp_lab.solve
