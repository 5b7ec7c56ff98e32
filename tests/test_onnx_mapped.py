"""amct_core.onnx.mapped: opening a model file without reading its tensors, and running it from there."""
from __future__ import annotations

import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper

from amct_core.onnx.mapped import MappedModelError, open_model, runtime_model, tensor_array
from amct_core.verify._run import run
from tests import broken_models as bm


def _external_copy(src, dst_dir, name="m.onnx"):
    """The model re-saved by onnx's own writer with its tensors in one external data file."""
    m = onnx.load(str(src))
    dst = dst_dir / name
    onnx.save_model(m, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=name + ".data", size_threshold=1024)
    return dst


def _arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: tensor_array(t) for t in model.graph.initializer}


@pytest.mark.parametrize("kind", ["deploy", "fake_quant"])
def test_embedded_tensors_become_references_to_their_bytes_in_the_file(kind):
    path = getattr(bm.export("encoder"), kind)
    full = onnx.load(str(path))
    opened = open_model(path)
    assert [n.SerializeToString() for n in opened.graph.node] == [n.SerializeToString() for n in full.graph.node]
    assert list(opened.graph.input) == list(full.graph.input) and list(opened.graph.output) == list(full.graph.output)
    for t in opened.graph.initializer:
        ref = numpy_helper.to_array(next(f for f in full.graph.initializer if f.name == t.name))
        got = tensor_array(t)
        assert got.dtype == ref.dtype and got.shape == ref.shape and np.array_equal(got, ref), t.name
        if ref.nbytes >= 1024:
            assert t.data_location == TensorProto.EXTERNAL and not t.raw_data, t.name
            assert dict((e.key, e.value) for e in t.external_data)["location"] == str(path.resolve())
        else:
            assert t.data_location != TensorProto.EXTERNAL, t.name


def test_the_opened_model_holds_no_byte_of_its_large_tensors():
    path = bm.export("encoder").fake_quant
    full = onnx.load(str(path))
    large = [len(t.raw_data) for t in full.graph.initializer if len(t.raw_data) >= 1024]
    assert large
    # each large tensor is replaced by a reference (location, offset, length): well under 300 bytes
    assert open_model(path).ByteSize() < full.ByteSize() - sum(large) + 300 * len(large)


def test_external_data_written_by_onnx_is_mapped_from_its_data_file(tmp_path):
    src = bm.export("mlp").fake_quant
    path = _external_copy(src, tmp_path)
    opened = open_model(path)
    ref = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(src)).graph.initializer}
    got = _arrays(opened)
    assert set(got) == set(ref)
    for name, a in got.items():
        assert a.dtype == ref[name].dtype and np.array_equal(a, ref[name]), name
    locations = {dict((e.key, e.value) for e in t.external_data).get("location")
                 for t in opened.graph.initializer if t.data_location == TensorProto.EXTERNAL}
    assert locations == {str(tmp_path / "m.onnx.data")}


@pytest.mark.parametrize("layout", ["embedded", "external"])
def test_onnx_runtime_runs_the_opened_model_as_it_runs_the_file(layout, tmp_path):
    e = bm.export("encoder")
    path = e.fake_quant if layout == "embedded" else _external_copy(e.fake_quant, tmp_path)
    data, folder = runtime_model(open_model(path))
    assert len(data) < path.stat().st_size or layout == "external"
    assert folder == str(path.resolve().parent)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {sess.get_inputs()[0].name: e.example.numpy()}
    want = sess.run(None, feeds)[0]
    got = list(run(open_model(path), feeds).values())[0]
    assert np.array_equal(got, want)


def test_a_missing_external_data_file_is_named(tmp_path):
    path = _external_copy(bm.export("mlp").fake_quant, tmp_path)
    (tmp_path / "m.onnx.data").unlink()
    with pytest.raises(MappedModelError, match=r"m\.onnx\.data.*does not exist"):
        open_model(path)


def test_a_truncated_model_file_is_refused_naming_it(tmp_path):
    src = bm.export("mlp").deploy
    bad = tmp_path / "cut.onnx"
    bad.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    with pytest.raises(MappedModelError, match="cut.onnx.*not a valid ONNX model"):
        open_model(bad)


def test_a_file_that_is_not_onnx_is_refused(tmp_path):
    bad = tmp_path / "notes.onnx"
    bad.write_bytes(b"\xff" * 64)
    with pytest.raises(MappedModelError, match="notes.onnx"):
        open_model(bad)


def test_relative_external_references_are_refused_with_the_way_out(tmp_path):
    path = _external_copy(bm.export("mlp").fake_quant, tmp_path)
    relative = onnx.load(str(path), load_external_data=False)
    t = next(t for t in relative.graph.initializer if t.data_location == TensorProto.EXTERNAL)
    with pytest.raises(MappedModelError, match=f"{t.name}.*open_model"):
        tensor_array(t)
    with pytest.raises(MappedModelError, match="open_model"):
        runtime_model(relative)


def test_a_moved_model_with_its_data_file_still_opens(tmp_path):
    (tmp_path / "a").mkdir()
    path = _external_copy(bm.export("mlp").fake_quant, tmp_path / "a")
    moved = tmp_path / "b"
    shutil.copytree(tmp_path / "a", moved)
    shutil.rmtree(tmp_path / "a")
    opened = open_model(moved / path.name)
    assert all(tensor_array(t).size for t in opened.graph.initializer)
