"""tasks/tracking.py: where artifacts go in MLflow's SQLite store, and what an export's run gets (params, metrics, tags,
files by role)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def exported(mlp_export, tmp_path_factory):
    """The exported MLP (read-only) and a manifest to log with it."""
    d = tmp_path_factory.mktemp("tracking")
    (d / "manifest.json").write_text(json.dumps({"name": "mlp"}))
    return mlp_export, d


def _log(uri: str, experiment: str, exported, artifact_location=None):
    from tasks.specs import TrackingSpec
    from tasks.tracking import RunPayload, log_run

    d, extra = exported
    fq = d / "mlp_fake_quant_model.onnx"
    payload = RunPayload("run", {"target": "A2"}, {"m": 1.0}, {"target": "A2"},
                         {"fake_quant_model": [str(fq)], "record": [str(d / "mlp_record.txt")]},
                         str(extra / "manifest.json"), str(fq), [([1, 20], "float32")])
    return log_run(TrackingSpec(experiment=experiment, tracking_uri=uri, artifact_location=artifact_location), payload)


def _files(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_artifacts_of_a_sqlite_store_elsewhere_go_beside_the_database_not_into_the_working_directory(
        exported, tmp_path, monkeypatch):
    cwd, store = tmp_path / "cwd", tmp_path / "elsewhere"
    cwd.mkdir()
    store.mkdir()
    monkeypatch.chdir(cwd)
    res = _log(f"sqlite:///{store / 'mlflow.db'}", "beside-db", exported)
    assert list(cwd.iterdir()) == []
    logged = _files(store / "mlruns")
    assert {"mlp_fake_quant_model.onnx", "mlp_record.txt", "manifest.json"} <= set(logged)
    assert res.run_id


def test_a_given_artifact_location_is_where_a_new_experiment_keeps_its_artifacts(exported, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    where = tmp_path / "artifacts-here"
    _log(f"sqlite:///{tmp_path / 'db' / 'mlflow.db'}", "given-location", exported, artifact_location=str(where))
    assert "mlp_record.txt" in _files(where)
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "db" / "mlruns").exists()


def test_an_artifact_location_an_existing_experiment_contradicts_is_refused_naming_both(exported, tmp_path,
                                                                                         monkeypatch):
    from tasks.tracking import TrackingError

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _log(uri, "exists", exported)
    with pytest.raises(TrackingError) as e:
        _log(uri, "exists", exported, artifact_location=str(tmp_path / "other"))
    msg = str(e.value)
    assert "'exists'" in msg and str(tmp_path / "mlruns") in msg and str(tmp_path / "other") in msg
    assert "new experiment" in msg


def test_default_artifact_location_only_for_sqlite_files():
    from tasks.tracking import default_artifact_location

    assert default_artifact_location("sqlite:////data/t/mlflow.db") == "file:///data/t/mlruns"
    assert default_artifact_location("sqlite:///rel/mlflow.db") == (Path.cwd() / "rel" / "mlruns").as_uri()
    assert default_artifact_location("sqlite:////data/t/mlflow.db?timeout=20") == "file:///data/t/mlruns"
    assert default_artifact_location("http://127.0.0.1:5000") is None
    assert default_artifact_location("postgresql://u@h/db") is None


# ---- what an export's run gets (tasks.tracking.run_payload), without MLflow -----------------------------

@pytest.fixture
def export_results(tmp_path):
    """The results of an export's stages as the logging stage reads them (files are small stand-ins)."""
    from tasks.checkpoint import CheckpointInfo
    from tasks.files import FileRef
    from tasks.parity import ParityResult
    from tasks.results import ExportResults
    from tasks.specs import GraphSpec, ModelSpec
    from tasks.stage import StageResult

    def ref(name: str, data: bytes = b"x") -> FileRef:
        (tmp_path / name).write_bytes(data)
        return FileRef.of(tmp_path / name)

    def stage(name, *files, seconds=1.0, **info):
        return StageResult(name, list(files), seconds, 100.0, info)

    spec = ModelSpec(str(tmp_path / "ck.pt"), "m:f", {}, None, [1, 4], "float32")
    ck = CheckpointInfo(spec, "runs:/abc/ck.pt", "f" * 64, 10, ["fc1", "fc2"], 0.5, 200.0)
    par = ParityResult(True, "PASS", {"parity.y.cosine": 0.999, "deploy_sim.acc_mismatches": 0.0}, [],
                       [ref("report.json"), ref("report.html"), ref("report_layers.png")], 2.0, 300.0)
    params = {"model": "m:f", "model_kwargs": {}, "input_shape": [1, 4], "input_dtype": "float32",
              "input_names": ["x"], "output_names": ["y"], "dynamic_axes": None, "parity_tolerances": None,
              "distill_config": None}
    return ExportResults(
        name="m", graph=GraphSpec("A3", 13, ["x"], ["y"]), parameters=params, checkpoint=ck,
        trace=stage("trace", ref("t.onnx")), record=stage("record", ref("r.txt"), source="model"),
        fake_quant=stage("fake_quant_build", ref("m_fake_quant_model.onnx", b"x" * 40)),
        deploy=stage("deploy_build", ref("m_deploy_model.onnx", b"x" * 10)), parity=par,
        states={"load-checkpoint": "Completed", "trace": "Cached", "record": "Cached"},
        seconds={"load-checkpoint": 0.5, "trace": 0.01, "record": 0.01})


def test_the_run_is_named_after_the_export_the_target_and_the_flow_run(export_results):
    from tasks.tracking import run_payload

    assert run_payload(export_results, "manifest.json", None, "brave-fox").run_name == "m-A3-brave-fox"
    assert run_payload(export_results, "manifest.json").run_name == "m-A3-local"


def test_the_exports_own_metrics_win_over_the_callers_of_the_same_name(export_results):
    from tasks.tracking import run_payload

    m = run_payload(export_results, "manifest.json", {"accuracy.int8": 98.9, "parity.y.cosine": 0.1}).metrics
    assert m["accuracy.int8"] == 98.9 and m["parity.y.cosine"] == 0.999
    assert m["compression_ratio"] == 4.0 and m["quantized_layer_count"] == 2 and m["peak_rss_mb"] >= 300.0
    assert m["stage_seconds.trace"] == 0.01 and m["stage_compute_seconds.trace"] == 1.0


def test_params_and_tags_name_the_target_its_socs_and_the_cached_stages(export_results):
    from tasks.tracking import run_payload

    pl = run_payload(export_results, "manifest.json", flow_run_url="http://prefect/flow-runs/1")
    assert pl.params["target"] == "A3" and pl.params["opset"] == 13 and pl.params["checkpoint"] == "runs:/abc/ck.pt"
    assert pl.params["input_names"] == '["x"]' and pl.params["record_source"] == "model"
    assert pl.tags["soc_family"] == pl.params["soc_family"] and pl.tags["atc_soc_version"] == "Ascend910_9362"
    assert pl.tags["cached_stages"] == "trace,record" and pl.tags["parity"] == "pass"
    assert pl.tags["prefect.flow_run_url"] == "http://prefect/flow-runs/1"


def test_each_file_goes_under_its_role_and_the_plots_apart_from_the_report(export_results):
    from tasks.tracking import run_payload

    arts = run_payload(export_results, "manifest.json").artifacts
    assert [Path(f).name for f in arts["parity_report"]] == ["report.json", "report.html"]
    assert [Path(f).name for f in arts["plots"]] == ["report_layers.png"]
    assert [Path(f).name for f in arts["deploy_model"]] == ["m_deploy_model.onnx"]
    assert "distill_config" not in arts  # none was given
