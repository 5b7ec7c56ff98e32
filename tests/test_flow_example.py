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
    assert {"nightly", "on-demand"} <= set(deps)
    for d in deps.values():
        assert d["entrypoint"] == "flows/distill_export.py:distill_export"
        assert d["work_pool"]["name"] == "amct-process"
    (sched,) = deps["nightly"]["schedules"]
    assert sched["cron"] and sched["timezone"]
    assert not deps["on-demand"]["schedules"]


def test_nightly_parameters_export_the_digits_example(prefect_api, tmp_path, monkeypatch):
    import numpy as np
    import torch

    from examples.digits import load_digits_split, ort_predict, predict, run_demo
    from flows.distill_export import distill_export

    monkeypatch.chdir(tmp_path)  # the deployment's relative paths resolve against the working directory
    torch.set_num_threads(1)
    res = run_demo("digits_out", epochs=1, teacher_epochs=5, export=False, verbose=False)
    params = dict(_deployments()["nightly"]["parameters"])
    assert Path(params["checkpoint"]).resolve() == Path(res.files["student"]).resolve()
    state = distill_export(**params, mlflow_tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", return_state=True)
    assert state.is_completed(), state.message
    s = state.result()
    assert s["parity_passed"]
    split = load_digits_split(0)
    from tasks._common import ModelSpec, build_model as rebuild

    student = rebuild(ModelSpec(params["checkpoint"], params["model"], {}, params["distill_config"], params["input_shape"]))
    agree = float((ort_predict(s["fake_quant_model"], split.x_test) == predict(student, split.x_test)).mean())
    assert agree >= 0.995
    manifest = json.loads(Path(s["manifest"]).read_text())
    assert manifest["target"] == params["target"]
    assert np.isfinite(manifest["parity"]["metrics"]["verify.passed"])
