"""External data outside the model's directory is refused by every reader of ours, as onnx.load refuses it
(issue 10, item 12): an absolute location, a ``..`` out of the directory, a symlink (onnx.load refuses every
symlink; a linked directory whose target is outside is refused too)."""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from amct_core.describe import describe_model
from amct_core.onnx.io import ExternalDataLocationError, contained_location, load_model
from amct_core.onnx.mapped import MappedModelError, open_model
from amct_core.stages import build_deploy_file
from amct_core.verify.cli import main as verify_main
from flows.cli import main as cli_main

SECRET = b"\x00" * 4096  # 1024 float32 zeros: what an escaping location would read


def _model_with_location(model_dir, location: str):
    """A one-node model whose 1024-float initializer is external data at ``location``."""
    w = numpy_helper.from_array(np.zeros(1024, np.float32), "w")
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", str(len(SECRET)))):
        w.external_data.add(key=k, value=v)
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1024])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1024])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    path = model_dir / "m_deploy_model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


@pytest.fixture(params=["absolute", "dotdot", "symlink", "linked_dir"])
def escaping(request, tmp_path):
    """A model in ``tmp_path/models`` whose external data lies in ``tmp_path/secret.bin``, and its location."""
    (tmp_path / "models").mkdir()
    secret = tmp_path / "secret.bin"
    secret.write_bytes(SECRET)
    if request.param == "absolute":
        location = str(secret)
    elif request.param == "dotdot":
        location = "../secret.bin"
    elif request.param == "symlink":
        os.symlink(secret, tmp_path / "models" / "link.bin")
        location = "link.bin"
    else:
        os.symlink(tmp_path, tmp_path / "models" / "up")
        location = "up/secret.bin"
    return _model_with_location(tmp_path / "models", location), location


def test_onnx_load_refuses_them_too(escaping):
    path, _ = escaping
    with pytest.raises(Exception, match="(?i)external|outside|symbolic link|directory"):
        onnx.load(str(path))


def test_the_onnx_ir_loader_refuses_them_naming_file_and_location(escaping):
    path, location = escaping
    with pytest.raises(ExternalDataLocationError) as e:
        load_model(path)
    assert str(path) in str(e.value) and repr(location) in str(e.value)


def test_the_mapped_reader_refuses_them_naming_file_and_location(escaping):
    path, location = escaping
    with pytest.raises(MappedModelError) as e:
        open_model(path)
    assert str(path) in str(e.value) and repr(location) in str(e.value)


def test_describe_and_inspect_refuse_them_and_print_nothing_of_the_target(escaping, capsys):
    path, location = escaping
    with pytest.raises(ExternalDataLocationError):
        describe_model(path)
    assert cli_main(["inspect", str(path)]) == 5
    out, err = capsys.readouterr()
    assert "secret.bin" not in out and repr(location) in err


def test_the_build_stages_refuse_them(escaping, tmp_path):
    path, location = escaping
    with pytest.raises(ExternalDataLocationError, match="outside|absolute|symbolic link"):
        build_deploy_file(path, tmp_path / "r.txt", tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


def test_verify_fails_on_them_naming_the_location(escaping, capsys):
    path, location = escaping
    assert verify_main(["--deploy", str(path)]) == 1
    assert repr(location) in capsys.readouterr().out


def test_locations_inside_the_directory_are_accepted(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "w.bin").write_bytes(SECRET)
    path = _model_with_location(tmp_path, "sub/../sub/w.bin")
    assert contained_location(path, "sub/../sub/w.bin") == (tmp_path / "sub" / "w.bin").resolve()
    np.testing.assert_array_equal(load_model(path).graph.initializers["w"].const_value.numpy(), np.zeros(1024))
    assert open_model(path).graph.initializer[0].name == "w"
