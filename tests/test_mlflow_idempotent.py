"""MLflow logging is idempotent per flow run, and a run whose logging gives up does not stay RUNNING.

Against real `mlflow server` processes on 127.0.0.1. Faults are placed exactly through
``tasks.tracking.fault_hook`` (called at each step of ``log_run``): a test kills the server (SIGKILL) right
after the model version is registered, restarts it when the next attempt starts, or raises mid-run."""
from __future__ import annotations

import json
import uuid

import pytest

from tests import services

pytestmark = pytest.mark.integration


@pytest.fixture
def hook(monkeypatch):
    """Set ``tasks.tracking.fault_hook`` for one test: ``hook(fn)``; the steps reached are in ``hook.steps``."""
    from tasks import tracking

    class Hook:
        def __init__(self):
            self.steps: list[tuple[str, dict]] = []

        def __call__(self, fn):
            def wrapped(step, info):
                self.steps.append((step, dict(info)))
                fn(step, info)
            monkeypatch.setattr(tracking, "fault_hook", wrapped)

    return Hook()


@pytest.fixture(scope="module")
def payload(mlp_export, tmp_path_factory):
    """What log_run gets for the exported MLP: a few params, metrics, tags, files of three roles, a manifest."""
    from tasks.tracking import RunPayload

    d = mlp_export
    extra = tmp_path_factory.mktemp("idempotent")
    (extra / "manifest.json").write_text(json.dumps({"name": "mlp"}))
    fq = d / "mlp_fake_quant_model.onnx"
    return RunPayload("mlp-A2-test", {"target": "A2", "opset": 11}, {"parity.passed": 1.0, "peak_rss_mb": 10.0},
                      {"target": "A2"},
                      {"fake_quant_model": [str(fq)], "deploy_model": [str(d / "mlp_deploy_model.onnx")],
                       "record": [str(d / "mlp_record.txt")]},
                      str(extra / "manifest.json"), str(fq), [([1, 20], "float32")])


def _spec(url: str, experiment: str, registered: str | None = None):
    from tasks.specs import TrackingSpec

    return TrackingSpec(experiment=experiment, tracking_uri=url, registered_model_name=registered)


def _runs_of(client, experiment: str, key: str):
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`prefect.flow_run_id` = '{key}'")


def _logged_models(client, experiment: str, run_id: str):
    exp = client.get_experiment_by_name(experiment)
    return client.search_logged_models([exp.experiment_id], filter_string=f"source_run_id = '{run_id}'")


class Injected(RuntimeError):
    pass


def raise_at(at: str, exc: BaseException):
    """A fault hook raising ``exc`` each time log_run reaches step ``at``."""
    def fn(step, info):
        if step == at:
            raise exc
    return fn


# ---- one attempt after another (log_run called again with the same flow run id) ----------------------------

def test_a_second_attempt_completes_the_run_the_first_left_after_registering_without_adding_anything(
        mlflow_server, payload, hook):
    from mlflow.tracking import MlflowClient

    from tasks.tracking import TrackingUnavailable, log_run

    key, name = str(uuid.uuid4()), f"mlp-{uuid.uuid4().hex[:8]}"

    def fail_after_registering(step, info):
        if step == "registered" and sum(s == "registered" for s, _ in hook.steps) == 1:
            raise ConnectionError("connection refused (injected)")
    hook(fail_after_registering)
    with pytest.raises(TrackingUnavailable) as e:
        log_run(_spec(mlflow_server.url, "idem-direct", name), payload, key)
    client = MlflowClient(mlflow_server.url)
    assert e.value.run_id and e.value.run_status == "FAILED"
    assert client.get_model_version(name, "1").tags == {}  # registered, not tagged yet
    res = log_run(_spec(mlflow_server.url, "idem-direct", name), payload, key)
    assert res.run_id == e.value.run_id and res.registered_version == "1"
    runs = _runs_of(client, "idem-direct", key)
    assert [r.info.run_id for r in runs] == [res.run_id] and runs[0].info.status == "FINISHED"
    versions = client.search_model_versions(f"name = '{name}'")
    assert [v.version for v in versions] == ["1"]
    assert versions[0].tags == {"deploy_model": f"runs:/{res.run_id}/models/deploy/mlp_deploy_model.onnx",
                                "target": "A2"}
    assert [m.model_id for m in _logged_models(client, "idem-direct", res.run_id)] == [res.model_uri.split("/")[-1]]
    assert [m.value for m in client.get_metric_history(res.run_id, "peak_rss_mb")] == [10.0]
    assert runs[0].data.params == {"target": "A2", "opset": "11"}


