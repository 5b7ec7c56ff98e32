"""The `distill-export` flow: a distilled checkpoint -> Ascend-ready files, checked and tracked.

:func:`export` is the recipe: load checkpoint -> trace -> record -> fake-quant build -> deploy build ->
parity -> manifest -> MLflow log, each stage a task of tasks/. The flow :func:`distill_export` checks its
parameters into an :class:`~flows.parameters.ExportPlan` and runs the recipe; a task can run the same
recipe for one export of many. Heavy stages are cached on the content of their input files and their
parameter values; ``force=True`` recomputes everything.

Runs anywhere Prefect runs: with no configuration on Prefect's ephemeral API and MLflow's SQLite
store in the working directory (``./mlflow.db``); ``PREFECT_API_URL`` / ``MLFLOW_TRACKING_URI``
(or the ``mlflow_tracking_uri`` parameter) switch to real servers.
"""
from __future__ import annotations

import time
from typing import Any, Optional, Union

from prefect import flow, get_run_logger

from flows.parameters import ExportPlan
from tasks.checkpoint import load_checkpoint
from tasks.export import check_export_set, deploy_build, fake_quant_build, record, trace
from tasks.files import FileRef
from tasks.manifest import write_manifest
from tasks.model import release_models, release_weights
from tasks.parity import parity, show_parity
from tasks.results import ExportResults
from tasks.specs import TrackingSpec
from tasks.tracking import TrackingResult, give_up_note, log_to_mlflow, resolve_tracking_uri

FLOW_NAME = "distill-export"


class ParityFailed(RuntimeError):
    """The exported models do not compute what the torch model computes (within the tolerances)."""


class LoggingFailed(RuntimeError):
    """MLflow logging failed after its retries; the exported files are on disk."""


def export(plan: ExportPlan) -> dict:
    """One export, stage by stage; returns the summary (files, parity, MLflow run). Raises LoggingFailed
    when MLflow logging failed after its retries, ParityFailed (after logging) when parity failed."""
    run, f, g = Stages(plan.force), plan.files, plan.graph
    ck = run(load_checkpoint, plan.model, f.downloads, plan.tracking.tracking_uri)
    tr = run(trace, ck.spec, g, f.traced, f.model_record)
    release_weights()  # the builds read files only: the weights the trace read need not stay in memory
    rec = run(record, tr.path, tr.info["record_path"], f.record, plan.record_file, g.target)
    given = plan.record_file is not None
    fq = run(fake_quant_build, tr.path, rec.path, f.fake_quant, g.target, given)
    dp = run(deploy_build, tr.path, rec.path, f.deploy, g.target, given)
    check_export_set(fq.path, dp.path, rec.path, given)  # one export id in all three files, else MixedSetError
    par = run(parity, ck.spec, fq.path, dp.path, f.parity, plan.tolerances, g.target)
    release_models()  # no stage after parity needs the torch model: give its weights back before logging
    show_parity(par, f.name, g.target)
    done = run.collect(plan)
    manifest = write_manifest(f.manifest, done)
    logged = log(plan.tracking, done, manifest)
    return summary(done, manifest, logged)


class Stages:
    """Runs the stages of one export: a cached result whose files were changed or deleted is recomputed
    (all of them with ``force``); keeps each stage's result, Prefect state and wall time."""

    def __init__(self, force: bool):
        self.force = force
        self.results: dict[str, Any] = {}
        self.states: dict[str, str] = {}
        self.seconds: dict[str, float] = {}

    def __call__(self, task_fn, *args):
        t0 = time.perf_counter()
        runner = task_fn.with_options(refresh_cache=True) if self.force else task_fn
        state = runner(*args, return_state=True)
        result = state.result()
        if state.is_completed() and state.name == "Cached" and not result.intact():
            get_run_logger().warning(f"stage {task_fn.name}: cached files were changed or removed; recomputing")
            state = task_fn.with_options(refresh_cache=True)(*args, return_state=True)
            result = state.result()
        self.results[task_fn.name] = result
        self.states[task_fn.name] = state.name
        self.seconds[task_fn.name] = time.perf_counter() - t0
        return result

    def collect(self, plan: ExportPlan) -> ExportResults:
        """What the stages produced, with the plan's name, graph and parameters."""
        r = self.results
        return ExportResults(name=plan.files.name, graph=plan.graph, parameters=plan.parameters,
                             checkpoint=r["load-checkpoint"], trace=r["trace"], record=r["record"],
                             fake_quant=r["fake-quant-build"], deploy=r["deploy-build"], parity=r["parity"],
                             states=self.states, seconds=self.seconds)


def log(tracking: TrackingSpec, done: ExportResults, manifest: FileRef) -> TrackingResult:
    """The logging stage, retried with backoff (``tracking.retries``; the delay doubles each time). Each attempt
    resumes the flow run's MLflow run; when the last one fails, the run is ended FAILED if the server answers,
    and the error says how the run was left."""
    delays = [tracking.retry_delay_seconds * (2 ** i) for i in range(max(tracking.retries, 1))]
    state = log_to_mlflow.with_options(retries=tracking.retries, retry_delay_seconds=delays)(
        tracking, done, manifest, return_state=True)
    if not state.is_completed():
        err = state.result(raise_on_failure=False)
        attempts = getattr(err, "attempt", None)
        attempts = attempts if isinstance(attempts, int) and attempts > 0 else tracking.retries + 1
        run_note = give_up_note(tracking.tracking_uri, err)  # the run ends FAILED if the server answers now
        raise LoggingFailed(
            f"MLflow logging to tracking URI {resolve_tracking_uri(tracking.tracking_uri)} failed after {attempts} "
            f"attempt(s): {err}. {run_note + ' ' if run_note else ''}Every exported file is on disk in "
            f"{done.parameters['output_dir']} (manifest {manifest.path}).")
    logged = state.result()
    get_run_logger().info(f"MLflow run {logged.run_id} at {logged.tracking_uri}: {logged.run_url}")
    return logged


