"""The graph rewrites of amct_core.onnx.passes, each on a small hand-made graph."""
from __future__ import annotations

import pytest
from onnx import TensorProto, helper

from amct_core.onnx.passes import splice_nodes


def _graph(nodes, inits=(), outputs=("y",)):
    return helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], list(inits))


def _names(g):
    return [n.name for n in g.node]


# ---- splice_nodes ------------------------------------------------------------------------------

def test_shared_group_goes_before_its_first_reader_in_graph_order():
    # 'down' reads the shared chain's output before 'c1' does, though 'c1' was handled first
    g = _graph([helper.make_node("Relu", ["q"], ["a"], name="down"),
                helper.make_node("Relu", ["q"], ["b"], name="c1"),
                helper.make_node("Add", ["a", "b"], ["y"], name="add")])
    chain = [helper.make_node("Neg", ["x"], ["t"], name="chain.0"), helper.make_node("Neg", ["t"], ["q"], name="chain.1")]
    splice_nodes(g, [chain])
    assert _names(g) == ["chain.0", "chain.1", "down", "c1", "add"]


def test_nodes_go_right_after_the_named_node():
    g = _graph([helper.make_node("Relu", ["x"], ["acc"], name="layer"), helper.make_node("Relu", ["y0"], ["y"], name="next")])
    splice_nodes(g, after={"layer": [helper.make_node("Neg", ["acc"], ["y0"], name="layer.dequant")]})
    assert _names(g) == ["layer", "layer.dequant", "next"]


def test_a_group_no_node_reads_is_refused():
    g = _graph([helper.make_node("Relu", ["x"], ["y"], name="r")])
    with pytest.raises(ValueError, match="read by no node"):
        splice_nodes(g, [[helper.make_node("Neg", ["x"], ["unused"], name="lost")]])


def test_an_after_name_no_node_has_is_refused():
    g = _graph([helper.make_node("Relu", ["x"], ["y"], name="r")])
    with pytest.raises(ValueError, match="no node named"):
        splice_nodes(g, after={"missing": [helper.make_node("Neg", ["y"], ["z"], name="tail")]})