def test_a_retry_uploads_again_only_the_artifact_an_interrupted_upload_left_short(mlflow_server, payload, tmp_path,
                                                                                  hook, monkeypatch):
    from mlflow.tracking import MlflowClient

    from tasks.tracking import TrackingError, log_run

    key = str(uuid.uuid4())
    hook(raise_at("artifacts", Injected("stop")))
    with pytest.raises(TrackingError):
        log_run(_spec(mlflow_server.url, "idem-artifacts"), payload, key)
    client = MlflowClient(mlflow_server.url)
    run_id = _runs_of(client, "idem-artifacts", key)[0].info.run_id
    record = payload.artifacts["record"][0]
    cut = tmp_path / "mlp_record.txt"
    cut.write_bytes(open(record, "rb").read()[:-10])  # what an upload cut short leaves
    client.log_artifact(run_id, str(cut), "record")
    uploads = []
    real = MlflowClient.log_artifact
    monkeypatch.setattr(MlflowClient, "log_artifact",
                        lambda self, rid, local, where=None: uploads.append((local, where)) or real(self, rid, local, where))
    hook(lambda step, info: None)
    log_run(_spec(mlflow_server.url, "idem-artifacts"), payload, key)
    assert uploads == [(record, "record")]
    got = client.download_artifacts(run_id, "record/mlp_record.txt", str(tmp_path / "dl"))
    assert open(got, "rb").read() == open(record, "rb").read()


def test_two_exports_logged_in_one_flow_run_get_a_run_each_and_a_retry_finds_its_own(mlflow_server, payload,
                                                                                     tmp_path):
    import dataclasses

    from mlflow.tracking import MlflowClient

    from tasks.tracking import log_run

    key = str(uuid.uuid4())  # one flow run (a batch) logging two exports, each with its own manifest
    (tmp_path / "manifest.json").write_text(json.dumps({"name": "other"}))
    other = dataclasses.replace(payload, manifest=str(tmp_path / "manifest.json"))
    first = log_run(_spec(mlflow_server.url, "idem-batch"), payload, key)
    second = log_run(_spec(mlflow_server.url, "idem-batch"), other, key)
    again = log_run(_spec(mlflow_server.url, "idem-batch"), payload, key)
    assert first.run_id != second.run_id and again.run_id == first.run_id
    assert len(_runs_of(MlflowClient(mlflow_server.url), "idem-batch", key)) == 2


def test_a_param_the_run_has_with_another_value_is_an_error_naming_it(mlflow_server, payload):
    import dataclasses

    from mlflow.tracking import MlflowClient

    from tasks.tracking import TrackingError, log_run

    key = str(uuid.uuid4())
    log_run(_spec(mlflow_server.url, "idem-params"), payload, key)
    other = dataclasses.replace(payload, params={**payload.params, "opset": 13})
    with pytest.raises(TrackingError) as e:
        log_run(_spec(mlflow_server.url, "idem-params"), other, key)
    assert "'opset'" in str(e.value) and "'11'" in str(e.value) and "'13'" in str(e.value)
    assert e.value.run_status == "FAILED"
    run = MlflowClient(mlflow_server.url).get_run(e.value.run_id)
    assert run.data.params["opset"] == "11" and run.info.status == "FAILED"


