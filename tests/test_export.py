"""save_distill_model: files, names, formats (FORMATS §1, §4, §5), parity in ONNX Runtime, bad input.

The deploy checks recompute every expected value here, from the torch parameters and the record
file text, with numpy: nothing is read back through the exporter's own helpers.
"""
from __future__ import annotations

import os
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from amct_core import ExportError, RecordError, TargetError, save_distill_model
from amct_core.quant.modules import QuantConv2d, QuantLinear
from tests import models

torch.set_num_threads(1)
NAMES = ["cnn", "mlp", "encoder"]


def parse_record_text(text: str) -> dict:
    """Independent reader of the record's text format (regexes, not the exporter's schema)."""
    out = {}
    for m in re.finditer(r'record \{\s*key: "([^"]+)"\s*value \{(.*?)\}\s*\}', text, re.S):
        body = m.group(2)
        out[m.group(1)] = {
            "scale_d": float(re.search(r"scale_d: (\S+)", body).group(1)),
            "offset_d": int(re.search(r"offset_d: (\S+)", body).group(1)),
            "scale_w": [float(v) for v in re.findall(r"scale_w: (\S+)", body)],
            "offset_w": [int(v) for v in re.findall(r"offset_w: (\S+)", body)],
        }
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each test model, quantized, calibrated and exported once."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    for name in NAMES:
        qat = models.make_qat(name, root)
        before = {k: v.clone() for k, v in qat.state_dict().items()}
        save_distill_model(
            qat, str(root / name / "model"), models.example_inputs(name, 2), record_file=str(root / name / "rec.txt"),
            input_names=["input"], output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": [0]},
        )
        out[name] = dict(
            qat=qat, before=before, fq=root / name / "model_fake_quant_model.onnx",
            deploy=root / name / "model_deploy_model.onnx", record=root / name / "rec.txt",
        )
    return out


def quant_layers(qat):
    return {n: m for n, m in qat.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))}


def following_bn(qat, name):
    """The BatchNorm2d that directly follows conv ``name`` in these test models (by naming convention)."""
    pairs = {"conv1": "bn1", "conv2": "bn2"}
    return qat.get_submodule(pairs[name]) if name in pairs else None


@pytest.mark.parametrize("name", NAMES)
def test_files_are_written_with_the_prefix_names(exported, name):
    e = exported[name]
    assert e["fq"].is_file() and e["deploy"].is_file() and e["record"].is_file()
    assert not [p for p in e["fq"].parent.iterdir() if p.name.endswith(".tmp")]


def test_written_files_get_the_usual_permissions(exported):
    umask = os.umask(0)
    os.umask(umask)
    for key in ("fq", "deploy", "record"):
        assert exported["mlp"][key].stat().st_mode & 0o777 == 0o666 & ~umask


def test_trailing_slash_save_path_gives_unprefixed_names(tmp_path):
    qat = models.make_qat("mlp", tmp_path)
    save_distill_model(qat, str(tmp_path / "outdir") + "/", models.example_inputs("mlp"), record_file=str(tmp_path / "r.txt"))
    assert (tmp_path / "outdir" / "fake_quant_model.onnx").is_file()
    assert (tmp_path / "outdir" / "deploy_model.onnx").is_file()


def test_default_record_file_is_amct_log_in_cwd(tmp_path, monkeypatch):
    qat = models.make_qat("mlp", tmp_path)
    monkeypatch.chdir(tmp_path)
    save_distill_model(qat, "m/x", models.example_inputs("mlp"))
    assert (tmp_path / "amct_log" / "scale_offset_record.txt").is_file()


@pytest.mark.parametrize("name", NAMES)
def test_fake_quant_model_passes_the_checker_with_one_opset(exported, name):
    m = onnx.load(exported[name]["fq"])
    onnx.checker.check_model(m, full_check=True)
    assert [(o.domain, o.version) for o in m.opset_import] == [("", 11)]
    assert [i.name for i in m.graph.input] == ["input"] and [o.name for o in m.graph.output] == ["output"]


