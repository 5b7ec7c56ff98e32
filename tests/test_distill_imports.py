"""The modules of amct_core/distill import each other in one direction (no cycle, also none through
an import inside a function), so each can be read and loaded on its own."""
from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

from amct_core.distill import config

PACKAGE = Path(config.__file__).parent


def sibling_imports(path: Path) -> set[str]:
    """The modules of the package that ``path`` imports (``from .x import``, ``from . import x``), anywhere."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            out.update([node.module] if node.module else [a.name for a in node.names])
    return {m.split(".")[0] for m in out if (PACKAGE / f"{m.split('.')[0]}.py").exists()}


def test_the_distill_modules_import_each_other_without_a_cycle():
    graph = {p.stem: sibling_imports(p) for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    try:
        TopologicalSorter(graph).prepare()
    except CycleError as e:
        raise AssertionError(f"import cycle in amct_core/distill: {e.args[1]}") from None
