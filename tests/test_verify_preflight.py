"""ATC preflight of deploy models: ours pass; each deliberately broken file is reported with the node
and what is expected."""
from __future__ import annotations

import pytest

from amct_core.errors import TargetError
from amct_core.verify import preflight
from amct_core.verify.preflight import REJECTED_OPS
from tests import broken_models as bm

EXPORTED = ["cnn", "mlp", "encoder", "two"]


def _codes(r):
    return {f.code for f in r.errors}


def _finding(r, code):
    found = [f for f in r.findings if f.code == code]
    assert found, f"no finding {code!r}; got {[str(f) for f in r.findings]}"
    return found[0]


@pytest.mark.parametrize("name", EXPORTED)
def test_our_deploy_files_pass_without_findings(name):
    e = bm.export(name)
    r = preflight(e.deploy)
    assert r.ok, r.summary()
    assert r.findings == []
    assert r.opset == 11 and r.target == "A2"


def test_preflight_finds_every_quantized_layer():
    r = preflight(bm.export("cnn").deploy)
    assert sorted(r.layers) == sorted(["conv1", "conv2", "dw", "pw", "dilated", "fc"])


def test_hand_built_amct_style_file_passes():
    _, dep, _ = bm.hand_built_pair(style="amct")
    r = preflight(dep)
    assert r.ok, r.summary()
    # its deq_scale names differ from ours and the Gemm is transB=1: reported as warnings only
    assert {f.code for f in r.warnings} == {"deq_scale.name", "layer.gemm_transB"}


@pytest.mark.parametrize("style", ["ours", "amct"])
def test_ascend_quant_with_the_optional_attributes_written_out_passes(style):
    _, dep, _ = bm.hand_built_pair(style=style, explicit_quant_defaults=True)
    assert all({a.name for a in n.attribute} >= {"sqrt_mode", "round_mode"}
               for n in dep.graph.node if n.op_type == "AscendQuant")
    r = preflight(dep)
    assert r.ok, r.summary()
    assert not [f for f in r.findings if f.code.startswith("ascend_quant")]


def test_two_opset_imports_are_reported():
    r = preflight(bm.two_opset_imports(bm.load(bm.export("mlp").deploy)))
    assert not r.ok
    f = _finding(r, "opset.count")
    assert "2 opset_import entries" in f.message and "exactly one" in f.expected
    assert "amct_trace" in _finding(r, "opset.domain").node


def test_ascend_ops_in_a_custom_domain_are_reported_per_node():
    r = preflight(bm.ascend_ops_in_custom_domain(bm.load(bm.export("cnn").deploy)))
    assert not r.ok
    nodes = {f.node for f in r.errors if f.code == "ascend.domain"}
    assert "conv2.quant" in nodes and "conv2.dequant" in nodes and "fc.dequant" in nodes
    assert "default ONNX domain" in _finding(r, "ascend.domain").expected


def test_float_weights_are_reported():
    r = preflight(bm.float_weights(bm.load(bm.export("cnn").deploy), "dw"))
    f = _finding(r, "layer.weight_dtype")
    assert f.node == "dw" and "FLOAT" in f.message and "INT8" in f.expected
    assert _codes(r) == {"layer.weight_dtype"}


def test_float_bias_is_reported():
    r = preflight(bm.float_bias(bm.load(bm.export("encoder").deploy), "proj"))
    f = _finding(r, "layer.bias_dtype")
    assert f.node == "proj" and "INT32" in f.expected


def test_non_zero_high_bits_of_deq_scale_are_reported():
    r = preflight(bm.nonzero_high_bits(bm.load(bm.export("cnn").deploy), "conv2", index=3))
    f = _finding(r, "deq_scale.high_bits")
    assert f.node == "conv2.dequant.param" and "channel 3" in f.message and "high 32 bits all 0" in f.expected
    assert _codes(r) == {"deq_scale.high_bits"}


def test_deq_scale_of_another_type_is_reported():
    r = preflight(bm.float_deq_scale(bm.load(bm.export("mlp").deploy), "fc1"))
    assert _finding(r, "deq_scale.dtype").node == "fc1.dequant.param"


def test_missing_dequant_is_reported():
    r = preflight(bm.missing_dequant(bm.load(bm.export("mlp").deploy), "fc2"))
    f = _finding(r, "layer.missing_dequant")
    assert f.node == "fc2" and "AscendDequant" in f.expected


def test_missing_dequant_on_a_graph_output_is_reported():
    r = preflight(bm.missing_dequant(bm.load(bm.export("two").deploy), "conv"))
    assert _finding(r, "layer.missing_dequant").node == "conv"


def test_missing_quant_is_reported():
    r = preflight(bm.missing_quant(bm.load(bm.export("cnn").deploy), "pw"))
    f = _finding(r, "layer.missing_quant")
    assert f.node == "pw" and "AscendQuant" in f.expected


@pytest.mark.parametrize("op", ["DynamicQuantizeLinear", "ConvInteger", "QLinearConv", "MatMulInteger"])
def test_ops_atc_rejects_are_reported(op):
    r = preflight(bm.with_rejected_op(bm.load(bm.export("mlp").deploy), op))
    f = _finding(r, "op.rejected")
    assert f.node == f"rejected.{op}" and op in f.message
    assert op in REJECTED_OPS


def test_bad_ascend_quant_attributes_are_reported():
    r = preflight(bm.bad_quant_attributes(bm.load(bm.export("mlp").deploy), "fc1.quant"))
    assert _finding(r, "ascend_quant.attr_type").node == "fc1.quant"
    assert "'scale'" in _finding(r, "ascend_quant.attr_type").message
    assert "'dst_type'" in _finding(r, "ascend_quant.attr_missing").message


@pytest.mark.parametrize("target,opset,ok", [("A2", 16, True), ("A2", 17, False), ("950", 22, True), ("A3", 7, False)])
def test_opset_is_checked_against_the_target_range(target, opset, ok):
    r = preflight(bm.opset_version(bm.load(bm.export("mlp").deploy), opset), target=target)
    assert r.ok is ok
    if not ok:
        assert "opset.range" in _codes(r)


def test_unknown_target_is_refused():
    with pytest.raises(TargetError, match="unknown"):
        preflight(bm.export("mlp").deploy, target="Ascend310")


def test_each_broken_file_fails_and_the_summary_names_the_problem():
    dep = bm.load(bm.export("cnn").deploy)
    broken = {
        "opset.count": bm.two_opset_imports(dep),
        "ascend.domain": bm.ascend_ops_in_custom_domain(dep),
        "layer.weight_dtype": bm.float_weights(dep, "conv1"),
        "deq_scale.high_bits": bm.nonzero_high_bits(dep, "fc"),
        "layer.missing_dequant": bm.missing_dequant(dep, "dilated"),
    }
    for code, m in broken.items():
        r = preflight(m)
        assert not r.ok and code in _codes(r), (code, r.summary())
        assert "preflight failed" in r.summary()
