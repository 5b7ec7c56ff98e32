"""The flow logs one run to a real `mlflow server`; everything is read back through MLflow's client and REST API."""
from __future__ import annotations

import hashlib
import json
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.services import api_json

pytestmark = pytest.mark.integration


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def logged(logged_export):
    return logged_export


def test_run_has_params_metrics_and_tags(logged, mlflow_server):
    from mlflow.tracking import MlflowClient

    summary, _ = logged
    run = MlflowClient(mlflow_server.url).get_run(summary["mlflow_run_id"])
    p, m, t = run.data.params, run.data.metrics, run.data.tags
    assert p["target"] == "A2" and p["opset"] == "11"
    assert p["quantized_layer_count"] == "6"  # conv1, conv2, dw, pw, dilated, fc
    for k in ("torch_version", "onnx_version", "onnxruntime_version", "amct_core_version"):
        assert p[k] and p[k] != "not installed"
    assert m["parity.passed"] == 1.0
    assert any(k.startswith("parity.") and k.endswith("cosine") for k in m)
    for k in ("fake_quant_model_bytes", "deploy_model_bytes", "compression_ratio", "peak_rss_mb",
              "stage_seconds.trace", "stage_seconds.deploy-build"):
        assert k in m, k
    assert m["compression_ratio"] > 1.5  # int8 weights vs float32 integer grid
    assert t["target"] == "A2"
    assert t["prefect.flow_run_id"] and t["prefect.flow_run_url"].endswith(t["prefect.flow_run_id"])


def test_soc_family_tag_lists_the_targets_socs_as_the_param_does(logged, mlflow_server):
    from mlflow.tracking import MlflowClient

    run = MlflowClient(mlflow_server.url).get_run(logged[0]["mlflow_run_id"])
    t, p = run.data.tags, run.data.params
    assert t["soc_family"] == p["soc_family"] and t["soc_family"].split(",")[:2] == ["Ascend910B1", "Ascend910B2"]
    assert t["atc_soc_version"] == "Ascend910B1"


def test_checkpoint_hash_tag_matches_the_file(logged, mlflow_server, cnn_checkpoint):
    from mlflow.tracking import MlflowClient

    run = MlflowClient(mlflow_server.url).get_run(logged[0]["mlflow_run_id"])
    assert run.data.tags["checkpoint.sha256"] == _sha(Path(cnn_checkpoint.checkpoint))


def _rest_list(base: str, run_id: str, path: str = "") -> list[dict]:
    q = urllib.parse.urlencode({"run_id": run_id, **({"path": path} if path else {})})
    return api_json(f"{base}/api/2.0/mlflow/artifacts/list?{q}").get("files", [])


def _rest_walk(base: str, run_id: str, path: str = "") -> list[str]:
    files = []
    for f in _rest_list(base, run_id, path):
        if f["is_dir"]:
            files += _rest_walk(base, run_id, f["path"])
        else:
            files.append(f["path"])
    return files


