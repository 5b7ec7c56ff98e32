"""Re-runs: unchanged inputs skip the heavy stages (asserted on task-run states in the Prefect API)."""
from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

HEAVY = ("trace", "record", "fake-quant-build", "deploy-build", "parity")


def task_states(flow_run_id) -> dict[str, str]:
    """{task name: state names joined by '+', in start order} of one flow run, read from the Prefect server.

    A stage that ran once shows one state ('Cached' or 'Completed'); a cached stage whose files had been
    removed shows 'Cached+Completed' (served from cache, found broken, recomputed)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read():
        async with get_client() as c:
            runs = await c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            out: dict[str, list] = {}
            for r in sorted(runs, key=lambda r: (r.start_time or r.expected_start_time or r.created)):
                out.setdefault(r.name.rsplit("-", 1)[0], []).append(r.state.name)
            return {k: "+".join(v) for k, v in out.items()}

    return asyncio.run(read())


def _run(params):
    from flows.distill_export import distill_export

    state = distill_export(**params, return_state=True)
    assert state.is_completed(), state.message
    return state


@pytest.fixture(scope="module")
def first_run(prefect_api, cnn_checkpoint, tmp_path_factory):
    d = tmp_path_factory.mktemp("flow-cache")
    ck = d / "checkpoint.pt"  # a private copy: one test changes its content in place
    shutil.copyfile(cnn_checkpoint.checkpoint, ck)
    params = cnn_checkpoint.params(d / "export", checkpoint=str(ck), mlflow_tracking_uri=f"sqlite:///{d / 'mlflow.db'}",
                                   mlflow_experiment="cache-test")
    state = _run(params)
    return params, state, d


def test_first_run_computes_every_stage(first_run):
    _, state, _ = first_run
    states = task_states(state.state_details.flow_run_id)
    for t in HEAVY:
        assert states[t] == "Completed", states


def test_rerun_with_unchanged_inputs_skips_heavy_stages(first_run):
    params, first, _ = first_run
    before = {p: p.stat().st_mtime_ns for p in Path(params["output_dir"]).glob("*.onnx")}
    state = _run(params)
    states = task_states(state.state_details.flow_run_id)
    for t in HEAVY:
        assert states[t] == "Cached", states
    assert states["mlflow-log"] == "Completed"  # still one MLflow run per flow run
    assert {p: p.stat().st_mtime_ns for p in Path(params["output_dir"]).glob("*.onnx")} == before
    assert state.result()["mlflow_run_id"] != first.result()["mlflow_run_id"]


def test_force_recomputes_everything(first_run):
    params, _, _ = first_run
    state = _run({**params, "force": True})
    states = task_states(state.state_details.flow_run_id)
    for t in HEAVY:
        assert states[t] == "Completed", states


def test_deleted_output_is_rebuilt_not_served_from_cache(first_run):
    params, _, _ = first_run
    deploy = Path(params["output_dir"]) / "cnn_deploy_model.onnx"
    deploy.unlink()
    state = _run(params)
    assert deploy.is_file()
    states = task_states(state.state_details.flow_run_id)
    assert states["deploy-build"] == "Cached+Completed", states
    assert states["trace"] == "Cached", states


def test_changed_parameter_value_recomputes(first_run):
    params, _, _ = first_run
    state = _run({**params, "opset": 13})
    states = task_states(state.state_details.flow_run_id)
    assert states["trace"] == "Completed", states


def test_changed_checkpoint_content_recomputes(first_run, cnn_checkpoint):
    import torch

    params, _, d = first_run
    # same path, same parameters, new content (runs last: it changes the module's checkpoint)
    sd = torch.load(params["checkpoint"], weights_only=True)
    sd["fc.bias"] = sd["fc.bias"] + 0.25
    torch.save(sd, params["checkpoint"])
    state = _run(params)
    states = task_states(state.state_details.flow_run_id)
    assert states["trace"] == "Completed" and states["deploy-build"] == "Completed", states
