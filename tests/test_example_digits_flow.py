"""The README's main job: `python -m examples.digits_flow` (what scripts/run-example runs) trains and distills
the digits example, runs the distill-export flow on its checkpoint, and reports the accuracy figures in the
terminal, in results.json and in the flow's MLflow run."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests import services

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def demo(prefect_api, tmp_path_factory):
    """One distillation epoch, against the session's Prefect server, in an empty working directory."""
    cwd = tmp_path_factory.mktemp("demo")
    env = services.base_env(PREFECT_API_URL=prefect_api, PYTHONPATH=str(services.REPO))
    r = subprocess.run([sys.executable, "-m", "examples.digits_flow", "--epochs", "1", "--mlflow-tracking-uri",
                        f"sqlite:///{cwd / 'mlflow.db'}"], capture_output=True, text=True, cwd=cwd, env=env,
                       timeout=600, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r, cwd


def _printed_percent(stdout: str, row: str) -> float:
    line = next(line for line in stdout.splitlines() if row in line)
    return float(line.split("|")[2].strip().rstrip("%").strip())


def test_the_demo_runs_the_digits_example_through_the_flow(demo):
    r, cwd = demo
    assert "int8, distilled (fake-quant ONNX, ONNX Runtime)" in r.stdout
    row = next(line for line in r.stdout.splitlines() if "fake-quant ONNX, ONNX Runtime" in line)
    assert "n/a" not in row
    for f in ("digits_fake_quant_model.onnx", "digits_deploy_model.onnx", "manifest.json", "parity/report.html"):
        assert (cwd / "digits_out" / "export" / f).is_file(), f


def test_the_demos_results_json_holds_the_figures_the_terminal_shows(demo):
    r, cwd = demo
    res = json.loads((cwd / "digits_out" / "results.json").read_text())
    for key, row in [("fp32_teacher", "fp32 teacher (torch)"), ("int8_calibration_only", "calibration only (torch)"),
                     ("int8_distilled_torch", "int8, distilled (torch)"),
                     ("int8_distilled_ort", "fake-quant ONNX, ONNX Runtime")]:
        assert res[key] is not None and round(res[key], 2) == _printed_percent(r.stdout, row), key
    assert res["ort_torch_agreement"] is not None


def test_the_demo_logs_every_accuracy_figure_to_the_flows_mlflow_run(demo):
    import mlflow

    r, cwd = demo
    res = json.loads((cwd / "digits_out" / "results.json").read_text())
    mlflow.set_tracking_uri(f"sqlite:///{cwd / 'mlflow.db'}")
    (run,) = mlflow.search_runs(experiment_names=["amct-export"], output_format="list")
    m = run.data.metrics
    for key in ("fp32_teacher", "int8_calibration_only", "int8_distilled_torch", "int8_distilled_ort",
                "ort_torch_agreement"):
        assert m[f"accuracy.{key}"] == pytest.approx(res[key]), key
    assert run.info.run_id in r.stdout
