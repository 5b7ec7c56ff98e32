"""`amct-export fetch`: an export back from a real `mlflow server`, checked against its manifest."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from flows import cli
from tests import services

pytestmark = pytest.mark.integration

EXPORT_FILES = {"cnn_deploy_model.onnx", "cnn_fake_quant_model.onnx", "cnn_scale_offset_record.txt", "manifest.json"}


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _fetch(args, tracking_uri) -> subprocess.CompletedProcess:
    env = services.base_env(PYTHONPATH=str(services.REPO))
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "flows.cli", "fetch", *args, "--mlflow-tracking-uri", tracking_uri],
                          capture_output=True, text=True, cwd=services.REPO, env=env, timeout=300,
                          stdin=subprocess.DEVNULL)


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".fetch-" in p.name)


def _log_run(client, experiment: str, files: dict[str, Path], manifest: dict | None) -> str:
    """A run holding ``files`` at the given artifact paths (and ``manifest`` as manifest.json)."""
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    run = client.create_run(exp_id)
    for artifact_path, f in files.items():
        client.log_artifact(run.info.run_id, str(f), str(Path(artifact_path).parent))
    if manifest is not None:
        client.log_dict(run.info.run_id, manifest, "manifest.json")
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def test_fetch_by_run_downloads_the_four_files_checks_them_and_prints_the_atc_command(logged_export, mlflow_server,
                                                                                       tmp_path):
    summary, out = logged_export
    dest = tmp_path / "deploy"
    r = _fetch([f"runs:/{summary['mlflow_run_id']}", "--to", str(dest)], mlflow_server.url)
    assert r.returncode == cli.EXIT_OK, r.stderr[-3000:]
    assert {p.name for p in dest.iterdir()} == EXPORT_FILES
    for f in EXPORT_FILES - {"manifest.json"}:
        assert _sha(dest / f) == _sha(out / f), f
    assert json.loads((dest / "manifest.json").read_text()) == json.loads((out / "manifest.json").read_text())
    assert "sizes and SHA-256 match manifest.json" in r.stdout
    assert f"cd {dest} && atc --framework=5 --model=cnn_deploy_model.onnx " in r.stdout
    assert '--input_shape="input:1,3,16,16"' in r.stdout
    assert _leftovers(tmp_path) == []


def test_fetch_by_registered_model_version_and_latest(logged_export, mlflow_server, tmp_path):
    from tasks.tracking import fetch_export

    summary, _ = logged_export
    for i, uri in enumerate(["models:/cnn-int8/1", "models:/cnn-int8/latest"]):
        f = fetch_export(uri, tmp_path / f"d{i}", mlflow_server.url)
        assert f.run_id == summary["mlflow_run_id"] and f.model_version == "cnn-int8/1"
        assert {p.name for p in (tmp_path / f"d{i}").iterdir()} == EXPORT_FILES


def test_a_file_that_differs_from_the_manifest_fails_and_leaves_nothing_in_the_directory(logged_export,
                                                                                          mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    summary, out = logged_export
    manifest = json.loads((out / "manifest.json").read_text())
    record = tmp_path / "cnn_scale_offset_record.txt"
    record.write_text((out / record.name).read_text().replace("scale_d: ", "scale_d: 1", 1))  # corrupted copy
    files = {e["artifact_path"]: out / e["path"] for role in ("deploy_model", "fake_quant_model")
             for e in manifest["files"][role]}
    files["record/cnn_scale_offset_record.txt"] = record
    run_id = _log_run(MlflowClient(mlflow_server.url), "fetch-tampered", files, manifest)
    dest = tmp_path / "deploy"
    r = _fetch([f"runs:/{run_id}", "--to", str(dest)], mlflow_server.url)
    assert r.returncode == cli.EXIT_INVALID, r.stderr[-3000:]
    assert "record/cnn_scale_offset_record.txt" in r.stderr and "does not match manifest.json" in r.stderr
    assert not dest.exists() and _leftovers(tmp_path) == []


def test_a_model_with_external_data_is_fetched_with_its_data_file(mlflow_server, mlp_export, tmp_path):
    from mlflow.tracking import MlflowClient

    from amct_core.manifest import build_manifest
    from tasks.files import FileRef, onnx_files

    src = tmp_path / "src"
    src.mkdir()
    files = {}
    for kind in ("deploy", "fake_quant"):
        m = onnx.load(str(mlp_export / f"mlp_{kind}_model.onnx"))
        onnx.save(m, str(src / f"mlp_{kind}_model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=f"mlp_{kind}_model.onnx.weights.data", size_threshold=0)
        files[f"{kind}_model"] = onnx_files(src / f"mlp_{kind}_model.onnx")
        assert len(files[f"{kind}_model"]) == 2  # the model and its data file
    shutil.copy(mlp_export / "mlp_record.txt", src / "mlp_scale_offset_record.txt")
    files["record"] = [FileRef.of(src / "mlp_scale_offset_record.txt")]
    manifest = build_manifest(directory=src, name="mlp", target="A2", opset=11, inputs=[([1, 20], "float32")],
                              checkpoint={}, files=files, parity={}, parameters={})
    uploads = {e["artifact_path"]: src / e["path"] for entries in manifest["files"].values() for e in entries}
    run_id = _log_run(MlflowClient(mlflow_server.url), "fetch-external-data", uploads, manifest)
    dest = tmp_path / "deploy"
    r = _fetch([f"runs:/{run_id}", "--to", str(dest)], mlflow_server.url)
    assert r.returncode == cli.EXIT_OK, r.stderr[-3000:]
    assert {"mlp_deploy_model.onnx.weights.data", "mlp_fake_quant_model.onnx.weights.data"} <= {
        p.name for p in dest.iterdir()}
    deploy = onnx.load(str(dest / "mlp_deploy_model.onnx"))  # loads its weights from the fetched data file
    assert any(t.data_type == onnx.TensorProto.INT8 for t in deploy.graph.initializer)
    assert "external data" in r.stdout


def test_a_run_without_a_manifest_is_not_an_export(mlflow_server, cnn_checkpoint, tmp_path):
    from mlflow.tracking import MlflowClient

    run_id = _log_run(MlflowClient(mlflow_server.url), "fetch-not-an-export",
                      {"checkpoints/cnn.pt": Path(cnn_checkpoint.checkpoint)}, None)
    r = _fetch([f"runs:/{run_id}", "--to", str(tmp_path / "d")], mlflow_server.url)
    assert r.returncode == cli.EXIT_INVALID
    assert "has no manifest.json" in r.stderr and run_id in r.stderr
    assert not (tmp_path / "d").exists()


def test_a_directory_that_is_not_empty_is_refused_and_left_untouched(logged_export, mlflow_server, tmp_path):
    dest = tmp_path / "deploy"
    dest.mkdir()
    (dest / "mine.txt").write_text("the user's")
    r = _fetch([f"runs:/{logged_export[0]['mlflow_run_id']}", "--to", str(dest)], mlflow_server.url)
    assert r.returncode == cli.EXIT_USAGE
    assert r.stderr.startswith("amct-export: error: --to") and "is not empty" in r.stderr
    assert [p.name for p in dest.iterdir()] == ["mine.txt"] and (dest / "mine.txt").read_text() == "the user's"


@pytest.mark.parametrize("uri, words", [
    ("models:/cnn-int8/99", "not found"),
    ("models:/no-such-model/latest", "no version"),
    ("runs:/0123456789abcdef0123456789abcdef", "no run"),
    ("s3://bucket/model", "expected 'runs:/<run_id>'"),
])
def test_an_unknown_run_or_version_is_a_usage_error_naming_the_uri(mlflow_server, tmp_path, uri, words):
    r = _fetch([uri, "--to", str(tmp_path / "d")], mlflow_server.url)
    assert r.returncode == cli.EXIT_USAGE, r.stderr
    assert r.stderr.startswith(f"amct-export: error: URI: {uri!r}") and words in r.stderr, r.stderr
    assert not (tmp_path / "d").exists()


def test_an_unreachable_tracking_server_exits_3_naming_it(tmp_path):
    url = f"http://127.0.0.1:{services.free_port()}"
    r = _fetch(["models:/cnn-int8/1", "--to", str(tmp_path / "d")], url)
    assert r.returncode == cli.EXIT_TRACKING
    assert url in r.stderr and "unreachable" in r.stderr
    assert not (tmp_path / "d").exists()
