"""Both exported models record the shapes and dtypes of the export's example inputs in their ONNX
metadata (``amct.input_shapes``); the metadata helpers read and write exactly that."""
from __future__ import annotations

import json

import onnx
import pytest
import torch
import torch.nn as nn

from amct_core import create_distill_config, create_distill_model, save_distill_model
from amct_core.distill import calibrate
from amct_core.onnx import metadata
from amct_core.onnx.metadata import ExampleInput
from amct_core.stages import build_deploy_file, trace_to_file
from amct_core.verify import verify
from tests import models

SEED_AXES = dict(input_names=["inputs"], output_names=["outputs"],
                 dynamic_axes={"inputs": [0, 2, 3], "outputs": [0]})


def _amct_props(path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props if p.key.startswith("amct.")}


def test_both_models_record_the_example_input_shape_and_dtype(tmp_path):
    qat = models.make_qat("unet", tmp_path)
    save_distill_model(qat, str(tmp_path / "unet"), models.example_inputs("unet"),
                       record_file=str(tmp_path / "r.txt"), **SEED_AXES)
    for kind in ("fake_quant", "deploy"):
        props = _amct_props(tmp_path / f"unet_{kind}_model.onnx")
        assert sorted(props) == ["amct.export_id", "amct.input_shapes", "amct.record_sha256"]
        assert json.loads(props["amct.input_shapes"]) == {"inputs": {"shape": [2, 3, 32, 32], "dtype": "float32"}}


def test_models_with_metadata_stay_checker_clean_and_verify(tmp_path):
    qat = models.make_qat("unet", tmp_path)
    save_distill_model(qat, str(tmp_path / "unet"), models.example_inputs("unet"),
                       record_file=str(tmp_path / "r.txt"), **SEED_AXES)
    onnx.checker.check_model(onnx.load(str(tmp_path / "unet_fake_quant_model.onnx")), full_check=True)
    report, _ = verify(deploy=tmp_path / "unet_deploy_model.onnx", fake_quant=tmp_path / "unet_fake_quant_model.onnx",
                       inputs=models.example_inputs("unet", seed=1))
    assert report["verdict"] == "pass", report["summary"]


def test_stage_outputs_keep_the_input_shapes_and_drop_the_stage_keys(tmp_path):
    qat = models.make_qat("cnn", tmp_path)
    res = trace_to_file(qat, models.example_inputs("cnn", 3), tmp_path / "t.onnx", tmp_path / "r.txt", **SEED_AXES)
    assert set(_amct_props(res.traced_path)) == {"amct.input_shapes", "amct.quant_layers", "amct.target", "amct.opset",
                                                 "amct.export_id", "amct.record_sha256"}
    out = build_deploy_file(res.traced_path, res.record_path, tmp_path / "d.onnx")
    assert metadata.read_input_shapes(onnx.load(out)) == {"inputs": ExampleInput((3, 3, 16, 16), "float32")}
    assert sorted(_amct_props(out)) == ["amct.export_id", "amct.input_shapes", "amct.record_sha256"]


class _ThreeInputs(nn.Module):
    """forward() ignores its middle argument, which the tracer then drops from the graph."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(6, 3)

    def forward(self, x, unused, y):
        return self.a(x) + self.b(y)


def _qat_three_inputs(tmp_path, inputs):
    torch.manual_seed(0)
    m = _ThreeInputs().eval()
    create_distill_config(str(tmp_path / "c.json"), m, inputs)
    q = create_distill_model(str(tmp_path / "c.json"), m, inputs)
    calibrate(q, [inputs])
    return q.eval()


def test_inputs_pair_by_name_when_the_tracer_drops_an_unused_input(tmp_path):
    inputs = (torch.randn(2, 4), torch.randn(5), torch.randn(2, 6))
    qat = _qat_three_inputs(tmp_path, inputs)
    save_distill_model(qat, str(tmp_path / "m"), inputs, record_file=str(tmp_path / "r.txt"),
                       input_names=["x", "unused", "y"], dynamic_axes={"x": [0], "y": [0]})
    m = onnx.load(str(tmp_path / "m_deploy_model.onnx"))
    assert [i.name for i in m.graph.input] == ["x", "y"]
    assert metadata.read_input_shapes(m) == {"x": ExampleInput((2, 4), "float32"), "y": ExampleInput((2, 6), "float32")}


def test_inputs_pair_by_position_when_unnamed():
    g = onnx.helper.make_graph([], "g", [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.INT64, s)
                                         for n, s in (("a", ["n", 4]), ("b", [3]))], [])
    proto = onnx.helper.make_model(g)
    metadata.record_input_shapes(proto, [ExampleInput((2, 4), "int64"), ExampleInput((3,), "int64")])
    assert metadata.read_input_shapes(proto) == {"a": ExampleInput((2, 4), "int64"), "b": ExampleInput((3,), "int64")}


def test_an_example_the_graph_does_not_accept_is_not_recorded():
    g = onnx.helper.make_graph([], "g", [onnx.helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, ["n", 4])], [])
    proto = onnx.helper.make_model(g)
    assert metadata.record_input_shapes(proto, [ExampleInput((2, 5), "float32")]) == {}
    assert metadata.read_prop(proto, metadata.INPUT_SHAPES) is None


def test_a_file_without_the_key_has_no_recorded_inputs():
    assert metadata.read_input_shapes(onnx.ModelProto()) == {}


@pytest.mark.parametrize("value", ["not json", "[1, 2]", '{"x": [1, 3]}', '{"x": {"shape": [1, -3], "dtype": "float32"}}'])
def test_a_malformed_value_is_refused_naming_the_key(value):
    proto = onnx.ModelProto()
    metadata.write_prop(proto, metadata.INPUT_SHAPES, value)
    with pytest.raises(ValueError, match=r"'amct.input_shapes'.*expected a JSON object input name -> "):
        metadata.read_input_shapes(proto)


def test_writing_a_key_again_replaces_its_value():
    proto = onnx.ModelProto()
    metadata.write_prop(proto, "amct.target", "A2")
    metadata.write_prop(proto, "amct.target", "950")
    assert [(p.key, p.value) for p in proto.metadata_props] == [("amct.target", "950")]


def test_dropping_stage_keys_keeps_output_keys_and_foreign_keys():
    proto = onnx.ModelProto()
    for k in ("amct.quant_layers", "amct.input_shapes", "amct.opset", "author"):
        metadata.write_prop(proto, k, "v")
    metadata.drop_stage_props(proto)
    assert [p.key for p in proto.metadata_props] == ["amct.input_shapes", "author"]