@pytest.mark.parametrize("name", NAMES)
def test_record_holds_the_factors_of_the_torch_parameters(exported, name):
    qat = exported[name]["qat"]
    records = parse_record_text(exported[name]["record"].read_text())
    layers = quant_layers(qat)
    assert list(records) == list(layers)
    for lname, m in layers.items():
        r = records[lname]
        lo = min(m.clip_min.item(), 0.0)
        hi = max(m.clip_max.item(), 0.0)
        scale_d = np.float32(hi - lo) / np.float32(255)
        assert r["scale_d"] == pytest.approx(float(scale_d), rel=1e-6)
        assert r["offset_d"] == int(np.clip(np.round(np.float32(-128) - np.float32(lo) / np.float32(r["scale_d"])), -128, 127))
        w = m.weight.detach().numpy()
        amax = np.abs(w).reshape(w.shape[0], -1).max(1) if isinstance(m, QuantConv2d) else np.abs(w).max().reshape(1)
        scale_w = amax / 127
        bn = following_bn(qat, lname)
        if bn is not None:
            k = bn.weight.detach().numpy() / np.sqrt(bn.running_var.numpy() + bn.eps)
            scale_w = scale_w * np.abs(k)
        assert r["scale_w"] == pytest.approx(scale_w.tolist(), rel=1e-5)
        assert r["offset_w"] == [0] * len(r["scale_w"])


def _inits(m):
    return {t.name: t for t in m.graph.initializer}


@pytest.mark.parametrize("name", NAMES)
def test_deploy_model_matches_the_format_field_by_field(exported, name):
    e = exported[name]
    qat = e["qat"]
    m = onnx.load(e["deploy"])
    records = parse_record_text(e["record"].read_text())
    assert [(o.domain, o.version) for o in m.opset_import] == [("", 11)]
    nodes = {n.name: n for n in m.graph.node}
    inits = _inits(m)
    for lname, mod in quant_layers(qat).items():
        r = records[lname]
        scale_d, offset_d = np.float32(r["scale_d"]), r["offset_d"]
        scale_w = np.asarray(r["scale_w"], np.float32)
        node = nodes[lname]
        assert node.domain == ""
        # AscendQuant feeding the layer (possibly shared): default domain and exactly the §5 attributes.
        quant = next(n for n in m.graph.node if node.input[0] in n.output)
        assert quant.op_type == "AscendQuant" and quant.domain == ""
        attrs = {a.name: a for a in quant.attribute}
        assert sorted(attrs) == ["dst_type", "offset", "scale"]  # AMCT's form, nothing else
        assert attrs["scale"].type == onnx.AttributeProto.FLOAT and attrs["offset"].type == onnx.AttributeProto.FLOAT
        assert attrs["dst_type"].type == onnx.AttributeProto.STRING and attrs["dst_type"].s == b"INT8"
        assert np.float32(attrs["scale"].f) == np.float32(1) / scale_d
        assert attrs["offset"].f == offset_d
        # Weights: int8, quantized from the torch weight (BN folded where one follows).
        w = mod.weight.detach().numpy().astype(np.float64)
        bias = None if mod.bias is None else mod.bias.detach().numpy().astype(np.float64)
        bn = following_bn(qat, lname)
        if bn is not None:
            k = (bn.weight.detach().numpy() / np.sqrt(bn.running_var.numpy() + bn.eps)).astype(np.float64)
            w = w * k.reshape(-1, 1, 1, 1)
            b0 = bias if bias is not None else 0.0
            bias = (b0 - bn.running_mean.numpy()) * k + bn.bias.detach().numpy()
        wt = inits[node.input[1]]
        assert wt.name == f"{lname}.weight" and wt.data_type == TensorProto.INT8
        q_w = numpy_helper.to_array(wt)
        if isinstance(mod, QuantConv2d):
            expect = np.clip(np.round(w / scale_w.reshape(-1, 1, 1, 1)), -128, 127)
            assert node.op_type == "Conv"
            a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
            assert a["strides"] == list(mod.stride) and a["dilations"] == list(mod.dilation) and a["group"] == mod.groups
            assert a["pads"] == list(mod.padding) * 2
        else:
            expect = np.clip(np.round(w.T / scale_w), -128, 127)  # stored [in, out]
            assert node.op_type in ("Gemm", "MatMul")
            if node.op_type == "Gemm":
                assert helper.get_attribute_value(next(x for x in node.attribute if x.name == "transB")) == 0
        assert q_w.shape == expect.shape
        assert np.array_equal(q_w, expect.astype(np.int8))
        # Dequant: named, uint64 param whose low bits are float32(scale_d * scale_w), high bits zero.
        deq_node = nodes[f"{lname}.dequant"]
        assert deq_node.op_type == "AscendDequant" and deq_node.domain == ""
        assert deq_node.input[1] == f"{lname}.dequant.param"
        assert [(a.name, a.type, a.i) for a in deq_node.attribute] == [("dtype", onnx.AttributeProto.INT, 0)]
        param = inits[f"{lname}.dequant.param"]
        assert param.data_type == TensorProto.UINT64
        packed = numpy_helper.to_array(param).astype(np.uint64)
        deq = (scale_d * scale_w).astype(np.float32)
        assert packed.size == scale_w.size
        assert np.all(packed >> np.uint64(32) == 0)
        assert np.array_equal((packed & np.uint64(0xFFFFFFFF)).astype(np.uint32), deq.view(np.uint32))
        # Bias: int32 = round(bias / (scale_w * scale_d)).
        if bias is not None:
            b_name = f"{lname}.bias"
            bt = inits[b_name]
            assert bt.data_type == TensorProto.INT32
            got = numpy_helper.to_array(bt).astype(np.int64)
            want = np.round(bias / np.broadcast_to(deq.astype(np.float64), bias.shape)).astype(np.int64)
            assert np.abs(got - want).max() <= 1  # float32 vs float64 folding of BN may move one tie
            assert np.mean(got == want) > 0.95
        # The dequant follows the bias Add for MatMul.
        if node.op_type == "MatMul" and bias is not None:
            add = nodes[f"{lname}.bias_add"]
            assert add.op_type == "Add" and add.output[0] == deq_node.input[0]


