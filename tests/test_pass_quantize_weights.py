"""QuantizeWeightsPass: each quantized layer's weight becomes its int8 grid and its bias int32 values,
stored as float32 (fake-quant) or int8 / int32 (deploy)."""
import numpy as np
import onnx_ir as ir
import pytest
import torch

from amct_core.errors import RecordError
from amct_core.formats import quantize_weight
from amct_core.onnx.passes import QuantizeWeightsPass
from amct_core.onnx.weights import QuantizedWeight
from amct_core.record import LayerRecord
from tests.ir_graphs import array, graph

F32, I8, I32 = ir.DataType.FLOAT, ir.DataType.INT8, ir.DataType.INT32
RNG = np.random.default_rng(2)
W = (RNG.standard_normal((3, 4)) * 0.5).astype(np.float32)  # Gemm weight [in = 3, out = 4]
B = np.array([0.25, -1.0, 0.0, 3.0], np.float32)
REC = LayerRecord(scale_d=0.05, offset_d=-3, scale_w=[0.01, 0.02, 0.03, 0.04])


def _gemm() -> ir.Model:
    return graph("""g (float[2, 3] x) => (float[2, 4] y) {
        [fc] y = Gemm <transB = 0> (x, w, b)
    }""", w=W, b=B)


def test_the_weight_becomes_its_grid_along_the_output_channel_axis():
    m = _gemm()
    QuantizeWeightsPass({"fc": REC}, F32, F32)(m)
    want = np.clip(np.round(W / np.array(REC.scale_w, np.float32)), -128, 127)  # channels: axis 1 of [in, out]
    assert np.array_equal(array(m, "w"), want) and array(m, "w").dtype == np.float32


def test_the_bias_becomes_bias_over_scale_w_times_scale_d():
    m = _gemm()
    QuantizeWeightsPass({"fc": REC}, F32, F32)(m)
    deq = np.float32(REC.scale_d) * np.array(REC.scale_w, np.float32)
    assert np.array_equal(array(m, "b"), np.round(B.astype(np.float64) / deq.astype(np.float64)))


def test_the_deploy_flavour_stores_int8_weights_and_int32_biases():
    m = _gemm()
    QuantizeWeightsPass({"fc": REC}, I8, I32)(m)
    assert array(m, "w").dtype == np.int8 and array(m, "b").dtype == np.int32
    assert m.graph.initializers["w"].dtype == I8 and m.graph.initializers["b"].dtype == I32


def _module_weight(m: ir.Model) -> torch.Tensor:
    """The layer's weight as a quantized layer holds it: the module's [out, in] weight, stored transposed."""
    w = torch.from_numpy(W.T.copy())
    m.graph.initializers["w"].const_value = QuantizedWeight(w, REC.scale_w, transposed=True)
    return w


def test_a_weight_holding_its_own_grid_gives_it_instead_of_being_quantized_again(monkeypatch):
    m = _gemm()
    w = _module_weight(m)
    calls = []
    grid = QuantizedWeight.grid
    monkeypatch.setattr(QuantizedWeight, "grid", lambda self, dtype: calls.append(dtype) or grid(self, dtype))
    QuantizeWeightsPass({"fc": REC}, I8, I32)(m)
    assert not calls  # nothing is computed before the file is written
    assert np.array_equal(array(m, "w"), quantize_weight(w, np.array(REC.scale_w, np.float32)).numpy().T)
    assert calls == [torch.int8]


def test_a_record_with_other_scales_requantizes_the_stored_values():
    m = _gemm()
    _module_weight(m)
    dequantized = m.graph.initializers["w"].const_value.numpy()
    other = LayerRecord(scale_d=REC.scale_d, offset_d=REC.offset_d, scale_w=[0.08])
    QuantizeWeightsPass({"fc": other}, F32, F32)(m)
    assert np.array_equal(array(m, "w"), np.clip(np.round(dequantized / np.float32(0.08)), -128, 127))


def test_a_bias_that_overflows_int32_names_the_layer():
    m = _gemm()
    tiny = LayerRecord(scale_d=1e-8, offset_d=0, scale_w=[1e-8])
    with pytest.raises(RecordError, match="layer 'fc': bias overflows int32"):
        QuantizeWeightsPass({"fc": tiny}, I8, I32)(m)


def test_a_matmul_layer_s_bias_is_its_bias_add_s_constant():
    m = graph("""g (float[2, 5, 3] x) => (float[2, 5, 4] y) {
        ["fc"] h = MatMul(x, w)
        ["fc.bias_add"] y = Add(h, b)
    }""", w=W, b=B)
    QuantizeWeightsPass({"fc": REC}, I8, I32)(m)
    assert array(m, "b").dtype == np.int32