def test_every_artifact_downloads_and_matches_the_manifest(logged, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    summary, out = logged
    run_id = summary["mlflow_run_id"]
    # the layout, listed through the REST API
    listed = set(_rest_walk(mlflow_server.url, run_id))
    assert "manifest.json" in listed
    assert "models/fake_quant/cnn_fake_quant_model.onnx" in listed
    assert "models/deploy/cnn_deploy_model.onnx" in listed
    assert "record/cnn_scale_offset_record.txt" in listed
    assert {"parity/report.html", "parity/report.json"} <= listed
    assert any(p.startswith("plots/") and p.endswith(".png") for p in listed)
    # every file through the client
    local = Path(MlflowClient(mlflow_server.url).download_artifacts(run_id, "", str(tmp_path / "client")))
    client_files = {str(p.relative_to(local)) for p in local.rglob("*") if p.is_file()}
    assert listed <= client_files
    # and every file through the REST download endpoint, byte-identical to the client's copy
    for rel in sorted(listed):
        q = urllib.parse.urlencode({"path": rel, "run_uuid": run_id})
        with urllib.request.urlopen(f"{mlflow_server.url}/get-artifact?{q}", timeout=30) as r:
            assert r.read() == (local / rel).read_bytes(), rel
    manifest = json.loads((local / "manifest.json").read_text())
    assert manifest["target"] == "A2" and "Ascend910B1" in manifest["soc_family"]
    assert manifest["atc_command"].startswith("atc ") and "--soc_version=Ascend910B1" in manifest["atc_command"]
    assert "--input_shape=\"input:1,3,16,16\"" in manifest["atc_command"]
    assert manifest["versions"]["torch"] and manifest["versions"]["onnxruntime"]
    from flows.parameters import flow_parameters

    assert set(manifest["parameters"]) <= {p.name for p in flow_parameters()}
    assert manifest["parameters"]["name"] == "cnn"
    checked = 0
    for role, entries in manifest["files"].items():
        for e in entries:
            f = local / e["artifact_path"]
            assert f.is_file(), f"manifest names {e['artifact_path']} ({role}) but the run has no such artifact"
            assert _sha(f) == e["sha256"], f"{e['artifact_path']}: SHA-256 differs from the manifest"
            assert _sha(out / e["path"]) == e["sha256"]
            checked += 1
    assert checked >= 6
    # the two models load: fake-quant runs in ONNX Runtime, deploy has the Ascend ops and int8 weights
    import onnxruntime as ort

    fq = local / "models/fake_quant/cnn_fake_quant_model.onnx"
    onnx.checker.check_model(onnx.load(str(fq)))
    sess = ort.InferenceSession(str(fq), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"input": np.zeros((2, 3, 16, 16), np.float32)})[0]
    assert y.shape == (2, 10)
    dm = onnx.load(str(local / "models/deploy/cnn_deploy_model.onnx"))
    ops = {n.op_type for n in dm.graph.node}
    assert {"AscendQuant", "AscendDequant"} <= ops
    assert [(o.domain, o.version) for o in dm.opset_import] == [("", 11)]
    assert any(t.data_type == onnx.TensorProto.INT8 for t in dm.graph.initializer)


def test_registered_version_runs_in_pyfunc_and_leads_to_the_deploy_model(logged, mlflow_server, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    summary, _ = logged
    assert summary["registered_model"] == "cnn-int8" and summary["registered_version"] == "1"
    mlflow.set_tracking_uri(mlflow_server.url)
    model = mlflow.pyfunc.load_model("models:/cnn-int8/1")
    x = np.random.default_rng(1).standard_normal((3, 3, 16, 16)).astype(np.float32)
    pred = model.predict({"input": x})
    y = pred["logits"] if isinstance(pred, dict) else np.asarray(pred)
    assert np.asarray(y).shape == (3, 10)
    client = MlflowClient(mlflow_server.url)
    mv = client.get_model_version("cnn-int8", "1")
    assert mv.run_id == summary["mlflow_run_id"]
    deploy = client.download_artifacts(mv.run_id, "models/deploy/cnn_deploy_model.onnx", str(tmp_path))
    assert {"AscendQuant"} <= {n.op_type for n in onnx.load(deploy).graph.node}
    assert mv.tags["deploy_model"] == f"runs:/{mv.run_id}/models/deploy/cnn_deploy_model.onnx"


def test_prefect_artifacts_show_parity_table_and_mlflow_link(logged, prefect_api, mlflow_server):
    import asyncio

    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    summary, _ = logged
    flow_run_id = MlflowClient(mlflow_server.url).get_run(summary["mlflow_run_id"]).data.tags["prefect.flow_run_id"]

    async def read():
        async with get_client() as c:
            return await c.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))

    arts = {a.key: a for a in asyncio.run(read())}
    table = arts["parity-summary"]
    assert table.type == "table"
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert any(r["check"].startswith("parity output") and r["cosine"] > 0.99 for r in rows)
    assert {r["check"] for r in rows} >= {"preflight", "deploy simulation"}
    link = arts["mlflow-run"]
    assert link.type == "markdown"  # docs/PIPELINE.md says so
    assert summary["mlflow_run_id"] in json.dumps(link.data) and mlflow_server.url in json.dumps(link.data)