@pytest.mark.parametrize("name", NAMES)
def test_fake_quant_runs_in_ort_and_matches_torch(exported, name):
    e = exported[name]
    qat = e["qat"]
    x = models.example_inputs(name, 64, seed=99)
    sess = ort.InferenceSession(str(e["fq"]), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        want = qat(x).numpy()
    cos = float((got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want))
    assert cos >= 0.9999
    assert np.array_equal(got.reshape(-1, got.shape[-1]).argmax(-1), want.reshape(-1, want.shape[-1]).argmax(-1))


@pytest.mark.parametrize("batch", [1, 17])
def test_dynamic_batch_runs_at_other_sizes(exported, batch):
    sess = ort.InferenceSession(str(exported["cnn"]["fq"]), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"input": models.example_inputs("cnn", batch).numpy()})[0]
    assert out.shape == (batch, 10)


def test_user_model_is_unchanged(exported):
    e = exported["cnn"]
    after = e["qat"].state_dict()
    assert all(torch.equal(e["before"][k], after[k]) for k in after)
    assert not e["qat"].training
    assert all(m._export_name is None for m in quant_layers(e["qat"]).values())


def test_training_flags_are_restored(tmp_path):
    qat = models.make_qat("mlp", tmp_path).train()
    save_distill_model(qat, str(tmp_path / "m"), models.example_inputs("mlp"), record_file=str(tmp_path / "r.txt"))
    assert all(m.training for m in qat.modules())


def test_qkv_projections_share_one_ascend_quant(exported):
    m = onnx.load(exported["encoder"]["deploy"])
    quants = [n for n in m.graph.node if n.op_type == "AscendQuant"]
    consumers = {q.output[0]: [n.name for n in m.graph.node if q.output[0] in n.input] for q in quants}
    shared = [c for c in consumers.values() if set(c) == {"q", "k", "v"}]
    assert shared, consumers
    assert len(quants) == len(quant_layers(exported["encoder"]["qat"])) - 2


def test_layer_output_that_is_a_graph_output_keeps_its_name(tmp_path):
    qat = models.make_qat("two", tmp_path)
    x = models.example_inputs("two", 2)
    save_distill_model(qat, str(tmp_path / "t"), x, record_file=str(tmp_path / "r.txt"),
                       input_names=["img"], output_names=["features", "logits"])
    for f in ("t_fake_quant_model.onnx", "t_deploy_model.onnx"):
        m = onnx.load(tmp_path / f)
        assert [o.name for o in m.graph.output] == ["features", "logits"]
        assert [i.name for i in m.graph.input] == ["img"]
    dq = next(n for n in onnx.load(tmp_path / "t_deploy_model.onnx").graph.node if n.name == "conv.dequant")
    assert dq.output[0] == "features"
    sess = ort.InferenceSession(str(tmp_path / "t_fake_quant_model.onnx"), providers=["CPUExecutionProvider"])
    feats, logits = sess.run(None, {"img": x.numpy()})
    with torch.no_grad():
        tf, tl = qat(x)
    assert np.allclose(feats, tf.numpy(), atol=1e-4) and np.allclose(logits, tl.numpy(), atol=1e-4)


