"""The file-to-file stages give the same files as save_distill_model, and check a given record."""
import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from amct_core import ExportError, RecordError, save_distill_model
from amct_core.export_id import split_record
from amct_core.record import read_record, write_record
from amct_core.stages import build_deploy_file, build_fake_quant_file, trace_to_file, validate_record_file
from tests import models


def _same_models(a, b):
    """The same graph and bit-identical initializers (a -0.0 for a +0.0 would differ)."""
    ma, mb = onnx.load(a), onnx.load(b)
    assert ma.graph.node == mb.graph.node and ma.graph.value_info == mb.graph.value_info
    assert ma.graph.input == mb.graph.input and ma.graph.output == mb.graph.output
    ia = {t.name: onnx.numpy_helper.to_array(t) for t in ma.graph.initializer}
    ib = {t.name: onnx.numpy_helper.to_array(t) for t in mb.graph.initializer}
    assert ia.keys() == ib.keys()
    assert all(ia[k].dtype == ib[k].dtype and ia[k].tobytes() == ib[k].tobytes() for k in ia)
    # the same metadata but for the export id, which is new for every export
    props_a = {p.key: p.value for p in ma.metadata_props if p.key != "amct.export_id"}
    assert props_a == {p.key: p.value for p in mb.metadata_props if p.key != "amct.export_id"}
    assert sorted(p.key for p in ma.metadata_props if p.key.startswith("amct.")) == [
        "amct.export_id", "amct.input_shapes", "amct.record_sha256"]


@pytest.mark.parametrize("name", ["cnn", "encoder"])
def test_stages_reproduce_save_distill_model(tmp_path, name):
    qat = models.make_qat(name, tmp_path)
    x = models.example_inputs(name)
    kw = dict(input_names=["input"], output_names=["output"], dynamic_axes={"input": [0], "output": [0]})
    save_distill_model(qat, str(tmp_path / "one" / "m"), x, record_file=str(tmp_path / "one" / "r.txt"), **kw)
    res = trace_to_file(qat, x, tmp_path / "st" / "traced.onnx", tmp_path / "st" / "r.txt", **kw)
    assert res.layers == [n for n, _ in read_record(tmp_path / "st" / "r.txt").items()]
    # the same record but for the export id in its header
    assert split_record((tmp_path / "st" / "r.txt").read_bytes())[1] == split_record((tmp_path / "one" / "r.txt").read_bytes())[1]
    build_fake_quant_file(res.traced_path, res.record_path, tmp_path / "st" / "fq.onnx")
    build_deploy_file(res.traced_path, res.record_path, tmp_path / "st" / "dp.onnx")
    _same_models(tmp_path / "st" / "fq.onnx", tmp_path / "one" / "m_fake_quant_model.onnx")
    _same_models(tmp_path / "st" / "dp.onnx", tmp_path / "one" / "m_deploy_model.onnx")


def test_traced_model_is_a_runnable_float_model(tmp_path):
    import onnxruntime as ort

    qat = models.make_qat("mlp", tmp_path)
    res = trace_to_file(qat, models.example_inputs("mlp"), tmp_path / "t.onnx", tmp_path / "r.txt", input_names=["x"])
    m = onnx.load(res.traced_path)
    assert {n.name for n in m.graph.node} >= {"fc1", "fc2", "fc3"}
    out = ort.InferenceSession(res.traced_path, providers=["CPUExecutionProvider"]).run(None, {"x": models.example_inputs("mlp").numpy()})
    assert out[0].shape == (2, 7)


def test_a_given_record_is_validated_against_the_traced_model(tmp_path):
    qat = models.make_qat("mlp", tmp_path)
    res = trace_to_file(qat, models.example_inputs("mlp"), tmp_path / "t.onnx", tmp_path / "r.txt")
    records = read_record(res.record_path)
    records["fc9"] = records.pop("fc2")
    write_record(tmp_path / "bad.txt", records)
    with pytest.raises(RecordError, match=r"no record: \['fc2'\].*\['fc9'\]"):
        validate_record_file(tmp_path / "bad.txt", res.traced_path)
    with pytest.raises(RecordError):
        build_deploy_file(res.traced_path, tmp_path / "bad.txt", tmp_path / "d.onnx")
    assert not (tmp_path / "d.onnx").exists()