def test_an_unfinished_logged_model_of_an_interrupted_attempt_is_replaced_by_one_ready_model(mlflow_server, payload,
                                                                                             hook):
    from mlflow.tracking import MlflowClient

    from tasks.tracking import MODEL_NAME, TrackingError, log_run

    key = str(uuid.uuid4())
    hook(raise_at("artifacts", Injected("stop")))
    with pytest.raises(TrackingError) as e:
        log_run(_spec(mlflow_server.url, "idem-model"), payload, key)
    client = MlflowClient(mlflow_server.url)
    exp = client.get_experiment_by_name("idem-model").experiment_id
    left = client.create_logged_model(exp, name=MODEL_NAME, source_run_id=e.value.run_id)  # PENDING, no files
    hook(lambda step, info: None)
    res = log_run(_spec(mlflow_server.url, "idem-model"), payload, key)
    models = _logged_models(client, "idem-model", res.run_id)
    assert len(models) == 1 and models[0].model_id != left.model_id and "READY" in str(models[0].status)


# ---- giving up: FAILED, KILLED, or said to stay RUNNING ------------------------------------------------------

def test_an_error_mid_run_ends_the_run_failed_and_names_it(mlflow_server, payload, hook):
    from mlflow.tracking import MlflowClient

    from tasks.tracking import TrackingError, log_run

    hook(raise_at("artifacts", Injected("disk quota")))
    with pytest.raises(TrackingError) as e:
        log_run(_spec(mlflow_server.url, "idem-failed"), payload, str(uuid.uuid4()))
    assert "disk quota" in str(e.value) and mlflow_server.url in str(e.value)
    assert e.value.run_status == "FAILED"
    assert MlflowClient(mlflow_server.url).get_run(e.value.run_id).info.status == "FAILED"