def summary(done: ExportResults, manifest: FileRef, logged: TrackingResult) -> dict:
    """What the flow returns; raises ParityFailed (the files are written and logged) when parity failed."""
    par = done.parity
    out = {
        "fake_quant_model": done.fake_quant.path, "deploy_model": done.deploy.path, "record_file": done.record.path,
        "manifest": manifest.path, "parity_report": next(f.path for f in par.files if f.path.endswith(".html")),
        "parity_passed": par.passed, "parity_summary": par.summary, "stage_states": done.states,
        "mlflow_tracking_uri": logged.tracking_uri, "mlflow_run_id": logged.run_id, "mlflow_run_url": logged.run_url,
        "mlflow_model_uri": logged.model_uri, "registered_model": logged.registered_model,
        "registered_version": logged.registered_version,
    }
    if not par.passed:
        e = ParityFailed(f"{par.summary} (files and report logged to MLflow run {logged.run_id}; report "
                         f"{out['parity_report']})")
        e.summary = out  # what was written and logged, for a caller that reports it (the batch)
        raise e
    return out


@flow(name=FLOW_NAME, log_prints=True)
def distill_export(
    checkpoint: str,
    model: str,
    input_shape: list[Any],
    model_kwargs: Optional[dict[str, Any]] = None,
    distill_config: Optional[str] = None,
    input_dtype: Union[str, list[str]] = "float32",
    output_dir: str = "out",
    name: str = "model",
    record_file: Optional[str] = None,
    target: str = "A2",
    opset: int = 11,
    input_names: Optional[list[str]] = None,
    output_names: Optional[list[str]] = None,
    dynamic_axes: Optional[dict[str, Any]] = None,
    parity_tolerances: Optional[dict[str, Optional[float]]] = None,
    mlflow_experiment: str = "amct-export",
    mlflow_tracking_uri: Optional[str] = None,
    mlflow_artifact_location: Optional[str] = None,
    registered_model_name: Optional[str] = None,
    metrics: Optional[dict[str, float]] = None,
    force: bool = False,
    seed: int = 0,
    mlflow_retries: int = 3,
    mlflow_retry_delay_seconds: float = 2.0,
) -> dict:
    """Export a distilled checkpoint to the fake-quant and deploy ONNX models, check them, log to MLflow.

    Args:
        checkpoint: the distilled model's state_dict: a .pt/.pth file (torch.save; loaded with
            weights_only=True) or .safetensors, or an MLflow URI such as runs:/<run_id>/<path> or
            models:/<name>/<version>. Never executed.
        model: package.module:callable (or path/to/file.py:callable) returning the float torch model.
        input_shape: shape of the example input, e.g. [1, 1, 8, 8]; several inputs: one shape each, e.g.
            [[1, 16], [1, 16]].
        model_kwargs: keyword arguments of the model callable, e.g. {"width": 16}.
        distill_config: the distill config JSON the model was wrapped with (default: every Conv2d/Linear).
        input_dtype: dtype of the example input(s): float32, float16, bfloat16, float64, int64, int32 or
            uint8; several inputs: one for all or one each.
        output_dir: where the files go (created if missing).
        name: the files' name prefix: <name>_fake_quant_model.onnx, <name>_deploy_model.onnx, ...
        record_file: a record file to validate against the model and build from, instead of the model's
            own factors.
        target: A2, A3 or 950.
        opset: ONNX opset, within the target's range.
        input_names: graph input names (default input, or input_0, input_1, ... for several).
        output_names: graph output names (default output, or output_0, output_1, ... for several).
        dynamic_axes: dynamic dimensions per graph input/output name, e.g. {"input": [0]} or
            {"input": {"0": "batch"}}.
        parity_tolerances: overrides of the parity tolerances (docs/VERIFY.md), e.g.
            {"output_cosine_min": 0.999, "layer_sqnr_min_db": 30}.
        mlflow_experiment: the MLflow experiment the run is logged to.
        mlflow_tracking_uri: where to log (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the
            working directory).
        mlflow_artifact_location: where a new experiment keeps its artifacts, a directory or an artifact URI
            (default: mlruns/ beside a SQLite database; on a tracking server, the server's artifact root).
        registered_model_name: register the logged fake-quant model under this name (a new version each run).
        metrics: figures measured elsewhere, e.g. {"accuracy.int8": 98.9}, logged with the run as MLflow
            metrics (the flow's own metrics keep their names).
        force: recompute every stage even if its inputs are unchanged.
        seed: seed of the example and parity inputs.
        mlflow_retries: how many times the logging is retried when the tracking server cannot be reached.
        mlflow_retry_delay_seconds: the first retry's delay; it doubles for each retry.
    """
    return export(ExportPlan.check(locals()))