def test_factors_follow_the_parameters_without_a_forward(tmp_path):
    qat = models.make_qat("mlp", tmp_path)
    with torch.no_grad():
        qat.fc1.clip_min.fill_(-2.0)
        qat.fc1.clip_max.fill_(6.0)
    save_distill_model(qat, str(tmp_path / "m"), models.example_inputs("mlp"), record_file=str(tmp_path / "r.txt"))
    r = parse_record_text((tmp_path / "r.txt").read_text())["fc1"]
    assert r["scale_d"] == pytest.approx(8.0 / 255, rel=1e-6)


def test_list_form_dynamic_axes_and_single_tensor_input(tmp_path):
    qat = models.make_qat("encoder", tmp_path)
    x = models.example_inputs("encoder", 2)
    save_distill_model(qat, str(tmp_path / "e"), x, record_file=str(tmp_path / "r.txt"), input_names=["tokens"],
                       output_names=["hidden"], dynamic_axes={"tokens": [0, 1], "hidden": [0, 1]})
    sess = ort.InferenceSession(str(tmp_path / "e_fake_quant_model.onnx"), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"tokens": models.example_inputs("encoder", 3).numpy()[:, :5]})[0].shape == (3, 5, 32)


# ---------------------------------------------------------------- targets and opsets

def test_other_opset_within_range(tmp_path):
    qat = models.make_qat("mlp", tmp_path)
    save_distill_model(qat, str(tmp_path / "m"), models.example_inputs("mlp"), record_file=str(tmp_path / "r.txt"),
                       opset_version=13)
    for f in ("m_fake_quant_model.onnx", "m_deploy_model.onnx"):
        assert [(o.domain, o.version) for o in onnx.load(tmp_path / f).opset_import] == [("", 13)]


def test_target_950_accepts_opset_18(tmp_path):
    qat = models.make_qat("mlp", tmp_path)
    save_distill_model(qat, str(tmp_path / "m"), models.example_inputs("mlp"), record_file=str(tmp_path / "r.txt"),
                       target="950", opset_version=18)
    onnx.checker.check_model(onnx.load(tmp_path / "m_fake_quant_model.onnx"), full_check=True)


@pytest.mark.parametrize("target,opset,match", [("A2", 17, r"outside target A2's range \[8, 16\]"),
                                                ("A3", 7, "outside target A3's range"),
                                                ("B7", 11, "target 'B7' is unknown")])
def test_bad_target_or_opset_is_refused_before_any_work(tmp_path, target, opset, match):
    qat = models.make_qat("mlp", tmp_path)
    with pytest.raises(TargetError, match=match):
        save_distill_model(qat, str(tmp_path / "m"), models.example_inputs("mlp"), record_file=str(tmp_path / "r.txt"),
                           target=target, opset_version=opset)
    assert not (tmp_path / "m_deploy_model.onnx").exists()


# ---------------------------------------------------------------- bad input: clear error, nothing written

@pytest.fixture
def outputs_with_old_content(tmp_path):
    """The three output paths, pre-filled with an earlier export's content that must survive."""
    paths = [tmp_path / "o" / "m_fake_quant_model.onnx", tmp_path / "o" / "m_deploy_model.onnx", tmp_path / "r.txt"]
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"earlier output " + p.name.encode())
    return tmp_path, paths


def _assert_untouched(tmp_path, paths):
    for p in paths:
        assert p.read_bytes() == b"earlier output " + p.name.encode()
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith((".tmp", ".data"))]


def _save(qat, tmp_path, x, **kw):
    kw.setdefault("record_file", str(tmp_path / "r.txt"))
    save_distill_model(qat, str(tmp_path / "o" / "m"), x, **kw)


