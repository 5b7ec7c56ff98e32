"""The pass lists of amct_core.onnx.passes and the builders that run them, on small hand-built graphs."""
import numpy as np
import onnx_ir as ir
import pytest

from amct_core.errors import ExportError
from amct_core.onnx.build import build_deploy, build_fake_quant
from amct_core.onnx.passes import deploy_passes, run
from amct_core.record import LayerRecord
from tests.ir_graphs import graph, nodes

W = np.ones((3, 3), np.float32)
REC = LayerRecord(scale_d=0.05, offset_d=-3, scale_w=[0.25])


def _downsample_first() -> ir.Model:
    """A ResNet block whose downsample branch runs first: 'down' and then 'c1' read the block input."""
    return graph("""g (float[2, 3] x) => (float[2, 3] y) {
        [down] d = Gemm (x, w1)
        [c1] c = Gemm (x, w2)
        [add] y = Add(c, d)
    }""", w1=W, w2=W)


def test_a_quant_shared_by_several_layers_stands_before_the_first_of_them_in_graph_order():
    m = _downsample_first()
    run(deploy_passes({"c1": REC, "down": REC}), m)  # record order: c1 first
    assert nodes(m) == ["c1.quant", "down", "down.dequant", "c1", "c1.dequant", "add"]


def test_every_other_node_keeps_its_place():
    m = graph("""g (float[2, 3] x) => (float[2, 3] y) {
        [pre] p = Relu(x)
        [fc] h = Gemm (p, w)
        [side] s = Neg(p)
        [add] y = Add(h, s)
    }""", w=W)
    run(deploy_passes({"fc": REC}), m)
    assert nodes(m) == ["pre", "fc.quant", "fc", "fc.dequant", "side", "add"]


def test_an_error_a_pass_raises_reaches_the_caller_as_itself():
    m = graph("""g (float[2, 3] x) => (float[2, 3] y) {
        [fc] y = Gemm (x, w)
    }""", w=W)
    with pytest.raises(ExportError, match="layer 'missing': no Conv/Gemm/MatMul node"):
        run(deploy_passes({"missing": REC}), m)


def test_the_builders_leave_the_traced_graph_as_it_was():
    traced = _downsample_first()
    before = ir.to_proto(traced)
    build_fake_quant(traced, {"c1": REC, "down": REC})
    build_deploy(traced, {"c1": REC, "down": REC})
    assert ir.to_proto(traced) == before


def test_the_fake_quant_model_needs_opset_11():
    traced = graph("""g (float[2, 3] x) => (float[2, 3] y) {
        [fc] y = Gemm (x, w)
    }""", opset=10, w=W)
    with pytest.raises(ExportError, match="opset_version 10: the fake-quant model needs Round"):
        build_fake_quant(traced, {"fc": REC})
