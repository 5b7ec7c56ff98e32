"""Graph rewrites on the protobuf graph, each a small function that does one thing.

* :func:`splice_nodes` - insert new nodes into a sorted graph so that it stays sorted: groups that
  must stand before their first consumer (a quant chain shared by several layers) and nodes that
  must follow a given node (a layer's dequant), in one pass over the graph.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import onnx


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
