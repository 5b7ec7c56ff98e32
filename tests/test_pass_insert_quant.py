"""InsertFakeQuantPass / InsertAscendQuantPass: each quantized layer between its quant and its dequant
(FORMATS §4, §5)."""
import numpy as np
import onnx_ir as ir

from amct_core.formats import pack_deq_scale
from amct_core.onnx.passes import InsertAscendQuantPass, InsertFakeQuantPass
from amct_core.record import LayerRecord
from tests.ir_graphs import array, graph, node, nodes

W = np.ones((3, 4), np.float32)
REC = LayerRecord(scale_d=0.05, offset_d=-3, scale_w=[0.25])


def _mlp() -> ir.Model:
    return graph("""g (float[2, 3] x) => (float[2, 4] y) {
        [fc] h = Gemm (x, w)
        [act] y = Relu(h)
    }""", w=W)


def test_the_fake_quant_chain_puts_the_layer_input_on_the_integer_grid():
    m = _mlp()
    InsertFakeQuantPass({"fc": REC})(m)
    p = "fc.quant.fakequant"
    assert nodes(m)[:5] == [f"{p}.mul", f"{p}.round", f"{p}.add", f"{p}.clip", f"{p}.sub"]
    assert [n.op_type for n in list(m.graph)[:5]] == ["Mul", "Round", "Add", "Clip", "Sub"]
    assert array(m, f"{p}.scale") == np.float32(1) / np.float32(0.05) and array(m, f"{p}.offset") == -3
    assert (array(m, f"{p}.min"), array(m, f"{p}.max")) == (-128, 127)
    assert node(m, "fc").inputs[0].name == f"{p}.output"


def test_the_fake_dequant_multiplies_the_layer_output_by_deq_scale():
    m = _mlp()
    InsertFakeQuantPass({"fc": REC})(m)
    mul = node(m, "fc.fakedequant.mul")
    assert nodes(m)[-3:] == ["fc", "fc.fakedequant.mul", "act"]
    assert [v.name for v in mul.inputs] == ["fc.fakedequant.input", "fc.fakedequant.deq_scale"]
    assert array(m, "fc.fakedequant.deq_scale").tolist() == [np.float32(0.05) * np.float32(0.25)]
    assert node(m, "act").inputs[0] is mul.outputs[0]


def test_a_conv_s_deq_scale_broadcasts_over_the_channel_axis():
    m = graph("""g (float[1, 2, 4, 4] x) => (float[1, 3, 4, 4] y) {
        [conv] y = Conv <kernel_shape = [1, 1]> (x, w)
    }""", w=np.ones((3, 2, 1, 1), np.float32))
    InsertFakeQuantPass({"conv": LayerRecord(0.05, 0, [0.1, 0.2, 0.3])})(m)
    assert array(m, "conv.fakedequant.deq_scale").shape == (1, 3, 1, 1)


def test_ascend_quant_has_exactly_scale_offset_and_dst_type():
    m = _mlp()
    InsertAscendQuantPass({"fc": REC})(m)
    q = node(m, "fc.quant")
    assert q.op_type == "AscendQuant" and q.domain == ""
    assert {k: a.value for k, a in q.attributes.items()} == {
        "dst_type": "INT8", "offset": -3.0, "scale": float(np.float32(1) / np.float32(0.05))}
    assert q.outputs[0].name == "fc.quant.output" and node(m, "fc").inputs[0] is q.outputs[0]


def test_ascend_dequant_reads_the_accumulator_and_the_packed_deq_scale():
    m = _mlp()
    InsertAscendQuantPass({"fc": REC})(m)
    d = node(m, "fc.dequant")
    assert d.op_type == "AscendDequant" and d.attributes.get_int("dtype") == 0
    assert [v.name for v in d.inputs] == ["fc.dequant.input", "fc.dequant.param"]
    assert array(m, "fc.dequant.param").tolist() == pack_deq_scale(np.float32(0.05) * np.float32(0.25)).tolist()


def test_a_layer_output_that_is_a_graph_output_is_produced_by_the_dequant_under_its_name():
    m = graph("""g (float[2, 3] x) => (float[2, 4] y) {
        [fc] y = Gemm (x, w)
    }""", w=W)
    InsertAscendQuantPass({"fc": REC})(m)
    assert m.graph.outputs[0].name == "y" and m.graph.outputs[0].producer() is node(m, "fc.dequant")


def test_a_matmul_layer_is_dequantized_after_its_bias_add():
    m = graph("""g (float[2, 5, 3] x) => (float[2, 5, 4] y) {
        ["fc"] h = MatMul(x, w)
        ["fc.bias_add"] y = Add(h, b)
    }""", w=W, b=np.zeros(4, np.float32))
    InsertAscendQuantPass({"fc": REC})(m)
    assert nodes(m) == ["fc.quant", "fc", "fc.bias_add", "fc.dequant"]


def _qkv() -> ir.Model:
    return graph("""g (float[2, 3] x) => (float[2, 4] q, float[2, 4] k) {
        [q] q = Gemm (x, w)
        [k] k = Gemm (x, w2)
    }""", w=W, w2=W + 1)


def test_layers_reading_one_tensor_with_equal_factors_share_one_quant():
    m = _qkv()
    InsertAscendQuantPass({"q": REC, "k": REC})(m)
    assert [n.op_type for n in m.graph].count("AscendQuant") == 1
    assert node(m, "k").inputs[0] is node(m, "q.quant").outputs[0]


def test_layers_reading_one_tensor_with_other_factors_get_their_own_quant():
    m = _qkv()
    InsertAscendQuantPass({"q": REC, "k": LayerRecord(REC.scale_d, REC.offset_d + 1, REC.scale_w)})(m)
    assert [n.name for n in m.graph if n.op_type == "AscendQuant"] == ["q.quant", "k.quant"]
