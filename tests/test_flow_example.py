"""The nightly deployment's parameters (prefect.yaml) run the bundled digits example through the flow."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.services import REPO

pytestmark = pytest.mark.integration


def _deployments() -> dict:
    return {d["name"]: d for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]}


def test_prefect_yaml_has_a_nightly_schedule_with_timezone_and_an_on_demand_deployment():
    deps = _deployments()
    assert {"nightly", "on-demand", "nightly-batch"} <= set(deps)
    entrypoints = {"nightly": "flows/distill_export.py:distill_export",
                   "on-demand": "flows/distill_export.py:distill_export",
                   "nightly-batch": "flows/batch.py:distill_export_batch"}
    for name, d in deps.items():
        assert d["entrypoint"] == entrypoints[name], name
        assert d["work_pool"]["name"] == "amct-process"
    for name in ("nightly", "nightly-batch"):
        (sched,) = deps[name]["schedules"]
        assert sched["cron"] and sched["timezone"]
    assert not deps["on-demand"]["schedules"]


def test_the_nightly_batch_deployment_runs_the_shipped_example_batch_file():
    spec = _deployments()["nightly-batch"]["parameters"]["spec"]
    assert spec == "examples/batch.yaml" and (Path(__file__).parents[1] / spec).is_file()


@pytest.fixture(scope="module")
def nightly(prefect_api, tmp_path_factory):
    """The nightly deployment's parameters run in a fresh working directory after the demo wrote its files."""
    import os

    import torch

    from examples.digits import run_demo
    from flows.distill_export import distill_export

    cwd = tmp_path_factory.mktemp("nightly")
    old = os.getcwd()
    os.chdir(cwd)  # the deployment's relative paths resolve against the working directory
    try:
        torch.set_num_threads(1)
        res = run_demo("digits_out", epochs=1, teacher_epochs=5, export=False, verbose=False)
        params = dict(_deployments()["nightly"]["parameters"])
        assert Path(params["checkpoint"]).resolve() == Path(res.files["student"]).resolve()
        state = distill_export(**params, mlflow_tracking_uri=f"sqlite:///{cwd / 'mlflow.db'}", return_state=True)
    finally:
        os.chdir(old)
    assert state.is_completed(), state.message
    return state.result(), params, cwd


def test_nightly_parameters_export_the_digits_example(nightly):
    import numpy as np

    from examples.digits import load_digits_split, ort_predict, predict

    s, params, cwd = nightly
    assert s["parity_passed"]
    split = load_digits_split(0)
    from tasks.model import build_model as rebuild
    from tasks.specs import ModelSpec

    student = rebuild(ModelSpec(str(cwd / params["checkpoint"]), params["model"], {},
                                str(cwd / params["distill_config"]), params["input_shape"]))
    agree = float((ort_predict(s["fake_quant_model"], split.x_test) == predict(student, split.x_test)).mean())
    assert agree >= 0.995
    manifest = json.loads(Path(s["manifest"]).read_text())
    assert manifest["target"] == params["target"]
    assert np.isfinite(manifest["parity"]["metrics"]["verify.passed"])


def test_nightly_registers_each_export_as_a_model_version(nightly):
    from mlflow.tracking import MlflowClient

    s, params, cwd = nightly
    assert params["registered_model_name"] == s["registered_model"] == "digits-int8"
    client = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
    (mv,) = client.search_model_versions("name = 'digits-int8'")
    assert str(mv.version) == s["registered_version"] == "1" and mv.run_id == s["mlflow_run_id"]
    assert mv.tags["deploy_model"] == f"runs:/{mv.run_id}/models/deploy/digits_deploy_model.onnx"