def test_a_given_record_sets_the_exported_factors(tmp_path):
    qat = models.make_qat("mlp", tmp_path)
    res = trace_to_file(qat, models.example_inputs("mlp"), tmp_path / "t.onnx", tmp_path / "r.txt")
    records = read_record(res.record_path)
    records["fc1"].scale_d = float(np.float32(records["fc1"].scale_d * 2))
    write_record(tmp_path / "r2.txt", records)
    build_deploy_file(res.traced_path, tmp_path / "r2.txt", tmp_path / "d.onnx")
    q = next(n for n in onnx.load(tmp_path / "d.onnx").graph.node if n.name == "fc1.quant")
    scale = next(a.f for a in q.attribute if a.name == "scale")
    assert np.float32(scale) == np.float32(1) / np.float32(records["fc1"].scale_d)


@pytest.mark.parametrize("kind", ["fake_quant", "deploy"])
def test_a_built_model_that_breaks_a_post_condition_is_not_written(tmp_path, monkeypatch, kind):
    import amct_core.stages as stages_mod

    qat = models.make_qat("mlp", tmp_path)
    res = trace_to_file(qat, models.example_inputs("mlp"), tmp_path / "t.onnx", tmp_path / "r.txt")
    builder = f"build_{kind}"
    real = getattr(stages_mod, builder)

    def dangling(*a, **k):
        m = real(*a, **k)
        m.graph[-1].replace_input_with(0, ir.val("nowhere"))
        return m

    monkeypatch.setattr(stages_mod, builder, dangling)
    build = build_fake_quant_file if kind == "fake_quant" else build_deploy_file
    with pytest.raises(ExportError, match="reads 'nowhere', which no node"):
        build(res.traced_path, res.record_path, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_publishing_the_models_record_writes_it_unchanged(tmp_path):
    from amct_core.stages import publish_record_file

    qat = models.make_qat("mlp", tmp_path)
    res = trace_to_file(qat, models.example_inputs("mlp"), tmp_path / "t.onnx", tmp_path / "r.txt")
    records = publish_record_file(res.record_path, res.traced_path, tmp_path / "out" / "m_record.txt")
    assert list(records) == res.layers
    assert (tmp_path / "out" / "m_record.txt").read_bytes() == (tmp_path / "r.txt").read_bytes()


def test_a_record_that_does_not_fit_the_traced_model_is_not_published(tmp_path):
    from amct_core.stages import publish_record_file

    qat = models.make_qat("mlp", tmp_path)
    res = trace_to_file(qat, models.example_inputs("mlp"), tmp_path / "t.onnx", tmp_path / "r.txt")
    records = read_record(res.record_path)
    records.pop("fc2")
    write_record(tmp_path / "partial.txt", records)
    with pytest.raises(RecordError, match="fc2"):
        publish_record_file(tmp_path / "partial.txt", res.traced_path, tmp_path / "out" / "m_record.txt")
    assert not (tmp_path / "out").exists()


def test_tracing_a_model_with_a_nan_weight_names_the_layer_and_writes_nothing(tmp_path):
    qat = models.make_qat("mlp", tmp_path)
    with torch.no_grad():
        qat.fc2.weight[1, 2] = float("nan")
    with pytest.raises(ExportError, match=r"layer 'fc2': weight: 1 non-finite value, the first nan at \[1, 2\]"):
        trace_to_file(qat, models.example_inputs("mlp"), tmp_path / "st" / "traced.onnx", tmp_path / "st" / "r.txt")
    assert not (tmp_path / "st").exists() or not list((tmp_path / "st").iterdir())


@pytest.mark.parametrize("traced, record, match", [
    ("t\x00.onnx", "r.txt", r"^traced_path '.*t\\x00.onnx' holds a NUL byte"),
    ("t.onnx", "r" * 240 + ".txt", r"^record_path: the output file name 'rrr.*' has 244 bytes"),
])
def test_trace_to_file_refuses_an_odd_path_naming_it_before_tracing(tmp_path, traced, record, match):
    qat = models.make_qat("mlp", tmp_path)
    with pytest.raises(ExportError, match=match):
        trace_to_file(qat, models.example_inputs("mlp"), tmp_path / "st" / traced, tmp_path / "st" / record)
    assert not (tmp_path / "st").exists()


def test_a_build_refuses_an_out_path_with_a_nul_byte_naming_it(tmp_path):
    qat = models.make_qat("mlp", tmp_path)
    res = trace_to_file(qat, models.example_inputs("mlp"), tmp_path / "t.onnx", tmp_path / "r.txt")
    with pytest.raises(ExportError, match=r"^out_path '.*fq\\x00.onnx' holds a NUL byte"):
        build_fake_quant_file(res.traced_path, res.record_path, tmp_path / "fq\x00.onnx")
