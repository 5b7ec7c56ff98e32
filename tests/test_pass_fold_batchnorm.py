"""FoldBatchNormPass: a BatchNormalization after a quantized Conv is folded into it (FORMATS §3)."""
import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from amct_core.formats import quantize_weight
from amct_core.onnx.passes import FoldBatchNormPass
from amct_core.onnx.weights import QuantizedWeight
from tests.ir_graphs import array, graph, node, nodes

RNG = np.random.default_rng(1)
W = RNG.standard_normal((3, 2, 1, 1)).astype(np.float32)
SCALE = np.array([0.02, 0.03, 0.01], np.float32)
GAMMA = np.array([1.5, -0.5, 2.0], np.float32)  # a negative gamma flips a channel's grid
BN = dict(gamma=GAMMA, beta=np.array([0.1, 0.2, -0.3], np.float32), mean=np.array([0.5, -0.2, 0.0], np.float32),
          var=np.array([1.0, 0.25, 4.0], np.float32))
BIAS = np.array([0.3, -0.1, 0.2], np.float32)


def _conv_bn(bias: bool = True, outputs: str = "float[1, 3, 2, 2] y", tail: str = "y = Relu(z)", eps: float = 1e-5):
    """x -> Conv "conv" (a quantized layer: its weight w is a QuantizedWeight) -> BatchNormalization -> tail."""
    m = graph(f"""g (float[1, 2, 2, 2] x) => ({outputs}) {{
        [conv] c = Conv <kernel_shape = [1, 1]> (x, w{", b" if bias else ""})
        z = BatchNormalization <epsilon = {eps}> (c, gamma, beta, mean, var)
        {tail}
    }}""", w=W, **BN, **({"b": BIAS} if bias else {}))
    m.graph.initializers["w"].const_value = QuantizedWeight(torch.from_numpy(W), SCALE)
    return m


def _run(m: ir.Model, x: np.ndarray) -> np.ndarray:
    proto = ir.to_proto(m)
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_the_folded_conv_computes_what_conv_and_batchnorm_computed():
    x = RNG.standard_normal((1, 2, 2, 2)).astype(np.float32)
    m = _conv_bn()
    before = _run(m, x)
    assert FoldBatchNormPass()(m).modified
    assert [n.op_type for n in m.graph] == ["Conv", "Relu"]
    np.testing.assert_allclose(_run(m, x), before, rtol=1e-5, atol=1e-6)


def test_the_grid_takes_the_sign_of_k_and_the_scale_its_magnitude():
    m = _conv_bn()
    FoldBatchNormPass()(m)
    k = GAMMA / np.sqrt(BN["var"] + np.float32(1e-5))
    w = m.graph.initializers["w"].const_value
    assert np.array_equal(w.scale_w, (SCALE * np.abs(k)).astype(np.float32))
    want = quantize_weight(torch.from_numpy(W), SCALE).numpy() * np.sign(k).reshape(-1, 1, 1, 1)
    assert np.array_equal(w.grid().numpy(), want) and not np.signbit(w.grid().numpy()[want == 0]).any()


def test_the_bias_becomes_bias_minus_mean_times_k_plus_beta():
    m = _conv_bn()
    FoldBatchNormPass()(m)
    k = (GAMMA / np.sqrt(BN["var"] + np.float32(1e-5))).astype(np.float32)
    want = ((BIAS - BN["mean"]) * k + BN["beta"]).astype(np.float32)
    assert np.array_equal(array(m, "b"), want)


def test_a_conv_without_bias_gets_one_named_after_the_layer():
    m = _conv_bn(bias=False)
    FoldBatchNormPass()(m)
    assert [v.name for v in node(m, "conv").inputs][2] == "conv.bias"


def test_the_batchnorm_parameters_go_with_it():
    m = _conv_bn()
    FoldBatchNormPass()(m)
    assert sorted(m.graph.initializers) == ["b", "w"]


def test_epsilon_is_the_batchnorms_own():
    m = _conv_bn(eps=0.5)
    FoldBatchNormPass()(m)
    k = GAMMA / np.sqrt(BN["var"] + np.float32(0.5))
    assert np.array_equal(m.graph.initializers["w"].const_value.scale_w, (SCALE * np.abs(k)).astype(np.float32))


def test_a_batchnorm_output_that_is_a_graph_output_is_produced_by_the_conv_under_its_name():
    m = _conv_bn(outputs="float[1, 3, 2, 2] z", tail="")
    FoldBatchNormPass()(m)
    assert nodes(m) == ["conv"] and m.graph.outputs[0].name == "z" and m.graph.outputs[0].producer() is node(m, "conv")


@pytest.mark.parametrize("tail", ["y = Add(z, c)", ""])
def test_a_conv_output_read_by_more_than_the_batchnorm_or_a_graph_output_is_not_folded(tail):
    outputs = "float[1, 3, 2, 2] y" if tail else "float[1, 3, 2, 2] z, float[1, 3, 2, 2] c"
    m = _conv_bn(outputs=outputs, tail=tail)
    assert not FoldBatchNormPass()(m).modified


def test_a_conv_that_is_not_a_quantized_layer_is_not_folded():
    m = graph("""g (float[1, 2, 2, 2] x) => (float[1, 3, 2, 2] z) {
        c = Conv <kernel_shape = [1, 1]> (x, w)
        z = BatchNormalization (c, gamma, beta, mean, var)
    }""", w=W, **BN)
    assert not FoldBatchNormPass()(m).modified