def test_a_keyboard_interrupt_during_logging_ends_the_run_killed(mlflow_server, payload, hook):
    from mlflow.tracking import MlflowClient

    from tasks.tracking import log_run

    key = str(uuid.uuid4())
    hook(raise_at("artifacts", KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        log_run(_spec(mlflow_server.url, "idem-killed"), payload, key)
    client = MlflowClient(mlflow_server.url)
    [run] = _runs_of(client, "idem-killed", key)
    assert run.info.status == "KILLED"


SIGTERM_SCRIPT = """
import json, os, signal, sys, time
from prefect import flow, task
from tasks import tracking
from tasks.specs import TrackingSpec
from tasks.tracking import RunPayload, log_run

url, key, payload = sys.argv[1], sys.argv[2], RunPayload(**json.loads(open(sys.argv[3]).read()))

def terminate(step, info):
    if step == "artifacts":
        os.kill(os.getpid(), signal.SIGTERM)  # as a worker cancelling the flow run does
        time.sleep(60)

tracking.fault_hook = terminate

@task
def log_task():
    return log_run(TrackingSpec(experiment="idem-sigterm", tracking_uri=url), payload, key)

@flow
def logging_flow():
    return log_task()

logging_flow()
"""


def test_a_sigterm_of_the_flow_during_logging_ends_the_run_killed(prefect_server, mlflow_server, payload, tmp_path):
    import dataclasses
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    key = str(uuid.uuid4())
    (tmp_path / "payload.json").write_text(json.dumps(dataclasses.asdict(payload)))
    (tmp_path / "script.py").write_text(SIGTERM_SCRIPT)
    env = services.base_env(tmp_path / "prefect-home", PREFECT_API_URL=prefect_server.url,
                            PYTHONPATH=str(services.REPO))
    done = subprocess.run([sys.executable, str(tmp_path / "script.py"), mlflow_server.url, key,
                           str(tmp_path / "payload.json")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=180, start_new_session=True)
    assert done.returncode != 0, done.stdout + done.stderr
    [run] = _runs_of(MlflowClient(mlflow_server.url), "idem-sigterm", key)
    assert run.info.status == "KILLED", done.stdout[-2000:] + done.stderr[-2000:]


# ---- through the flow, with Prefect's retries and a real server killed and restarted -------------------------

def _flow_params(cnn_checkpoint, tmp_path, url, **extra):
    return cnn_checkpoint.params(tmp_path / "export", mlflow_tracking_uri=url, **extra)


def test_server_killed_after_registration_and_restarted_within_the_retries_gives_one_run_one_complete_version(
        prefect_api, cnn_checkpoint, tmp_path, hook):
    from mlflow.tracking import MlflowClient

    from flows.distill_export import distill_export

    server = services.start_mlflow_server(tmp_path / "mlflow")
    state = {"server": server}
    try:
        def kill_then_restart(step, info):
            if step == "registered" and state["server"] is server:
                server.kill()  # SIGKILL right after the version is created, before it is tagged
                state["killed"] = True
            elif step == "start" and state.get("killed") and not state["server"].alive():
                state["server"] = services.restart_mlflow_server(server)  # same port, same stores
        hook(kill_then_restart)
        params = _flow_params(cnn_checkpoint, tmp_path, server.url, mlflow_experiment="idem-flow",
                              registered_model_name="cnn-idem", mlflow_retries=2, mlflow_retry_delay_seconds=0.2)
        flow_state = distill_export(**params, return_state=True)
        assert flow_state.is_completed(), flow_state.message
        summary = flow_state.result()
        assert [s for s, _ in hook.steps].count("start") == 2  # one retry
        client = MlflowClient(server.url)
        exp = client.get_experiment_by_name("idem-flow")
        runs = client.search_runs([exp.experiment_id])
        assert [r.info.run_id for r in runs] == [summary["mlflow_run_id"]]
        assert runs[0].info.status == "FINISHED"
        versions = client.search_model_versions("name = 'cnn-idem'")
        assert [(v.version, v.run_id) for v in versions] == [("1", summary["mlflow_run_id"])]
        assert versions[0].tags == {
            "deploy_model": f"runs:/{summary['mlflow_run_id']}/models/deploy/cnn_deploy_model.onnx",
            "target": "A2"}
        assert summary["registered_version"] == "1"
        assert len(_logged_models(client, "idem-flow", summary["mlflow_run_id"])) == 1
        assert len(client.get_metric_history(summary["mlflow_run_id"], "parity.passed")) == 1
    finally:
        state["server"].stop()
        server.stop()


def test_logging_that_gives_up_after_its_retries_ends_the_run_failed(prefect_api, mlflow_server, cnn_checkpoint,
                                                                     tmp_path, hook):
    from mlflow.tracking import MlflowClient

    from flows.distill_export import LoggingFailed, distill_export

    hook(raise_at("artifacts", ConnectionError("connection reset (injected)")))
    params = _flow_params(cnn_checkpoint, tmp_path, mlflow_server.url, mlflow_experiment="idem-gives-up",
                          mlflow_retries=1, mlflow_retry_delay_seconds=0.1)
    state = distill_export(**params, return_state=True)
    assert state.is_failed()
    err = state.result(raise_on_failure=False)
    assert isinstance(err, LoggingFailed) and "after 2 attempt(s)" in str(err)
    client = MlflowClient(mlflow_server.url)
    runs = client.search_runs([client.get_experiment_by_name("idem-gives-up").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    assert f"MLflow run {runs[0].info.run_id} ended FAILED" in str(err)


def test_a_server_gone_when_logging_gives_up_leaves_the_run_running_and_the_error_says_so(
        prefect_api, cnn_checkpoint, tmp_path, hook):
    from mlflow.tracking import MlflowClient

    from flows.distill_export import distill_export

    server = services.start_mlflow_server(tmp_path / "mlflow")
    try:
        hook(lambda step, info: server.kill() if step == "artifacts" else None)
        params = _flow_params(cnn_checkpoint, tmp_path, server.url, mlflow_experiment="idem-gone",
                              mlflow_retries=1, mlflow_retry_delay_seconds=0.1)
        state = distill_export(**params, return_state=True)
        assert state.is_failed()
        msg = str(state.result(raise_on_failure=False))
        run_id = next(info["run_id"] for step, info in hook.steps if step == "run")
        assert f"MLflow run {run_id} stays RUNNING" in msg and server.url in msg
    finally:
        server.stop()
    store = MlflowClient(f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")  # the stopped server's own store
    assert store.get_run(run_id).info.status == "RUNNING"  # what the message said