def test_checkpoint_from_mlflow_runs_and_models_uris(prefect_api, mlflow_server, cnn_checkpoint, tmp_path):
    """A checkpoint given as runs:/... or models:/... is downloaded from the tracking server first."""
    from mlflow.tracking import MlflowClient

    from flows.distill_export import distill_export

    client = MlflowClient(mlflow_server.url)
    exp = client.create_experiment("checkpoints")
    run = client.create_run(exp)
    client.log_artifact(run.info.run_id, cnn_checkpoint.checkpoint, "checkpoints")
    client.set_terminated(run.info.run_id)
    client.create_registered_model("cnn-distilled-checkpoint")
    client.create_model_version("cnn-distilled-checkpoint", f"runs:/{run.info.run_id}/checkpoints", run.info.run_id)
    want = _sha(Path(cnn_checkpoint.checkpoint))
    for i, uri in enumerate([f"runs:/{run.info.run_id}/checkpoints/{Path(cnn_checkpoint.checkpoint).name}",
                             "models:/cnn-distilled-checkpoint/1"]):
        params = cnn_checkpoint.params(tmp_path / f"export{i}", checkpoint=uri, mlflow_tracking_uri=mlflow_server.url,
                                       mlflow_experiment="from-mlflow")
        state = distill_export(**params, return_state=True)
        assert state.is_completed(), state.message
        logged = client.get_run(state.result()["mlflow_run_id"])
        assert logged.data.tags["checkpoint.sha256"] == want
        assert logged.data.params["checkpoint"] == uri
        downloaded = list((tmp_path / f"export{i}" / ".amct_work" / "checkpoint").rglob("*.pt"))
        assert len(downloaded) == 1 and _sha(downloaded[0]) == want
    bad = cnn_checkpoint.params(tmp_path / "bad", checkpoint=f"runs:/{run.info.run_id}/checkpoints/nope.pt",
                                mlflow_tracking_uri=mlflow_server.url)
    state = distill_export(**bad, return_state=True)
    assert state.is_failed()
    msg = str(state.result(raise_on_failure=False))
    assert "parameter 'checkpoint'" in msg and "nope.pt" in msg


def test_a_model_with_external_data_is_logged_as_its_graph_and_its_own_data_file(mlflow_server, tmp_path):
    """The MLflow ONNX model of an export with external data: model.onnx + the export's data file, byte for
    byte, loadable through pyfunc; the weights are never read into the logging process."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from tasks.specs import TrackingSpec
    from tasks.tracking import RunPayload, log_run
    from tests import broken_models as bm

    e = bm.export("mlp")
    fq = tmp_path / "mlp_fake_quant_model.onnx"
    onnx.save_model(onnx.load(str(e.fake_quant)), str(fq), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=fq.name + ".data", size_threshold=1024)
    data = tmp_path / (fq.name + ".data")
    manifest = tmp_path / "manifest.json"
    manifest.write_text("{}")
    res = log_run(TrackingSpec(experiment="external-data", tracking_uri=mlflow_server.url,
                               registered_model_name="mlp-external"),
                  RunPayload("ext", {}, {}, {}, {"fake_quant_model": [str(fq), str(data)]}, str(manifest), str(fq),
                             [([2, 20], "float32")]))
    local = Path(MlflowClient(mlflow_server.url).download_artifacts(res.run_id, "", str(tmp_path / "dl")))
    assert _sha(local / "models/fake_quant" / data.name) == _sha(data)
    mlflow.set_tracking_uri(mlflow_server.url)
    model_dir = Path(mlflow.artifacts.download_artifacts(f"models:/mlp-external/{res.registered_version}",
                                                         dst_path=str(tmp_path / "model")))
    shipped = [p for p in model_dir.rglob("*.data")]
    assert [_sha(p) for p in shipped] == [_sha(data)]
    import onnxruntime as ort

    sess = ort.InferenceSession(str(e.fake_quant), providers=["CPUExecutionProvider"])
    feeds = {sess.get_inputs()[0].name: np.random.default_rng(0).standard_normal((2, 20)).astype(np.float32)}
    pred = mlflow.pyfunc.load_model(f"models:/mlp-external/{res.registered_version}").predict(feeds)
    got = next(iter(pred.values())) if isinstance(pred, dict) else np.asarray(pred)
    np.testing.assert_array_equal(np.asarray(got), sess.run(None, feeds)[0])
