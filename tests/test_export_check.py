"""The post-conditions every written model must meet (amct_core.onnx.check), each on a small model."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto

from amct_core import ExportError
from amct_core.onnx.check import (
    check_before_write,
    check_graph_order,
    check_no_initializer_identity,
    check_opset_import,
    checker_view,
)

F = ir.DataType.FLOAT


def _model(nodes, inputs, outputs, inits=(), opsets=None) -> ir.Model:
    opsets = {"": 13} if opsets is None else opsets
    graph = ir.Graph(inputs, outputs, nodes=nodes, initializers=inits, opset_imports=opsets, name="g")
    return ir.Model(graph, ir_version=8)


def _x() -> ir.Value:
    return ir.val("x", F, ["batch", 4])


def _init(name: str, tensor) -> ir.Value:
    return ir.val(name, const_value=tensor if isinstance(tensor, ir.TensorProtocol) else ir.tensor(tensor))


def _mlp(w=None) -> ir.Model:
    x, w = _x(), _init("w", np.ones((4, 3), np.float32) if w is None else w)
    fc = ir.node("MatMul", [x, w], name="fc", outputs=[ir.val("h")])
    act = ir.node("Relu", [fc.outputs[0]], name="act", outputs=[ir.val("y", F, ["n", "d"])])
    return _model([fc, act], [x], [act.outputs[0]], [w])


def test_a_sorted_model_of_standard_ops_passes():
    check_before_write(_mlp(), "model", standard_ops=True)


def test_a_node_reading_a_tensor_produced_later_is_named():
    x = _x()
    neg = ir.node("Neg", [x], name="neg", outputs=[ir.val("h")])
    act = ir.node("Relu", [neg.outputs[0]], name="act", outputs=[ir.val("y")])
    with pytest.raises(ExportError, match=r"Relu node 'act' reads 'h' before Neg node 'neg' produces it.*topological"):
        check_graph_order(_model([act, neg], [x], [act.outputs[0]]), "m")


def test_a_node_reading_an_undefined_tensor_is_named():
    x = _x()
    add = ir.node("Add", [x, ir.val("nowhere")], name="add", outputs=[ir.val("y")])
    with pytest.raises(ExportError, match=r"Add node 'add' reads 'nowhere', which no node, initializer or graph input"):
        check_graph_order(_model([add], [x], [add.outputs[0]]), "m")


def test_a_tensor_produced_twice_is_named():
    x = _x()
    a = ir.node("Neg", [x], name="a", outputs=[ir.val("y")])
    b = ir.node("Relu", [x], name="b", outputs=[ir.val("y")])
    with pytest.raises(ExportError, match=r"Relu node 'b' produces 'y', which is already defined"):
        check_graph_order(_model([a, b], [x], [b.outputs[0]]), "m")


def test_a_graph_output_no_node_produces_is_named():
    x = _x()
    a = ir.node("Neg", [x], name="a", outputs=[ir.val("y")])
    with pytest.raises(ExportError, match="graph output 'z' is produced by no node"):
        check_graph_order(_model([a], [x], [a.outputs[0], ir.val("z")]), "m")


def test_an_identity_forwarding_an_initializer_is_named():
    x, w = _x(), _init("w", np.ones(4, np.float32))
    ident = ir.node("Identity", [w], name="/Identity_3", outputs=[ir.val("w2")])
    mul = ir.node("Mul", [x, ident.outputs[0]], name="mul", outputs=[ir.val("y")])
    m = _model([ident, mul], [x], [mul.outputs[0]], [w])
    with pytest.raises(ExportError, match=r"Identity node '/Identity_3' forwards initializer 'w' to 'w2'"):
        check_no_initializer_identity(m, "m")


@pytest.mark.parametrize("opsets", [{"": 13, "amct_trace": 1}, {"custom": 1}, {}])
def test_anything_but_one_default_domain_opset_is_refused(opsets):
    x = _x()
    a = ir.node("Neg", [x], name="a", outputs=[ir.val("y")])
    with pytest.raises(ExportError, match="exactly one entry, the default domain"):
        check_opset_import(_model([a], [x], [a.outputs[0]], opsets=opsets), "m")


def test_the_error_names_the_model_and_says_nothing_was_written():
    x = _x()
    add = ir.node("Add", [x, ir.val("nowhere")], name="add", outputs=[ir.val("y")])
    with pytest.raises(ExportError, match=r"^deploy model 'out/m_deploy_model.onnx': .*nothing was written"):
        check_before_write(_model([add], [x], [add.outputs[0]]), "deploy model 'out/m_deploy_model.onnx'",
                           standard_ops=False)


def test_the_onnx_checker_sees_the_shape_of_a_weight_it_is_not_given():
    m = _mlp(w=np.ones((5, 3), np.float32))  # [5, 3] cannot multiply a [batch, 4] input
    with pytest.raises(ExportError, match=r"onnx.checker.*MatMul"):
        check_before_write(m, "fake-quant model", standard_ops=True)


def test_a_model_with_non_standard_ops_gets_only_the_graph_checks():
    x = _x()
    q = ir.node("AscendQuant", [x], {"dst_type": "INT8", "offset": 0.0, "scale": 1.0}, name="q",
                outputs=[ir.val("y", ir.DataType.INT8, ["batch", 4])])
    m = _model([q], [x], [q.outputs[0]])
    check_before_write(m, "deploy model", standard_ops=False)
    with pytest.raises(ExportError, match="AscendQuant"):
        check_before_write(m, "deploy model", standard_ops=True)


def test_no_lazy_weight_is_computed():
    def boom():
        raise AssertionError("the post-condition computed a weight")

    check_before_write(_mlp(w=ir.LazyTensor(boom, F, ir.Shape([4, 3]))), "fake-quant model", standard_ops=True)


def test_large_initializers_reach_the_checker_as_stubs_without_data():
    x = _x()
    big, shape = _init("big", np.ones((4, 300), np.float32)), _init("shape", np.array([-1, 3], np.int64))
    fc = ir.node("MatMul", [x, big], name="fc", outputs=[ir.val("h")])
    reshape = ir.node("Reshape", [fc.outputs[0], shape], name="reshape", outputs=[ir.val("y", F, ["n", 3])])
    m = _model([fc, reshape], [x], [reshape.outputs[0]], [big, shape])
    view = {t.name: t for t in checker_view(m).graph.initializer}
    assert view["big"].data_location == TensorProto.EXTERNAL and not view["big"].raw_data
    assert list(view["big"].dims) == [4, 300] and view["big"].data_type == TensorProto.FLOAT
    assert onnx.numpy_helper.to_array(view["shape"]).tolist() == [-1, 3]  # shape inference reads small operands
    check_before_write(m, "model", standard_ops=True)
    assert m.graph.initializers["big"].const_value.numpy().shape == (4, 300)  # the model itself is untouched
