"""prefect.yaml end to end: a real Prefect server and process worker; `prefect deploy --all` from the repo,
then `prefect deployment run` of the on-demand deployment reaches Completed and writes its outputs."""
from __future__ import annotations

import json
import re
import time

import pytest

from tests import services

pytestmark = [pytest.mark.integration, pytest.mark.slow]

POOL = "amct-process"  # prefect.yaml's work pool


def _cli(args, prefect_server, home):
    r = services.prefect_cli(args, home, prefect_server.url)
    assert r.returncode == 0, f"prefect {' '.join(args)} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def _flow_run(api: str, flow_run_id: str) -> dict:
    return services.api_json(f"{api}/flow_runs/{flow_run_id}")


def test_deploy_all_then_run_on_demand_deployment(prefect_server, cnn_checkpoint, tmp_path):
    home = tmp_path / "prefect-cli-home"
    _cli(["work-pool", "create", POOL, "--type", "process", "--overwrite"], prefect_server, home)
    out = _cli(["deploy", "--all"], prefect_server, home)
    assert "distill-export/nightly" in out and "distill-export/on-demand" in out

    # both deployments exist; the nightly one has a cron schedule with a timezone and the example parameters
    deps = {d["name"]: d for d in services.api_json(f"{prefect_server.url}/deployments/filter", {})}
    assert {"nightly", "on-demand"} <= set(deps)
    sched = deps["nightly"]["schedules"][0]["schedule"]
    assert sched["cron"] and sched["timezone"]
    assert deps["nightly"]["parameters"]["model"] == "examples.digits:build_model"
    assert deps["on-demand"]["work_pool_name"] == POOL and not deps["on-demand"]["schedules"]

    worker = services.start_prefect_worker(
        tmp_path / "worker-home", prefect_server.url, POOL, cwd=tmp_path,
        env_extra={"PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "5",
                   "PYTHONPATH": str(services.REPO), "OMP_NUM_THREADS": "1"},
    )
    try:
        export = tmp_path / "export"
        params = cnn_checkpoint.params(export, mlflow_tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                                       mlflow_experiment="deployment-test")
        r = services.prefect_cli(["deployment", "run", "distill-export/on-demand", "--params", json.dumps(params)],
                                 home, prefect_server.url)
        assert r.returncode == 0, r.stdout + r.stderr
        m = re.search(r"UUID:\s*([0-9a-f-]{36})", r.stdout)
        assert m, r.stdout
        fr_id = m.group(1)
        deadline = time.monotonic() + 240
        state = None
        while time.monotonic() < deadline:
            fr = _flow_run(prefect_server.url, fr_id)
            state = fr["state"]["type"] if fr.get("state") else None
            if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            assert worker.alive(), f"worker died:\n{worker.log_tail()}"
            time.sleep(1)
        assert state == "COMPLETED", f"flow run {fr_id} ended {state}: {fr['state'].get('message')}\n{worker.log_tail(80)}"
        assert fr["state"]["name"] == "Completed"
        for f in ("cnn_fake_quant_model.onnx", "cnn_deploy_model.onnx", "cnn_scale_offset_record.txt", "manifest.json",
                  "parity/report.html", "parity/report.json"):
            assert (export / f).is_file(), f
        manifest = json.loads((export / "manifest.json").read_text())
        assert manifest["target"] == "A2" and manifest["parity"]["passed"]
        assert (tmp_path / "mlflow.db").is_file()
    finally:
        worker.stop()
    assert not worker.alive()
