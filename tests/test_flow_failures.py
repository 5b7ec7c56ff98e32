"""The flow fails clearly: bad parameters fail fast naming the parameter; a stopped tracking server
is retried, then fails the flow naming the tracking URI while every exported file stays on disk."""
from __future__ import annotations

import asyncio
import hashlib
import json
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration


def _failed(params) -> tuple[str, object]:
    from flows.distill_export import distill_export

    t0 = time.monotonic()
    state = distill_export(**params, return_state=True)
    assert state.is_failed(), f"expected the flow to fail, got {state.name}: {state.message}"
    exc = state.result(raise_on_failure=False)
    return f"{state.message}\n{exc}", time.monotonic() - t0


@pytest.fixture
def base(cnn_checkpoint, tmp_path):
    return cnn_checkpoint.params(tmp_path / "export", mlflow_tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")


def _no_outputs(params):
    out = Path(params["output_dir"])
    assert not list(out.glob("*.onnx")) if out.exists() else True


def test_missing_checkpoint_fails_fast_naming_checkpoint(prefect_api, base, tmp_path):
    msg, secs = _failed({**base, "checkpoint": str(tmp_path / "nope.pt")})
    assert "parameter 'checkpoint'" in msg and "nope.pt" in msg and "does not exist" in msg
    assert secs < 20
    _no_outputs(base)


def test_unknown_target_fails_fast_naming_target(prefect_api, base):
    msg, secs = _failed({**base, "target": "A9"})
    assert "parameter 'target'" in msg and "'A9'" in msg and "A2" in msg and "950" in msg
    assert secs < 20
    _no_outputs(base)


def test_opset_outside_target_range_names_opset(prefect_api, base):
    msg, _ = _failed({**base, "target": "A2", "opset": 18})
    assert "parameter 'opset'" in msg and "18" in msg and "[8, 16]" in msg


def test_model_reference_that_does_not_import_names_model(prefect_api, base):
    msg, secs = _failed({**base, "model": "no_such_package.models:build"})
    assert "parameter 'model'" in msg and "no_such_package" in msg and "does not import" in msg
    msg2, _ = _failed({**base, "model": "tests.models:no_such_builder"})
    assert "parameter 'model'" in msg2 and "no_such_builder" in msg2
    msg3, _ = _failed({**base, "model": "tests.models.build"})
    assert "parameter 'model'" in msg3 and "package.module:callable" in msg3
    assert secs < 20
    _no_outputs(base)


def test_checkpoint_whose_keys_do_not_match_names_the_keys(prefect_api, base, cnn_checkpoint, tmp_path):
    sd = torch.load(cnn_checkpoint.checkpoint, weights_only=True)
    sd.pop("conv2.clip_max")
    sd["head.weight"] = torch.zeros(3)
    bad = tmp_path / "mismatch.pt"
    torch.save(sd, bad)
    msg, secs = _failed({**base, "checkpoint": str(bad)})
    assert "parameter 'checkpoint'" in msg
    assert "missing keys ['conv2.clip_max']" in msg and "unexpected keys ['head.weight']" in msg
    assert secs < 30
    _no_outputs(base)


def test_checkpoint_with_code_is_refused_not_executed(prefect_api, base, tmp_path):
    marker = tmp_path / "executed"
    bad = tmp_path / "evil.pt"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"conv1.weight": Evil()}, bad)
    msg, _ = _failed({**base, "checkpoint": str(bad)})
    assert "parameter 'checkpoint'" in msg and "weights_only=True" in msg
    assert not marker.exists()


def test_bad_dynamic_axes_and_tolerances_name_the_parameter(prefect_api, base):
    msg, _ = _failed({**base, "dynamic_axes": {"nonexistent": [0]}})
    assert "parameter 'dynamic_axes'" in msg and "nonexistent" in msg
    msg, _ = _failed({**base, "parity_tolerances": {"cosine_minimum": 0.9}})
    assert "parameter 'parity_tolerances'" in msg and "cosine_minimum" in msg


def test_stopped_tracking_server_is_retried_then_fails_naming_the_uri(prefect_api, cnn_checkpoint, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.distill_export import distill_export
    from tests import services

    server = services.start_mlflow_server(tmp_path / "mlflow")
    uri = server.url
    server.stop()  # the tracking server is gone when the flow logs
    params = cnn_checkpoint.params(tmp_path / "export", mlflow_tracking_uri=uri, mlflow_retries=2,
                                   mlflow_retry_delay_seconds=0.2)
    state = distill_export(**params, return_state=True)
    assert state.is_failed()
    msg = f"{state.message}\n{state.result(raise_on_failure=False)}"
    assert uri in msg and "tracking" in msg.lower()
    assert "3 attempt" in msg

    async def runs():
        async with get_client() as c:
            return await c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))

    log_runs = [r for r in asyncio.run(runs()) if r.name.startswith("mlflow-log")]
    assert len(log_runs) == 1 and log_runs[0].run_count == 3, [(r.name, r.run_count) for r in log_runs]
    assert log_runs[0].state.is_failed()
    # every exported file is on disk and matches the manifest
    out = Path(params["output_dir"])
    manifest = json.loads((out / "manifest.json").read_text())
    n = 0
    for entries in manifest["files"].values():
        for e in entries:
            assert hashlib.sha256((out / e["path"]).read_bytes()).hexdigest() == e["sha256"], e["path"]
            n += 1
    assert n >= 6 and (out / "cnn_fake_quant_model.onnx").is_file() and (out / "cnn_deploy_model.onnx").is_file()


def test_non_transient_mlflow_error_is_not_retried(prefect_api, cnn_checkpoint, tmp_path):
    """A request the server refuses (here: a file path where the SQLite store should be) fails at once."""
    from flows.distill_export import distill_export

    (tmp_path / "not-a-dir").write_text("x")
    uri = f"sqlite:///{tmp_path / 'not-a-dir' / 'mlflow.db'}"
    params = cnn_checkpoint.params(tmp_path / "export", mlflow_tracking_uri=uri, mlflow_retries=3,
                                   mlflow_retry_delay_seconds=5)
    t0 = time.monotonic()
    state = distill_export(**params, return_state=True)
    assert state.is_failed()
    msg = str(state.result(raise_on_failure=False))
    assert uri in msg and "after 1 attempt" in msg
    assert time.monotonic() - t0 < 60  # no 5 + 10 + 20 s of retries
    assert (tmp_path / "export" / "cnn_deploy_model.onnx").is_file()


def test_parity_failure_is_logged_then_fails_the_flow_naming_the_worst_layer(prefect_api, cnn_checkpoint, tmp_path):
    import mlflow

    from flows.distill_export import ParityFailed, distill_export

    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = cnn_checkpoint.params(tmp_path / "export", mlflow_tracking_uri=db,
                                   parity_tolerances={"layer_sqnr_min_db": 400.0})
    state = distill_export(**params, return_state=True)
    assert state.is_failed()
    exc = state.result(raise_on_failure=False)
    assert isinstance(exc, ParityFailed)
    assert "FAIL" in str(exc) and "layer" in str(exc) and "MLflow run" in str(exc)
    run_id = str(exc).split("MLflow run ")[1].split(";")[0]
    mlflow.set_tracking_uri(db)
    run = mlflow.get_run(run_id)
    assert run.data.tags["parity"] == "fail" and run.data.metrics["parity.passed"] == 0.0
    assert (tmp_path / "export" / "cnn_deploy_model.onnx").is_file()
    assert json.loads((tmp_path / "export" / "parity" / "report.json").read_text())["verdict"] == "fail"
