"""The post-conditions every written model must meet (amct_core.onnx.check), each on a small model."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from amct_core import ExportError
from amct_core.onnx.check import (
    check_before_write, check_graph_order, check_no_initializer_identity, check_opset_import, checker_view,
)
from amct_core.onnx.store import LazyTensor, OnnxModel


def _model(nodes, tensors=None, inits=(), outputs=("y",), opsets=(("", 13),)) -> OnnxModel:
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                          [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["n", "d"]) for o in outputs], list(inits))
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    return OnnxModel(proto, dict(tensors or {}))


def _mlp(w=None) -> OnnxModel:
    w = np.ones((4, 3), np.float32) if w is None else w
    return _model([helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
                   helper.make_node("Relu", ["h"], ["y"], name="act")], tensors={"w": w})


def test_a_sorted_model_of_standard_ops_passes():
    check_before_write(_mlp(), "model", standard_ops=True)


def test_a_node_reading_a_tensor_produced_later_is_named():
    m = _model([helper.make_node("Relu", ["h"], ["y"], name="act"), helper.make_node("Neg", ["x"], ["h"], name="neg")])
    with pytest.raises(ExportError, match=r"Relu node 'act' reads 'h' before Neg node 'neg' produces it.*topological"):
        check_graph_order(m, "m")


def test_a_node_reading_an_undefined_tensor_is_named():
    m = _model([helper.make_node("Add", ["x", "nowhere"], ["y"], name="add")])
    with pytest.raises(ExportError, match=r"Add node 'add' reads 'nowhere', which no node, initializer or graph input"):
        check_graph_order(m, "m")


def test_a_tensor_produced_twice_is_named():
    m = _model([helper.make_node("Neg", ["x"], ["y"], name="a"), helper.make_node("Relu", ["x"], ["y"], name="b")])
    with pytest.raises(ExportError, match=r"Relu node 'b' produces 'y', which is already defined"):
        check_graph_order(m, "m")


def test_a_graph_output_no_node_produces_is_named():
    m = _model([helper.make_node("Neg", ["x"], ["y"], name="a")], outputs=("y", "z"))
    with pytest.raises(ExportError, match="graph output 'z' is produced by no node"):
        check_graph_order(m, "m")


def test_an_identity_forwarding_an_initializer_is_named():
    m = _model([helper.make_node("Identity", ["w"], ["w2"], name="/Identity_3"),
                helper.make_node("Mul", ["x", "w2"], ["y"], name="mul")], tensors={"w": np.ones(4, np.float32)})
    with pytest.raises(ExportError, match=r"Identity node '/Identity_3' forwards initializer 'w' to 'w2'"):
        check_no_initializer_identity(m, "m")


@pytest.mark.parametrize("opsets", [(("", 13), ("amct_trace", 1)), (("custom", 1),), ()])
def test_anything_but_one_default_domain_opset_is_refused(opsets):
    m = _model([helper.make_node("Neg", ["x"], ["y"], name="a")], opsets=opsets)
    with pytest.raises(ExportError, match="exactly one entry, the default domain"):
        check_opset_import(m.proto, "m")


def test_the_error_names_the_model_and_says_nothing_was_written():
    m = _model([helper.make_node("Add", ["x", "nowhere"], ["y"], name="add")])
    with pytest.raises(ExportError, match=r"^deploy model 'out/m_deploy_model.onnx': .*nothing was written"):
        check_before_write(m, "deploy model 'out/m_deploy_model.onnx'", standard_ops=False)


def test_the_onnx_checker_sees_the_shape_of_a_weight_it_is_not_given():
    m = _mlp(w=np.ones((5, 3), np.float32))  # [5, 3] cannot multiply a [batch, 4] input
    with pytest.raises(ExportError, match=r"onnx.checker.*MatMul"):
        check_before_write(m, "fake-quant model", standard_ops=True)


def test_a_model_with_non_standard_ops_gets_only_the_graph_checks():
    m = _model([helper.make_node("AscendQuant", ["x"], ["y"], name="q", scale=1.0, offset=0.0, dst_type="INT8")])
    check_before_write(m, "deploy model", standard_ops=False)
    with pytest.raises(ExportError, match="AscendQuant"):
        check_before_write(m, "deploy model", standard_ops=True)


def test_no_lazy_weight_is_computed():
    def boom():
        raise AssertionError("the post-condition computed a weight")

    m = _mlp(w=LazyTensor((4, 3), np.dtype(np.float32), boom))
    check_before_write(m, "fake-quant model", standard_ops=True)


def test_large_initializers_reach_the_checker_as_stubs_without_data():
    big = numpy_helper.from_array(np.ones((4, 300), np.float32), "big")
    small = numpy_helper.from_array(np.array([-1, 3], np.int64), "shape")
    m = _model([helper.make_node("MatMul", ["x", "big"], ["h"], name="fc"),
                helper.make_node("Reshape", ["h", "shape"], ["y"], name="reshape")], inits=[big, small])
    view = {t.name: t for t in checker_view(m).graph.initializer}
    assert view["big"].data_location == TensorProto.EXTERNAL and not view["big"].raw_data
    assert list(view["big"].dims) == [4, 300] and view["big"].data_type == TensorProto.FLOAT
    assert view["shape"] == small  # small operands keep their values: shape inference reads them
    check_before_write(m, "model", standard_ops=True)
    assert len(m.graph.initializer[0].raw_data) == 4 * 300 * 4  # the model itself is untouched
    onnx.checker.check_model(m.proto, full_check=True)