def test_model_without_quantized_layers(outputs_with_old_content):
    tmp_path, paths = outputs_with_old_content
    with pytest.raises(ExportError, match="no layers to save"):
        _save(models.build("mlp"), tmp_path, models.example_inputs("mlp"))
    _assert_untouched(tmp_path, paths)


def test_record_that_fails_validation(outputs_with_old_content):
    tmp_path, paths = outputs_with_old_content
    qat = models.make_qat("mlp", tmp_path)
    with torch.no_grad():
        qat.fc2.weight[0, 0] = 1e18  # scale_w = 7.9e15 > 1/DBL_EPSILON
    with pytest.raises(RecordError, match=r"layer 'fc2': field 'scale_w'"):
        _save(qat, tmp_path, models.example_inputs("mlp"))
    _assert_untouched(tmp_path, paths)


def _set(module, tensor: str, index, value) -> None:
    with torch.no_grad():
        getattr(module, tensor)[index] = value


def _refused_with_one_bad_value(outputs_with_old_content, name, layer, tensor, index, value, match) -> None:
    """Export test model ``name`` with one value of ``layer.tensor`` set to ``value``: an ExportError matching
    ``match``, and the earlier outputs untouched."""
    tmp_path, paths = outputs_with_old_content
    qat = models.make_qat(name, tmp_path)
    _set(qat.get_submodule(layer), tensor, index, value)
    with pytest.raises(ExportError, match=match):
        _save(qat, tmp_path, models.example_inputs(name))
    _assert_untouched(tmp_path, paths)


@pytest.mark.parametrize("layer, tensor, index, value, match", [
    ("fc1", "weight", (3, 0), float("nan"), r"layer 'fc1': weight: 1 non-finite value, the first nan at \[3, 0\]"),
    ("fc2", "weight", (0, 5), float("-inf"), r"layer 'fc2': weight: 1 non-finite value, the first -inf at \[0, 5\]"),
    ("fc1", "bias", (2,), float("inf"), r"layer 'fc1': bias: 1 non-finite value, the first inf at \[2\]"),
    ("fc3", "clip_max", (), float("nan"), r"layer 'fc3': clip_max = nan \(activation range\)"),
    ("fc1", "clip_min", (), float("-inf"), r"layer 'fc1': clip_min = -inf \(activation range\)"),
], ids=["nan-weight", "inf-weight", "inf-bias", "nan-clip_max", "inf-clip_min"])
def test_a_non_finite_weight_bias_or_activation_range_names_the_layer_and_nothing_is_written(
        outputs_with_old_content, layer, tensor, index, value, match):
    _refused_with_one_bad_value(outputs_with_old_content, "mlp", layer, tensor, index, value, match)


def test_every_non_finite_tensor_is_listed_in_one_error(outputs_with_old_content):
    tmp_path, paths = outputs_with_old_content
    qat = models.make_qat("mlp", tmp_path)
    _set(qat.fc1, "weight", (0, 0), float("nan"))
    _set(qat.fc3, "clip_max", (), float("inf"))
    with pytest.raises(ExportError) as e:
        _save(qat, tmp_path, models.example_inputs("mlp"))
    assert "layer 'fc1': weight" in str(e.value) and "layer 'fc3': clip_max = inf" in str(e.value)
    _assert_untouched(tmp_path, paths)


@pytest.mark.parametrize("tensor, index, value, match", [
    ("running_var", (4,), float("nan"), r"layer 'bn1' \(BatchNorm2d\): running_var: 1 non-finite value, the first nan at \[4\]"),
    ("running_mean", (0,), float("inf"), r"layer 'bn1' \(BatchNorm2d\): running_mean: .* inf at \[0\]"),
    ("weight", (1,), float("nan"), r"layer 'bn1' \(BatchNorm2d\): weight: .* nan at \[1\]"),
    ("bias", (2,), float("-inf"), r"layer 'bn1' \(BatchNorm2d\): bias: .* -inf at \[2\]"),
    ("running_var", (3,), -0.5, r"layer 'bn1' \(BatchNorm2d\): running_var is negative \(-0.5 at \[3\]\)"),
], ids=["nan-var", "inf-mean", "nan-gamma", "inf-beta", "negative-var"])
def test_a_non_finite_batchnorm_statistic_names_the_batchnorm_and_nothing_is_written(
        outputs_with_old_content, tensor, index, value, match):
    _refused_with_one_bad_value(outputs_with_old_content, "cnn", "bn1", tensor, index, value, match)


