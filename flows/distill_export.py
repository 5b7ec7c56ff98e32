"""The `distill-export` flow: a distilled checkpoint -> Ascend-ready files, checked and tracked.

Stages (tasks/): load checkpoint -> trace -> record -> fake-quant build -> deploy build -> parity
-> manifest -> MLflow log. Heavy stages are cached on the content of their input files and their
parameter values; ``force=True`` recomputes everything.

Runs anywhere Prefect runs: with no configuration on Prefect's ephemeral API and MLflow's SQLite
store in the working directory (``./mlflow.db``); ``PREFECT_API_URL`` / ``MLFLOW_TRACKING_URI``
(or the ``mlflow_tracking_uri`` parameter) switch to real servers.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import time
from pathlib import Path
from typing import Any, Optional, Union

from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_table_artifact
from prefect.runtime import flow_run as runtime_flow_run

from flows.parameters import validate_parameters
from tasks._common import (
    ModelSpec, import_callable, peak_rss_mb, release_models, release_weights, sha256_file,
)
from tasks.checkpoint import load_checkpoint
from tasks.export import deploy_build, fake_quant_build, record, trace
from tasks.manifest import versions, write_manifest
from tasks.parity import parity

FLOW_NAME = "distill-export"
HEAVY_STAGES = ("trace", "record", "fake-quant-build", "deploy-build", "parity")


class ParityFailed(RuntimeError):
    """The exported models do not compute what the torch model computes (within the tolerances)."""


class LoggingFailed(RuntimeError):
    """MLflow logging failed after its retries; the exported files are on disk."""


def model_source_sha256(model_ref: str) -> str:
    """Hash of the source file defining the model callable (a changed model definition re-runs the stages)."""
    obj = import_callable(model_ref, "model")
    try:
        src = inspect.getsourcefile(obj)
        return sha256_file(src) if src else hashlib.sha256(model_ref.encode()).hexdigest()
    except (TypeError, OSError):
        return hashlib.sha256(model_ref.encode()).hexdigest()


# ---- running stages -----------------------------------------------------------------------------

def run_stage(task_fn, force: bool, states: dict, seconds: dict, **kwargs):
    """Run one cached stage; a cached result whose files were changed or deleted is recomputed."""
    t0 = time.perf_counter()
    runner = task_fn.with_options(refresh_cache=True) if force else task_fn
    state = runner(**kwargs, return_state=True)
    result = state.result()
    if state.is_completed() and state.name == "Cached" and not result.intact():
        get_run_logger().warning(f"stage {task_fn.name}: cached files were changed or removed; recomputing")
        state = task_fn.with_options(refresh_cache=True)(**kwargs, return_state=True)
        result = state.result()
    states[task_fn.name] = state.name
    seconds[task_fn.name] = time.perf_counter() - t0
    return result


def _attempts(err, default: int) -> int:
    """How many times the logging task ran (it records its run count on the error it raises)."""
    n = getattr(err, "attempt", None)
    return int(n) if isinstance(n, int) and n > 0 else default


def _metric_name(s: str) -> str:
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in s)


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
        checkpoint: state_dict of the distilled model (.pt/.pth via torch.save, or .safetensors), or an
            MLflow URI ('runs:/<run_id>/<path>', 'models:/<name>/<version>'). Loaded with weights_only=True.
        model: 'package.module:callable' (or 'path/to/file.py:callable') returning the float torch model.
        input_shape: shape of the example input, e.g. [1, 1, 8, 8]; for several inputs one shape each,
            e.g. [[1, 16], [1, 16]].
        model_kwargs: keyword arguments for the model callable.
        distill_config: the distill config JSON the model was wrapped with (default: every Conv2d/Linear).
        input_dtype: dtype of the example input(s) (float32, int64, ...), or one per input.
        output_dir: where the files go; name: their name prefix.
        record_file: a record file to validate and use instead of writing one from the model.
        target: A2, A3 or 950. opset: ONNX opset (default 11; within the target's range).
        input_names / output_names / dynamic_axes: as save_distill_model; default names 'input' and
            'output', or 'input_0', 'input_1', ... / 'output_0', ... when there are several.
        parity_tolerances: overrides of amct_core.verify.Tolerances, e.g. {"output_cosine_min": 0.999,
            "layer_sqnr_min_db": 30.0} (docs/VERIFY.md lists them and their defaults).
        mlflow_experiment / mlflow_tracking_uri: where to log (default: MLFLOW_TRACKING_URI or ./mlflow.db).
        mlflow_artifact_location: where a new experiment keeps its artifacts (default: beside a SQLite
            database, <its directory>/mlruns; on a tracking server, the server's artifact root).
        registered_model_name: register the logged fake-quant model under this name (new version).
        metrics: figures the caller measured (e.g. {"accuracy.int8": 98.9}), logged with the run as MLflow
            metrics under these names (the flow's own metrics keep their names and values).
        force: recompute every stage even if its inputs are unchanged.
        seed: seed of the example/parity inputs.
        mlflow_retries / mlflow_retry_delay_seconds: retries of the logging task (delay doubles each time).
    """
    p = validate_parameters(dict(locals()))
    from amct_core.formats import DEPLOY_MODEL, FAKE_QUANT_MODEL, RECORD_FILE, prefixed_file

    logger = get_run_logger()
    out = Path(p["output_dir"])
    work = out / ".amct_work"
    name = p["name"]
    states: dict[str, str] = {}
    seconds: dict[str, float] = {}

    spec = ModelSpec(checkpoint=p["checkpoint"], model=model, model_kwargs=p["model_kwargs"],
                     distill_config=p.get("distill_config"), input_shape=p["input_shape"], input_dtype=input_dtype,
                     seed=seed)
    t0 = time.perf_counter()
    ck_state = load_checkpoint(spec, str(work / "checkpoint"), mlflow_tracking_uri, return_state=True)
    ck, local_spec = ck_state.result()
    states["load-checkpoint"] = ck_state.name
    seconds["load-checkpoint"] = time.perf_counter() - t0
    logger.info(f"checkpoint {ck.source} (sha256 {ck.sha256[:12]}): {len(ck.quantized_layers)} quantized layers")
    src_sha = model_source_sha256(model)

    tr = run_stage(trace, force, states, seconds, spec=local_spec, model_source_sha256=src_sha,
                   traced_path=str(work / f"{name}_traced.onnx"), model_record_path=str(work / f"{name}_model_record.txt"),
                   input_names=p["input_names"], output_names=p["output_names"], dynamic_axes=p.get("dynamic_axes"),
                   target=p["target"], opset=opset)
    release_weights()  # the builds read files only: the weights the trace read need not stay in memory
    rec = run_stage(record, force, states, seconds, traced_path=tr.path, model_record_path=tr.info["record_path"],
                    record_path=str(prefixed_file(out, name, RECORD_FILE)), given_record_file=p.get("record_file"),
                    target=p["target"])
    fq = run_stage(fake_quant_build, force, states, seconds, traced_path=tr.path, record_path=rec.path,
                   out_path=str(prefixed_file(out, name, FAKE_QUANT_MODEL)), target=p["target"])
    dp = run_stage(deploy_build, force, states, seconds, traced_path=tr.path, record_path=rec.path,
                   out_path=str(prefixed_file(out, name, DEPLOY_MODEL)), target=p["target"])
    par = run_stage(parity, force, states, seconds, spec=local_spec, model_source_sha256=src_sha,
                    fake_quant_path=fq.path, deploy_path=dp.path, out_dir=str(out / "parity"),
                    tolerances=p.get("parity_tolerances"), target=p["target"])
    logger.info(par.summary)
    release_models()  # no stage after parity needs the torch model: give its weights back before logging

    create_table_artifact(
        table=[{"verdict": "PASS" if par.passed else "FAIL", **r} for r in par.rows],
        key="parity-summary",
        description=f"Parity of {name} ({p['target']}): {par.summary}. Parity layers: {par.layer_order or 'worst first'}.",
    )

    fq_bytes = sum(f.size for f in fq.files)
    dp_bytes = sum(f.size for f in dp.files)
    vers = versions()
    files = {
        "fake_quant_model": fq.files,
        "deploy_model": dp.files,
        "record": rec.files,
        "parity_report": [f for f in par.files if not f.path.endswith(".png")],
        "plots": [f for f in par.files if f.path.endswith(".png")],
    }
    if p.get("distill_config"):
        from tasks._common import FileRef

        files["distill_config"] = [FileRef.of(p["distill_config"])]
    public_params = {k: v for k, v in p.items() if k not in ("mlflow_retries", "mlflow_retry_delay_seconds")}
    manifest = write_manifest(
        str(out / "manifest.json"), p["target"], opset, name, p["input_shape"], input_dtype,
        {"source": ck.source, "sha256": ck.sha256, "size": ck.size},
        files, {"passed": par.passed, "summary": par.summary, "checks": par.checks, "metrics": par.metrics},
        public_params,
    )

    flow_run_id = str(runtime_flow_run.id) if runtime_flow_run.id else None
    flow_run_url = runtime_flow_run.ui_url
    if not (isinstance(flow_run_url, str) and flow_run_url.startswith(("http://", "https://"))):
        flow_run_url = None  # no UI (Prefect's ephemeral API): Prefect would give "None/flow-runs/..."
    from amct_core.targets import get_target

    tgt = get_target(p["target"])
    params = {
        "target": tgt.name, "opset": opset, "quantized_layer_count": len(ck.quantized_layers),
        "torch_version": vers["torch"], "onnx_version": vers["onnx"], "onnxruntime_version": vers["onnxruntime"],
        "amct_core_version": vers["amct-core"], "model": model, "model_kwargs": json.dumps(p["model_kwargs"]),
        "input_shape": json.dumps(p["input_shape"]), "input_dtype": input_dtype if isinstance(input_dtype, str) else json.dumps(input_dtype), "name": name,
        "record_source": rec.info.get("source"), "checkpoint": ck.source, "input_names": json.dumps(p["input_names"]),
        "output_names": json.dumps(p["output_names"]), "dynamic_axes": json.dumps(p.get("dynamic_axes")),
        "parity_tolerances": json.dumps(p.get("parity_tolerances")), "soc_family": ",".join(tgt.soc_family),
    }
    run_metrics = dict(p.get("metrics") or {})  # the caller's figures; the flow's own override a same name
    run_metrics.update({_metric_name(k): v for k, v in par.metrics.items()})
    run_metrics.update({
        "parity.passed": 1.0 if par.passed else 0.0,
        "fake_quant_model_bytes": fq_bytes, "deploy_model_bytes": dp_bytes, "checkpoint_bytes": ck.size,
        "compression_ratio": fq_bytes / dp_bytes if dp_bytes else None,
        "peak_rss_mb": max([peak_rss_mb(), ck.peak_rss_mb, tr.peak_rss_mb, rec.peak_rss_mb, fq.peak_rss_mb,
                            dp.peak_rss_mb, par.peak_rss_mb]),
        "quantized_layer_count": len(ck.quantized_layers),
    })
    run_metrics.update({f"stage_seconds.{k}": v for k, v in seconds.items()})
    compute = {"load-checkpoint": ck.seconds, "trace": tr.seconds, "record": rec.seconds, "fake-quant-build": fq.seconds,
               "deploy-build": dp.seconds, "parity": par.seconds}
    run_metrics.update({f"stage_compute_seconds.{k}": v for k, v in compute.items()})
    tags = {
        "target": tgt.name, "soc_family": ",".join(tgt.soc_family), "atc_soc_version": tgt.soc_family[0],
        "checkpoint.sha256": ck.sha256,
        "prefect.flow_run_url": flow_run_url, "prefect.flow_run_name": runtime_flow_run.name,
        "parity": "pass" if par.passed else "fail",
        "cached_stages": ",".join(k for k, v in states.items() if v == "Cached") or "none",
    }
    artifacts = {role: [f.path for f in refs] for role, refs in files.items()}

    from tasks.tracking import log_to_mlflow, resolve_tracking_uri

    uri = resolve_tracking_uri(mlflow_tracking_uri)
    delays = [mlflow_retry_delay_seconds * (2 ** i) for i in range(max(mlflow_retries, 1))]
    log_task = log_to_mlflow.with_options(retries=mlflow_retries, retry_delay_seconds=delays)
    run_name = f"{name}-{p['target']}-{runtime_flow_run.name or 'local'}"
    log_state = log_task(uri, mlflow_experiment, run_name, params, run_metrics, tags, artifacts, manifest.path, fq.path,
                         p["input_shape"], input_dtype, registered_model_name, flow_run_id,
                         p.get("mlflow_artifact_location"), return_state=True)
    if not log_state.is_completed():
        err = log_state.result(raise_on_failure=False)
        attempts = _attempts(err, mlflow_retries + 1)
        raise LoggingFailed(
            f"MLflow logging to tracking URI {uri} failed after {attempts} attempt(s): {err}. "
            f"Every exported file is on disk in {out} (manifest {manifest.path})."
        )
    tracking = log_state.result()
    create_link_artifact(link=tracking.run_url, link_text=f"MLflow run {tracking.run_id}", key="mlflow-run",
                         description=f"MLflow run of {name} ({p['target']}) at {tracking.tracking_uri}")
    logger.info(f"MLflow run {tracking.run_id} at {tracking.tracking_uri}: {tracking.run_url}")
    summary = {
        "fake_quant_model": fq.path, "deploy_model": dp.path, "record_file": rec.path, "manifest": manifest.path,
        "parity_report": next(f.path for f in par.files if f.path.endswith(".html")),
        "parity_passed": par.passed, "parity_summary": par.summary, "stage_states": states,
        "mlflow_tracking_uri": tracking.tracking_uri, "mlflow_run_id": tracking.run_id, "mlflow_run_url": tracking.run_url,
        "mlflow_model_uri": tracking.model_uri, "registered_model": tracking.registered_model,
        "registered_version": tracking.registered_version,
    }
    if not par.passed:
        raise ParityFailed(f"{par.summary} (files and report logged to MLflow run {tracking.run_id}; report "
                           f"{summary['parity_report']})")
    return summary
