"""amct_core.manifest: what manifest.json says of an export (target, SoC family, ATC command, every file by role
with its SHA-256), and that it is written whole."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from amct_core.manifest import atc_command, build_manifest, write_manifest
from tasks.files import FileRef  # any object with path, sha256 and size is a manifest entry


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The SmallCNN exported for A3 with the input named img: the files by role."""
    from amct_core import save_distill_model
    from tests import models

    d = tmp_path_factory.mktemp("manifest")
    qat = models.make_qat("cnn", d)
    save_distill_model(qat, str(d / "m"), models.example_inputs("cnn", 1), record_file=str(d / "r.txt"),
                       input_names=["img"], output_names=["out"], dynamic_axes={"img": [0], "out": [0]}, target="A3")
    return d, {"fake_quant_model": [FileRef.of(d / "m_fake_quant_model.onnx")],
               "deploy_model": [FileRef.of(d / "m_deploy_model.onnx")], "record": [FileRef.of(d / "r.txt")]}


def _manifest(d, files, **kw):
    args = dict(directory=d, name="m", target="A3", opset=11, inputs=[([1, 3, 16, 16], "float32")],
                checkpoint={"source": "x", "sha256": "0" * 64, "size": 1}, files=files, parity={"passed": True},
                parameters={"name": "m"})
    return build_manifest(**{**args, **kw})


def test_the_atc_command_names_the_graphs_inputs_with_the_export_shapes_and_the_targets_first_soc(exported):
    d, _ = exported
    assert atc_command(d / "m_deploy_model.onnx", "A3", [([2, 3, 16, 16], "float32")], "m_A3") == (
        'atc --framework=5 --model=m_deploy_model.onnx --output=m_A3 --soc_version=Ascend910_9362 '
        '--input_shape="img:2,3,16,16"')


def test_the_manifest_has_the_target_its_socs_and_the_atc_command(exported):
    m = _manifest(*exported)
    assert m["target"] == "A3" and m["soc_family"][0] == "Ascend910_9362" and m["cann"] == "8.x"
    assert m["atc_command"].endswith('--output=m_A3 --soc_version=Ascend910_9362 --input_shape="img:1,3,16,16"')
    assert m["inputs"] == [{"shape": [1, 3, 16, 16], "dtype": "float32"}] and m["parameters"] == {"name": "m"}
    assert m["versions"]["onnx"] and m["versions"]["torch"] and m["versions"]["amct-core"]


def test_every_file_is_listed_by_role_relative_to_the_manifest_with_its_place_in_mlflow(exported):
    d, files = exported
    m = _manifest(d, files)
    assert m["files"]["deploy_model"] == [{"path": "m_deploy_model.onnx",
                                           "artifact_path": "models/deploy/m_deploy_model.onnx",
                                           "sha256": files["deploy_model"][0].sha256,
                                           "size": files["deploy_model"][0].size}]
    for entries in m["files"].values():
        for e in entries:
            assert FileRef.of(d / e["path"]).sha256 == e["sha256"]


def test_a_file_outside_the_manifests_directory_keeps_its_absolute_path(exported, tmp_path):
    d, files = exported
    m = _manifest(tmp_path, files)
    assert m["files"]["record"][0]["path"] == str((d / "r.txt").resolve())


def test_write_manifest_replaces_the_file_whole(exported, tmp_path):
    m = _manifest(*exported)
    out = tmp_path / "manifest.json"
    out.write_text("old")
    assert write_manifest(out, m) == out
    assert json.loads(out.read_text()) == json.loads(json.dumps(m, default=str))
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]  # no temporary file left
    assert Path(out).stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask
