"""LowerQuantLayersPass: each tracer placeholder becomes the standard op(s) of its layer, with its
quantized weight, named after its module."""
import numpy as np
import pytest
import torch

from amct_core.errors import ExportError
from amct_core.formats import quantize_weight
from amct_core.onnx.passes import LayerSource, LowerQuantLayersPass, run
from amct_core.onnx.weights import QuantizedWeight
from tests.ir_graphs import array, graph, node, nodes

TRACE = ', "amct_trace" : 1'
RNG = np.random.default_rng(0)


def _linear(out_f=3, in_f=4, bias=True) -> LayerSource:
    w = torch.from_numpy(RNG.standard_normal((out_f, in_f)).astype(np.float32))
    return LayerSource(w, np.array([0.02], np.float32), RNG.standard_normal(out_f).astype(np.float32) if bias else None)


def _conv() -> LayerSource:
    w = torch.from_numpy(RNG.standard_normal((2, 3, 3, 3)).astype(np.float32))
    conv = {"kernel_shape": [3, 3], "strides": [1, 1], "pads": [1, 1, 1, 1], "dilations": [1, 1], "group": 1}
    return LayerSource(w, np.array([0.03, 0.04], np.float32), np.array([0.5, -1.0], np.float32), conv)


def _placeholder_graph(kind: str, x: str = "float[2, 4]", y: str = "float[2, 3]", after: str = "y = Relu(h)",
                       outputs: str = "float[2, 3] y", opset: int = 13):
    return graph(f"""g ({x} x) => ({outputs}) {{
        h = amct_trace.QuantLayer <layer = "fc", kind = "{kind}"> (x)
        {after}
    }}""", opset=opset, domains=TRACE)


def test_a_conv_placeholder_becomes_a_conv_named_after_its_module():
    m = graph("""g (float[1, 3, 4, 4] x) => (float[1, 2, 4, 4] y) {
        h = amct_trace.QuantLayer <layer = "conv1", kind = "conv"> (x)
        y = Relu(h)
    }""", domains=TRACE)
    src = _conv()
    LowerQuantLayersPass({"conv1": src}, 13)(m)
    conv = node(m, "conv1")
    assert conv.op_type == "Conv" and [v.name for v in conv.inputs] == ["x", "conv1.weight", "conv1.bias"]
    attrs = {k: a.value for k, a in conv.attributes.items()}
    assert attrs == {k: tuple(v) if isinstance(v, list) else v for k, v in src.conv.items()}
    assert np.array_equal(array(m, "conv1.bias"), src.bias)


def test_the_weight_is_its_grid_times_its_scale():
    m = _placeholder_graph("gemm")
    src = _linear()
    LowerQuantLayersPass({"fc": src}, 13)(m)
    w = m.graph.initializers["fc.weight"].const_value
    q = quantize_weight(src.weight, src.scale_w).numpy()
    assert isinstance(w, QuantizedWeight) and np.array_equal(w.grid().numpy(), q.T)
    assert np.array_equal(w.numpy(), q.T * np.float32(0.02))


def test_a_linear_on_2d_input_becomes_a_gemm_with_its_weight_stored_in_by_out():
    m = _placeholder_graph("gemm")
    LowerQuantLayersPass({"fc": _linear()}, 13)(m)
    gemm = node(m, "fc")
    assert gemm.op_type == "Gemm" and gemm.attributes.get_int("transB") == 0
    assert array(m, "fc.weight").shape == (4, 3)


def test_a_bias_free_gemm_below_opset_11_gets_a_zero_bias():
    m = _placeholder_graph("gemm", opset=10)
    LowerQuantLayersPass({"fc": _linear(bias=False)}, 10)(m)
    assert [v.name for v in node(m, "fc").inputs] == ["x", "fc.weight", "fc.bias"]
    assert not array(m, "fc.bias").any()


def test_a_linear_on_nd_input_becomes_a_matmul_and_its_bias_add():
    m = _placeholder_graph("matmul", x="float[2, 5, 4]", outputs="float[2, 5, 3] y")
    LowerQuantLayersPass({"fc": _linear()}, 13)(m)
    assert nodes(m)[:2] == ["fc", "fc.bias_add"]
    mm, add = node(m, "fc"), node(m, "fc.bias_add")
    assert mm.op_type == "MatMul" and mm.outputs[0].name == "fc.matmul_output"
    assert add.op_type == "Add" and [v.name for v in add.inputs] == ["fc.matmul_output", "fc.bias"]


def test_the_layer_output_is_named_after_the_layer_and_keeps_its_readers():
    m = _placeholder_graph("gemm")
    LowerQuantLayersPass({"fc": _linear()}, 13)(m)
    assert node(m, "fc").outputs[0].name == "fc.output"
    assert [n.op_type for n in m.graph] == ["Gemm", "Relu"]
    assert list(m.graph)[1].inputs[0] is node(m, "fc").outputs[0]


def test_a_layer_output_that_is_a_graph_output_keeps_its_name_and_gets_named_dims():
    m = graph("""g (float[N, 4] x) => (float[QuantLayer_dim_0, 3] h) {
        h = amct_trace.QuantLayer <layer = "fc", kind = "gemm"> (x)
    }""", domains=TRACE)
    LowerQuantLayersPass({"fc": _linear()}, 13)(m)
    out = m.graph.outputs[0]
    assert out.producer() is node(m, "fc") and out.name == "h"
    assert str(out.shape[0]) == "h_dim_0"


def test_a_module_called_twice_is_an_error_naming_it():
    m = graph("""g (float[2, 4] x) => (float[2, 4] y) {
        a = amct_trace.QuantLayer <layer = "fc", kind = "gemm"> (x)
        y = amct_trace.QuantLayer <layer = "fc", kind = "gemm"> (a)
    }""", domains=TRACE)
    with pytest.raises(ExportError, match="layer 'fc' is called more than once"):
        run([LowerQuantLayersPass({"fc": _linear(4, 4)}, 13)], m)
