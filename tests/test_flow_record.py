"""A given record file is validated against the model and used for both builds; a bad one fails the
flow naming record_file and the layer."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def model_record(prefect_api, cnn_checkpoint, tmp_path_factory):
    """The record the flow writes from the model (first run, no record_file)."""
    from flows.distill_export import distill_export

    d = tmp_path_factory.mktemp("flow-record")
    params = cnn_checkpoint.params(d / "from-model", mlflow_tracking_uri=f"sqlite:///{d / 'mlflow.db'}")
    state = distill_export(**params, return_state=True)
    assert state.is_completed(), state.message
    return Path(state.result()["record_file"]), d


def test_given_record_is_validated_and_used(model_record, cnn_checkpoint):
    import mlflow

    from flows.distill_export import distill_export

    record, d = model_record
    given = d / "given_record.txt"
    given.write_text(record.read_text())
    params = cnn_checkpoint.params(d / "given", record_file=str(given), mlflow_tracking_uri=f"sqlite:///{d / 'mlflow.db'}")
    state = distill_export(**params, return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["record_file"] == str(given.resolve())
    assert not (d / "given" / "cnn_scale_offset_record.txt").exists()
    manifest = json.loads((d / "given" / "manifest.json").read_text())
    assert manifest["files"]["record"][0]["path"] == str(given.resolve())
    mlflow.set_tracking_uri(f"sqlite:///{d / 'mlflow.db'}")
    assert mlflow.get_run(summary["mlflow_run_id"]).data.params["record_source"] == "given"
    # the deploy model is the one built from the model's own (identical) record, but for its export id
    import onnx

    def without_id(path):
        m = onnx.load(str(path))
        kept = [p for p in m.metadata_props if p.key != "amct.export_id"]
        assert len(kept) == len(m.metadata_props) - 1
        del m.metadata_props[:]
        m.metadata_props.extend(kept)
        return m.SerializeToString()

    assert without_id(d / "given" / "cnn_deploy_model.onnx") == without_id(d / "from-model" / "cnn_deploy_model.onnx")


def test_record_missing_a_layer_fails_naming_record_file_and_layer(model_record, cnn_checkpoint):
    from amct_core.record import read_record, write_record
    from flows.distill_export import distill_export

    record, d = model_record
    recs = read_record(record)
    recs.pop("dilated")
    bad = d / "partial_record.txt"
    write_record(bad, recs)
    params = cnn_checkpoint.params(d / "bad", record_file=str(bad), mlflow_tracking_uri=f"sqlite:///{d / 'mlflow.db'}")
    state = distill_export(**params, return_state=True)
    assert state.is_failed()
    msg = str(state.result(raise_on_failure=False))
    assert "parameter 'record_file'" in msg and "'dilated'" in msg
    assert not (d / "bad" / "cnn_deploy_model.onnx").exists()


def test_missing_record_file_fails_fast(model_record, cnn_checkpoint):
    from flows.distill_export import distill_export

    _, d = model_record
    params = cnn_checkpoint.params(d / "none", record_file=str(d / "nope.txt"))
    state = distill_export(**params, return_state=True)
    assert state.is_failed()
    assert "parameter 'record_file'" in str(state.result(raise_on_failure=False))


def test_the_flow_stamps_one_export_id_into_its_three_files(model_record):
    from amct_core.export_id import record_stamp
    from amct_core.onnx.mapped import read_metadata

    record, d = model_record
    ids = {read_metadata(d / "from-model" / f"cnn_{kind}_model.onnx")["amct.export_id"] for kind in ("fake_quant", "deploy")}
    assert ids == {record_stamp(record).export_id}
    assert len(ids.pop()) == 32
