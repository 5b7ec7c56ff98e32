"""The graph rewrites of amct_core.onnx.passes, each on a small hand-made graph."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from amct_core.onnx.passes import eliminate_initializer_identities, splice_nodes


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


# ---- eliminate_initializer_identities -----------------------------------------------------------

def _dedup_graph(extra_outputs=()):
    """What torch's exporter writes for two BatchNorm-like readers of equal parameters: one
    initializer, and an Identity per duplicate."""
    w = numpy_helper.from_array(np.ones(4, np.float32), "bn1.weight")
    return _graph([helper.make_node("Identity", ["bn1.weight"], ["bn2.weight"], name="/Identity"),
                   helper.make_node("Mul", ["x", "bn1.weight"], ["a"], name="bn1"),
                   helper.make_node("Mul", ["a", "bn2.weight"], ["y"], name="bn2")],
                  inits=[w], outputs=("y",) + tuple(extra_outputs))


def test_readers_of_an_identity_of_an_initializer_read_the_initializer():
    g = _dedup_graph()
    g.value_info.append(helper.make_tensor_value_info("bn2.weight", TensorProto.FLOAT, [4]))
    assert eliminate_initializer_identities(g, {"bn1.weight"}) == 1
    assert _names(g) == ["bn1", "bn2"]
    assert list(g.node[1].input) == ["a", "bn1.weight"]
    assert [v.name for v in g.value_info] == []


def test_an_identity_that_produces_a_graph_output_is_kept():
    g = _dedup_graph(extra_outputs=("bn2.weight",))
    assert eliminate_initializer_identities(g, {"bn1.weight"}) == 0
    assert "/Identity" in _names(g)


def test_an_identity_of_a_computed_tensor_is_kept():
    g = _graph([helper.make_node("Relu", ["x"], ["r"], name="relu"), helper.make_node("Identity", ["r"], ["y"], name="id")])
    assert eliminate_initializer_identities(g, set()) == 0
    assert _names(g) == ["relu", "id"]