def test_a_batchnorm_fold_that_overflows_float32_names_the_layer_and_nothing_is_written(outputs_with_old_content):
    tmp_path, paths = outputs_with_old_content
    qat = models.make_qat("cnn", tmp_path)
    _set(qat.bn1, "weight", (5,), 3e38)  # finite, but 3e38 / sqrt(var + eps) is beyond float32
    _set(qat.bn1, "running_var", (5,), 0.0)
    with pytest.raises(ExportError, match=r"layer 'conv1': folding BatchNormalization .* non-finite "
                                          r"gamma / sqrt\(var \+ epsilon\) \(inf at channel 5"):
        _save(qat, tmp_path, models.example_inputs("cnn"))
    _assert_untouched(tmp_path, paths)


@pytest.mark.parametrize("bad,match", [
    (torch.randn(2, 21), "does not fit the model"),
    ("not a tensor", "must be a torch.Tensor"),
    ((torch.randn(2, 20), 3), "must be a torch.Tensor"),
])
def test_input_data_of_wrong_shape_or_type(outputs_with_old_content, bad, match):
    tmp_path, paths = outputs_with_old_content
    qat = models.make_qat("mlp", tmp_path)
    with pytest.raises(ExportError, match=match):
        _save(qat, tmp_path, bad)
    _assert_untouched(tmp_path, paths)


def test_dynamic_axes_naming_an_unknown_input(outputs_with_old_content):
    tmp_path, paths = outputs_with_old_content
    qat = models.make_qat("mlp", tmp_path)
    with pytest.raises(ExportError, match="dynamic_axes names 'inputs'"):
        _save(qat, tmp_path, models.example_inputs("mlp"), input_names=["input"], dynamic_axes={"inputs": [0]})
    _assert_untouched(tmp_path, paths)


def test_more_output_names_than_outputs(outputs_with_old_content):
    tmp_path, paths = outputs_with_old_content
    qat = models.make_qat("mlp", tmp_path)
    with pytest.raises(ExportError, match=r"output_names \['a', 'b'\] do not fit"):
        _save(qat, tmp_path, models.example_inputs("mlp"), output_names=["a", "b"])
    _assert_untouched(tmp_path, paths)


@pytest.mark.parametrize("save_path, record_file, match", [
    ("o/m\x00x", "r.txt", r"^save_path '.*o/m\\x00x' holds a NUL byte"),
    ("o/m", "r\x00.txt", r"^record_file '.*r\\x00.txt' holds a NUL byte"),
    ("o/" + "m" * 230, "r.txt", r"^save_path: the output file name 'mmm.*_fake_quant_model.onnx' has 252 bytes"),
    ("o/m", "r" * 256 + ".txt", r"^record_file: the path component 'rrr.*' has 260 bytes"),
], ids=["nul-save_path", "nul-record_file", "long-name-with-suffix", "long-record_file"])
def test_an_odd_path_is_refused_naming_the_parameter_before_any_work(outputs_with_old_content, monkeypatch, save_path,
                                                                     record_file, match):
    tmp_path, paths = outputs_with_old_content
    qat = models.make_qat("mlp", tmp_path)
    monkeypatch.setattr("amct_core.save.export_quant_model", lambda *a, **k: pytest.fail("traced before the check"))
    with pytest.raises(ExportError, match=match):
        save_distill_model(qat, str(tmp_path / save_path), models.example_inputs("mlp"),
                           record_file=str(tmp_path / record_file))
    _assert_untouched(tmp_path, paths)


