"""Small hand-built onnx-ir graphs for the pass tests, written in the ONNX text syntax."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir


def graph(text: str, opset: int = 13, domains: str = "", **initializers: np.ndarray) -> ir.Model:
    """A model whose main graph is ``text`` (``name (inputs) => (outputs) { nodes }``), with ``initializers``
    given as arrays by name."""
    header = f'<ir_version: 8, opset_import: ["" : {opset}{domains}]>\n'
    return ir.from_onnx_text(header + text, initializers=[ir.tensor(a, name=n) for n, a in initializers.items()])


def nodes(model: ir.Model) -> list[str]:
    """The node names, in graph order."""
    return [n.name for n in model.graph]


def node(model: ir.Model, name: str) -> ir.Node:
    return next(n for n in model.graph if n.name == name)


def array(model: ir.Model, name: str) -> np.ndarray:
    """An initializer's values (a lazy one computed now)."""
    return model.graph.initializers[name].const_value.numpy()
