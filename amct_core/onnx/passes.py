"""Graph rewrites on the protobuf graph, each a small function that does one thing.

* :func:`eliminate_initializer_identities` - torch's exporter replaces equal initializers (e.g. the
  statistics of two fresh BatchNorms) by one initializer and ``Identity`` nodes; consumers are
  rewired to the initializer itself, so every weight and BatchNorm parameter is an initializer
  again (FORMATS §5) and the BN fold sees them.
* :func:`splice_nodes` - insert new nodes into a sorted graph so that it stays sorted: groups that
  must stand before their first consumer (a quant chain shared by several layers) and nodes that
  must follow a given node (a layer's dequant), in one pass over the graph.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import onnx


def eliminate_initializer_identities(graph: onnx.GraphProto, initializer_names: set[str]) -> int:
    """Rewire every reader of ``Identity(<initializer>)`` to the initializer and drop the Identity.

    An Identity whose output is a graph output is kept (the output name must stay). Value infos of
    the removed tensors are dropped. Returns the number of Identity nodes removed.
    """
    graph_outputs = {o.name for o in graph.output}
    alias: dict[str, str] = {}
    keep = []
    for n in graph.node:
        if (n.op_type == "Identity" and n.domain in ("", "ai.onnx") and len(n.input) == 1 and len(n.output) == 1
                and n.input[0] in initializer_names and n.output[0] not in graph_outputs):
            alias[n.output[0]] = n.input[0]
        else:
            keep.append(n)
    if not alias:
        return 0
    for n in keep:
        for i, name in enumerate(n.input):
            if name in alias:
                n.input[i] = alias[name]
    del graph.node[:]
    graph.node.extend(keep)
    vi = graph.value_info
    for i in range(len(vi) - 1, -1, -1):
        if vi[i].name in alias:
            del vi[i]
    return len(alias)


def splice_nodes(graph: onnx.GraphProto, before_first_use: Iterable[Sequence[onnx.NodeProto]] = (),
                 after: dict[str, Sequence[onnx.NodeProto]] | None = None) -> None:
    """Insert nodes into ``graph`` in one pass, keeping a sorted graph sorted.

    ``before_first_use``: groups of nodes (each sorted within itself, its inputs defined before any
    reader of its outputs); each group is placed right before the first node of the graph that reads
    one of its outputs, wherever in the graph that node is. ``after``: node name -> nodes placed
    right after that node. A group that no node reads, or an ``after`` name that no node has, is an
    error (ValueError): it would leave a node out or dangling.
    """
    after = dict(after or {})
    pending: dict[str, int] = {}
    groups = [list(g) for g in before_first_use]
    for k, group in enumerate(groups):
        for node in group:
            for o in node.output:
                if o:
                    pending[o] = k
    placed: set[int] = set()
    out: list[onnx.NodeProto] = []

    def emit(node: onnx.NodeProto) -> None:
        for i in node.input:
            k = pending.get(i)
            if k is not None and k not in placed:
                placed.add(k)
                for g in groups[k]:
                    emit(g)
        out.append(node)
        for a in after.pop(node.name, ()) if node.name else ():
            emit(a)

    for node in list(graph.node):
        emit(node)
    unplaced = [groups[k][-1].name or groups[k][-1].output[0] for k in range(len(groups)) if k not in placed]
    if unplaced or after:
        raise ValueError(f"splice_nodes: groups read by no node {unplaced}, or no node named {sorted(after)}")
    del graph.node[:]
    graph.node.extend(out)