def test_save_path_whose_directory_cannot_be_created(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    qat = models.make_qat("mlp", tmp_path)
    with pytest.raises(ExportError, match="cannot create directory"):
        save_distill_model(qat, str(blocker / "sub" / "m"), models.example_inputs("mlp"), record_file=str(tmp_path / "r.txt"))
    assert not (tmp_path / "r.txt").exists()


def test_bias_that_overflows_int32_names_the_layer(outputs_with_old_content):
    tmp_path, paths = outputs_with_old_content
    qat = models.make_qat("mlp", tmp_path)
    with torch.no_grad():
        qat.fc3.bias[2] = 1e12
    with pytest.raises(RecordError, match=r"layer 'fc3': bias overflows int32"):
        _save(qat, tmp_path, models.example_inputs("mlp"))
    _assert_untouched(tmp_path, paths)


def test_uncalibrated_layer_is_named(tmp_path):
    qat = models.make_qat("mlp", tmp_path)
    qat.fc2.act_initialized.fill_(False)
    with pytest.raises(ExportError, match="layer 'fc2'"):
        save_distill_model(qat, str(tmp_path / "m"), models.example_inputs("mlp"), record_file=str(tmp_path / "r.txt"))


# ---------------------------------------------------------------- atomic writes and external data

def test_a_crash_while_writing_leaves_the_old_files(outputs_with_old_content, monkeypatch):
    tmp_path, paths = outputs_with_old_content
    qat = models.make_qat("mlp", tmp_path)
    import amct_core.onnx.io as oio

    real = oio._write_embedded
    calls = {"n": 0}

    def crash_on_second(model, f):
        calls["n"] += 1
        if calls["n"] == 2:
            f.write(b"half a model")
            raise KeyboardInterrupt("simulated kill while serializing the deploy model")
        return real(model, f)

    monkeypatch.setattr(oio, "_write_embedded", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        _save(qat, tmp_path, models.example_inputs("mlp"))
    _assert_untouched(tmp_path, paths)


def test_external_data_path_loads_runs_and_replaces_old_data(tmp_path, monkeypatch):
    import amct_core.onnx.io as oio

    monkeypatch.setattr(oio, "EXTERNAL_DATA_THRESHOLD", 10_000)
    qat = models.make_qat("cnn", tmp_path)
    x = models.example_inputs("cnn", 4)
    for _ in range(2):  # the second export replaces the first one's data files
        save_distill_model(qat, str(tmp_path / "big" / "m"), x, record_file=str(tmp_path / "r.txt"), input_names=["input"])
    files = sorted(p.name for p in (tmp_path / "big").iterdir())
    assert len([f for f in files if f.endswith(".data")]) == 2, files
    fq = tmp_path / "big" / "m_fake_quant_model.onnx"
    assert len(onnx.load(str(fq)).graph.initializer) > 0  # loads external data from its directory
    assert any(t.data_location == TensorProto.EXTERNAL for t in onnx.load(str(fq), load_external_data=False).graph.initializer)
    onnx.checker.check_model(str(fq))
    got = ort.InferenceSession(str(fq), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    monkeypatch.setattr(oio, "EXTERNAL_DATA_THRESHOLD", 1_900_000_000)
    save_distill_model(qat, str(tmp_path / "small" / "m"), x, record_file=str(tmp_path / "r2.txt"), input_names=["input"])
    embedded = tmp_path / "small" / "m_fake_quant_model.onnx"
    assert not any(t.data_location == TensorProto.EXTERNAL for t in onnx.load(str(embedded)).graph.initializer)
    want = ort.InferenceSession(str(embedded), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    assert np.array_equal(got, want)
    dm = onnx.load(str(tmp_path / "big" / "m_deploy_model.onnx"))
    assert {t.name: t.data_type for t in dm.graph.initializer}["conv2.weight"] == TensorProto.INT8


def test_streamed_file_parses_as_the_same_model(tmp_path):
    """The streaming writer's bytes parse to exactly the graph with the arrays as initializers."""
    import onnx_ir as ir

    from amct_core.onnx.adapter import graph_proto
    from amct_core.onnx.io import prepare_write

    arrays = {"w": np.random.default_rng(0).standard_normal((3, 300)).astype(np.float32),
              "q": np.arange(-128, 128, dtype=np.int8).reshape(16, 16),
              "p": np.array([1, 2**32 - 1], dtype=np.uint64)}
    inits = [ir.val(k, const_value=ir.tensor(v)) for k, v in arrays.items()]
    x = ir.val("x", ir.DataType.FLOAT, [3, 300])
    add = ir.node("Add", [x, inits[0]], name="add", outputs=[ir.val("y", ir.DataType.FLOAT, [3, 300])])
    model = ir.Model(ir.Graph([x], add.outputs, nodes=[add], initializers=inits, opset_imports={"": 11}), ir_version=7)
    prepare_write(model, tmp_path / "s.onnx").commit()
    back = onnx.load(str(tmp_path / "s.onnx"))
    want = graph_proto(model)
    for k, v in arrays.items():
        want.graph.initializer.append(numpy_helper.from_array(v, k))
    assert back == want
    out = ort.InferenceSession(str(tmp_path / "s.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"x": np.ones((3, 300), np.float32)})[0]
    assert np.array_equal(out, arrays["w"] + 1)


# ---------------------------------------------------------------- graph validity (regressions)

def test_resnet50_with_downsample_first_exports_sorted_files(tmp_path):
    """Regression: in a bottleneck whose downsample branch runs before ``c1``, both read the block
    input with equal factors (calibration only) and share one AscendQuant; it used to be inserted
    before ``c1`` (record order), i.e. after its first reader ``down.0``, leaving both files unsorted."""
    from amct_core import create_distill_config, create_distill_model
    from amct_core.verify import preflight
    from tests.zoo_models import ZOO

    z = ZOO["resnet50"]
    model, (x,) = z.float_model(), z.inputs(1, 0)
    create_distill_config(tmp_path / "c.json", model, x)
    qat = create_distill_model(tmp_path / "c.json", model, x).eval()  # calibrated on x only
    save_distill_model(qat, str(tmp_path / "r50"), x, record_file=str(tmp_path / "r.txt"))
    dep = onnx.load(tmp_path / "r50_deploy_model.onnx")
    shared = next(n for n in dep.graph.node if n.name == "layer1.0.c1.quant")
    readers = [n.name for n in dep.graph.node if shared.output[0] in n.input]
    assert sorted(readers) == ["layer1.0.c1", "layer1.0.down.0"]  # the case the bug needs: one shared quant
    onnx.checker.check_model(onnx.load(tmp_path / "r50_fake_quant_model.onnx"), full_check=True)
    r = preflight(dep)
    assert r.ok, r.summary()


def _reversed_nodes(build):
    def broken(*a, **k):
        m = build(*a, **k)
        nodes = list(m.graph)
        m.graph.remove(nodes)
        m.graph.extend(reversed(nodes))
        return m
    return broken


@pytest.mark.parametrize("builder,file", [("build_fake_quant", "m_fake_quant_model.onnx"),
                                          ("build_deploy", "m_deploy_model.onnx")])
def test_a_built_model_that_is_not_sorted_is_an_error_and_nothing_is_written(outputs_with_old_content, monkeypatch,
                                                                              builder, file):
    import amct_core.save as save_mod

    tmp_path, paths = outputs_with_old_content
    qat = models.make_qat("mlp", tmp_path)
    monkeypatch.setattr(save_mod, builder, _reversed_nodes(getattr(save_mod, builder)))
    with pytest.raises(ExportError, match=rf"model '.*{file}': .* node 'fc3.*' reads .* before .* produces it"):
        _save(qat, tmp_path, models.example_inputs("mlp"))
    _assert_untouched(tmp_path, paths)


class FreshBatchNorms(nn.Module):
    """Two conv + BatchNorm pairs and two LayerNorms straight from their constructors: equal
    parameters, which torch's exporter deduplicates into one initializer and Identity nodes."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.ln1, self.ln2 = nn.LayerNorm(8), nn.LayerNorm(8)

    def forward(self, x):
        y = F.relu(self.b2(self.c2(F.relu(self.b1(self.c1(x))))))
        return self.ln2(self.ln1(y.mean((2, 3))))


def test_batchnorms_with_deduplicated_parameters_are_folded_and_no_identity_is_left(tmp_path):
    from amct_core import create_distill_config, create_distill_model

    torch.manual_seed(0)
    model, x = FreshBatchNorms().eval(), torch.randn(2, 3, 8, 8)
    create_distill_config(tmp_path / "c.json", model, x)
    qat = create_distill_model(tmp_path / "c.json", model, x).eval()
    save_distill_model(qat, str(tmp_path / "m"), x, record_file=str(tmp_path / "r.txt"), input_names=["input"])
    for f in ("m_fake_quant_model.onnx", "m_deploy_model.onnx"):
        ops = [n.op_type for n in onnx.load(tmp_path / f).graph.node]
        assert "Identity" not in ops and "BatchNormalization" not in ops, (f, ops)
    fq = str(tmp_path / "m_fake_quant_model.onnx")
    got = ort.InferenceSession(fq, providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        want = qat(x).numpy()
    assert np.allclose(got, want, atol=1e-4)
