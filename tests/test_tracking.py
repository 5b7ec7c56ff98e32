"""tasks/tracking.py against MLflow's SQLite store: where artifacts go, what a run holds."""
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
