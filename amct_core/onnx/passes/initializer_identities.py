"""Read initializers directly instead of through the tracer's ``Identity`` nodes (FORMATS §5).

torch's exporter keeps one initializer of several equal ones (e.g. the statistics of two fresh
BatchNorms) and gives the others' readers ``Identity(<initializer>)``. Every weight and BatchNorm
parameter must be an initializer in the written models, and the BatchNorm fold must see them as such.

**Matches** ``y = Identity(x)`` (default domain) where ``x`` is an initializer and ``y`` is not a graph
output. **Rewrites**: every reader of ``y`` reads ``x``; the Identity goes.

This is the part of onnx-ir's ``IdentityEliminationPass`` that the format asks for, and no more: that
pass also removes Identities of computed tensors and renames tensors to graph-output names, which
would change files that have nothing to fix.
"""
from __future__ import annotations

import onnx_ir as ir


def _initializer_identity(node: ir.Node) -> bool:
    if node.op_type != "Identity" or node.domain != "" or len(node.inputs) != 1 or len(node.outputs) != 1:
        return False
    x, y = node.inputs[0], node.outputs[0]
    return x is not None and x.is_initializer() and not y.is_graph_output()


class InitializerIdentityEliminationPass(ir.passes.InPlacePass):
    """Readers of ``Identity(<initializer>)`` read the initializer (see the module docstring)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        removed = 0
        for node in list(graph):
            if _initializer_identity(node):
                ir.convenience.replace_all_uses_with(node.outputs[0], node.inputs[0])
                graph.remove(node, safe=True)
                removed += 1
        return ir.passes.PassResult(model, modified=removed > 0)
