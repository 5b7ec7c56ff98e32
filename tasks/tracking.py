"""Stage 8: MLflow tracking. The ONLY module of the project that imports mlflow.

* :func:`download_checkpoint` fetches a checkpoint given as an MLflow URI (``runs:/...``, ``models:/...``).
* :func:`run_payload` says what an export's MLflow run gets: params, metrics, tags, and its files by role
  (``models/fake_quant``, ``models/deploy``, ``record``, ``parity``, ``plots``, ``config``, ``manifest.json``).
* :func:`log_to_mlflow` (task) logs one export as one MLflow run (:func:`log_run`), the fake-quant model as an
  MLflow ONNX model (optionally registered), and links the run from the Prefect flow run. Logging is
  idempotent per flow run: a retried attempt resumes the run and completes what an earlier attempt left;
  a run whose logging fails ends FAILED (KILLED when interrupted) if the server can be reached.
* :func:`log_metrics` adds figures measured after the run (the demo's ONNX Runtime accuracy).

Tracking URI: the ``tracking_uri`` argument, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``
in the working directory. Artifacts: an experiment this module creates keeps them where the caller says
(``artifact_location``), else beside a SQLite database (``<database directory>/mlruns``), else where the
tracking server puts them; never in the working directory by accident.
"""
from __future__ import annotations

import hashlib
import json
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from amct_core.manifest import ARTIFACT_DIRS, artifact_path

from .files import FileRef, sha256_file
from .results import ExportResults
from .specs import ParameterError, TrackingSpec
from .stage import peak_rss_mb

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
FLOW_RUN_TAG = "prefect.flow_run_id"
LOGGING_KEY_TAG = "amct.logging_key"  # one export's logging in one flow run (see logging_key)
PARENT_RUN_TAG = "mlflow.parentRunId"  # MLflow's own nesting tag: the UI shows the run under its parent
BATCH_ITEM_TAG = "amct.batch_item"


class TrackingError(RuntimeError):
    """Logging to MLflow failed; the message names the tracking URI. ``transient``: worth retrying."""

    transient = False


class TrackingUnavailable(TrackingError):
    """The MLflow tracking server cannot be reached (or went away); the message names the URI."""

    transient = True


_TRANSIENT_WORDS = ("connection refused", "max retries exceeded", "failed to establish a new connection",
                    "connection aborted", "connection reset", "timed out", "remote end closed",
                    "bad gateway", "service unavailable", "gateway timeout")


def _is_transient(exc: BaseException) -> bool:
    """True when the failure looks like the server being unreachable/overloaded (not a bad request)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (ConnectionError, TimeoutError, urllib.error.URLError)):
            return True
        if any(w in str(exc).lower() for w in _TRANSIENT_WORDS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect retry condition: retry unreachable-server failures, not bad requests."""
    exc = state.data if isinstance(getattr(state, "data", None), BaseException) else None
    return True if exc is None else bool(getattr(exc, "transient", True))


def resolve_tracking_uri(tracking_uri: str | None = None) -> str:
    if tracking_uri:
        return tracking_uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return "sqlite:///" + str(Path.cwd() / "mlflow.db")


def default_artifact_location(tracking_uri: str) -> str | None:
    """Where a new experiment keeps its artifacts when the caller does not say: ``mlruns`` beside a SQLite
    database (MLflow itself would use ``./mlruns`` of the working directory); None (the tracking server's
    or store's own choice) for any other URI."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    db = tracking_uri[len("sqlite:///"):].split("?", 1)[0]
    if not db or db == ":memory:":
        return None
    return (Path(db).resolve().parent / "mlruns").as_uri()


def _location_uri(location: str) -> str:
    """A local path as a file URI; any URI (``file:``, ``s3:``, ``mlflow-artifacts:``, ...) as given."""
    return location if "://" in location or location.startswith("file:") else Path(location).resolve().as_uri()


def _experiment(mlflow, name: str, tracking_uri: str, artifact_location: str | None):
    """The experiment ``name``, created with its artifact location if it does not exist yet."""
    from mlflow.exceptions import MlflowException

    exp = mlflow.get_experiment_by_name(name)
    if exp is None:
        wanted = _location_uri(artifact_location) if artifact_location else default_artifact_location(tracking_uri)
        try:
            mlflow.create_experiment(name, artifact_location=wanted)
        except MlflowException:
            if mlflow.get_experiment_by_name(name) is None:  # not a concurrent creation of the same experiment
                raise
        exp = mlflow.get_experiment_by_name(name)
    elif artifact_location and exp.artifact_location.rstrip("/") != _location_uri(artifact_location).rstrip("/"):
        raise TrackingError(
            f"experiment {name!r} at {tracking_uri} already keeps its artifacts at {exp.artifact_location}; "
            f"an artifact location ({artifact_location!r}) applies to new experiments only: omit it, or log to "
            f"a new experiment")
    return mlflow.set_experiment(experiment_id=exp.experiment_id)


def _mlflow(tracking_uri: str):
    # Fail in seconds rather than minutes when the server is gone; Prefect's task retries do the backoff.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    return mlflow


def check_reachable(tracking_uri: str, timeout: float = 5.0) -> None:
    """Raise TrackingUnavailable (naming the URI) unless an http(s) tracking server answers /health."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    url = tracking_uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            if r.status == 200:
                return
            raise TrackingUnavailable(f"MLflow tracking server {tracking_uri} answered HTTP {r.status} on /health")
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise TrackingUnavailable(f"MLflow tracking server {tracking_uri} is unreachable: {reason}") from None


def download_checkpoint(uri: str, dst_dir: str, tracking_uri: str | None = None) -> str:
    """Download an MLflow artifact (a file, or a directory holding exactly one checkpoint file)."""
    tracking_uri = resolve_tracking_uri(tracking_uri)
    try:
        check_reachable(tracking_uri)
    except TrackingUnavailable as e:
        raise ParameterError("checkpoint", f"{uri!r} cannot be downloaded: {e}") from None
    mlflow = _mlflow(tracking_uri)
    Path(dst_dir).mkdir(parents=True, exist_ok=True)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst_dir, tracking_uri=tracking_uri))
    except Exception as e:  # noqa: BLE001
        raise ParameterError("checkpoint", f"{uri!r} cannot be downloaded from MLflow at {tracking_uri}: "
                                           f"{type(e).__name__}: {e}") from None
    if local.is_file():
        return str(local)
    found = sorted(p for p in local.rglob("*") if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES)
    if len(found) != 1:
        raise ParameterError(
            "checkpoint",
            f"{uri!r} is a directory with {len(found)} checkpoint files ({[str(p.relative_to(local)) for p in found]}); "
            f"name one file, e.g. '{uri.rstrip('/')}/<file>'",
        )
    return str(found[0])


def log_metrics(tracking_uri: str, run_id: str, metrics: dict[str, float]) -> None:
    """Add figures measured after a flow run (e.g. accuracy of its exported model) to that run's metrics.
    Raises TrackingError naming the URI and the run."""
    uri = resolve_tracking_uri(tracking_uri)
    check_reachable(uri)
    mlflow = _mlflow(uri)
    try:
        client = mlflow.tracking.MlflowClient(uri)
        for k, v in metrics.items():
            client.log_metric(run_id, k, float(v))
    except Exception as e:  # noqa: BLE001
        raise TrackingError(f"logging metrics to run {run_id} at MLflow tracking URI {uri} failed: "
                            f"{type(e).__name__}: {e}") from e


@dataclass
class TrackingResult:
    tracking_uri: str
    experiment_id: str
    run_id: str
    run_url: str
    model_uri: str  # the logged MLflow ONNX model (fake-quant)
    registered_model: str | None
    registered_version: str | None


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    base = tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


def _signature(fake_quant_path: str, example_inputs: list[tuple[list[int], str]]):
    import numpy as np
    import onnx
    import onnxruntime as ort
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    from amct_core.onnx.mapped import open_model

    m = open_model(fake_quant_path)  # the graph; no tensor is read

    def dims(vi):
        return tuple(-1 if (d.dim_param or not d.HasField("dim_value")) else d.dim_value
                     for d in vi.type.tensor_type.shape.dim)

    def np_type(vi):
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))

    inits = {t.name for t in m.graph.initializer}
    ins = [vi for vi in m.graph.input if vi.name not in inits]
    inputs = Schema([TensorSpec(np_type(vi), dims(vi), vi.name) for vi in ins])
    outputs = Schema([TensorSpec(np_type(vi), dims(vi), vi.name) for vi in m.graph.output])
    rng = np.random.default_rng(0)
    example = {}
    for vi, (shape, _) in zip(ins, example_inputs, strict=False):  # an input the tracer dropped has no example
        t = np_type(vi)
        example[vi.name] = (rng.standard_normal(shape).astype(t) if np.issubdtype(t, np.floating)
                            else rng.integers(0, 10, size=shape).astype(t))
    # The example must run: this is the check MLflow's own serving-input validation would make (see _log).
    # Weights stay mapped from the file (no prepacked copy, no arena), whatever the model's size.
    so = ort.SessionOptions()
    so.add_session_config_entry("session.disable_prepacking", "1")
    so.enable_cpu_mem_arena = False
    try:
        ort.InferenceSession(fake_quant_path, so, providers=["CPUExecutionProvider"]).run(None, example)
    except Exception as e:  # noqa: BLE001 - name the file, not an ONNX Runtime internal
        raise TrackingError(f"the fake-quant model {fake_quant_path} does not run on its input example "
                            f"{ {k: list(v.shape) for k, v in example.items()} }: {type(e).__name__}: {e}") from None
    return ModelSignature(inputs=inputs, outputs=outputs), example


FLAVOR_DATA_DIR = "extra_files"  # where mlflow.<flavor>.save_model(extra_files=...) puts the files it is given


def _flavor_model(fake_quant_path: str):
    """The fake-quant model as the MLflow ONNX flavor gets it, and the external data files to ship beside it.

    A model with external data (2 GB and more) is given as its graph only, its tensors referring to
    ``extra_files/<data file>``, and its data file as an extra file, which MLflow copies to exactly that
    place in the logged model: the MLflow model is ``model.onnx`` plus the export's own data file (same
    bytes), and nothing of the weights is read into memory. Loading the whole model instead would hold
    it in memory while MLflow loads it again into ONNX Runtime to check the input example."""
    import onnx

    from amct_core.onnx.mapped import external_files, open_model, relocated

    located = open_model(fake_quant_path, map_embedded=False)  # only what the file already stores outside
    files = sorted(external_files(located))
    if not files:
        return onnx.load(fake_quant_path), []
    return relocated(located, FLAVOR_DATA_DIR), files


@dataclass
class RunPayload:
    """What one export's MLflow run gets."""

    run_name: str
    params: dict
    metrics: dict
    tags: dict
    artifacts: dict[str, list[str]]  # role (amct_core.manifest.ARTIFACT_DIRS) -> local files
    manifest: str  # manifest.json, logged at the artifacts' root
    fake_quant_model: str  # logged again as an MLflow ONNX model
    inputs: list[tuple[list[int], str]]  # the example inputs' shapes and dtypes: the model's input example


def _metric_name(s: str) -> str:
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in s)


def run_payload(export: ExportResults, manifest: str, caller_metrics: dict | None = None,
                flow_run_name: str | None = None, flow_run_url: str | None = None) -> RunPayload:
    """The params, metrics, tags and files of ``export``'s MLflow run (docs/PIPELINE.md lists them).
    ``caller_metrics`` are figures measured elsewhere; the export's own metrics win a same name."""
    from amct_core.manifest import versions
    from amct_core.targets import get_target

    p, ck, par = export.parameters, export.checkpoint, export.parity
    tgt = get_target(export.graph.target)
    vers = versions()
    layers = len(ck.quantized_layers)
    params = {
        "target": tgt.name, "opset": export.graph.opset, "quantized_layer_count": layers,
        "torch_version": vers["torch"], "onnx_version": vers["onnx"], "onnxruntime_version": vers["onnxruntime"],
        "amct_core_version": vers["amct-core"], "model": p["model"], "model_kwargs": json.dumps(p["model_kwargs"]),
        "input_shape": json.dumps(p["input_shape"]),
        "input_dtype": p["input_dtype"] if isinstance(p["input_dtype"], str) else json.dumps(p["input_dtype"]),
        "name": export.name, "record_source": export.record.info.get("source"), "checkpoint": ck.source,
        "input_names": json.dumps(p["input_names"]), "output_names": json.dumps(p["output_names"]),
        "dynamic_axes": json.dumps(p.get("dynamic_axes")), "parity_tolerances": json.dumps(p.get("parity_tolerances")),
        "soc_family": ",".join(tgt.soc_family),
    }
    fq_bytes = sum(f.size for f in export.fake_quant.files)
    dp_bytes = sum(f.size for f in export.deploy.files)
    stages = export.stage_results()
    metrics = dict(caller_metrics or {})
    metrics.update({_metric_name(k): v for k, v in par.metrics.items()})
    metrics.update({
        "parity.passed": 1.0 if par.passed else 0.0,
        "fake_quant_model_bytes": fq_bytes, "deploy_model_bytes": dp_bytes, "checkpoint_bytes": ck.size,
        "compression_ratio": fq_bytes / dp_bytes if dp_bytes else None,
        "peak_rss_mb": max([peak_rss_mb()] + [r.peak_rss_mb for r in stages.values()]),
        "quantized_layer_count": layers,
    })
    metrics.update({f"stage_seconds.{k}": v for k, v in export.seconds.items()})
    metrics.update({f"stage_compute_seconds.{k}": r.seconds for k, r in stages.items()})
    tags = {
        "target": tgt.name, "soc_family": ",".join(tgt.soc_family), "atc_soc_version": tgt.soc_family[0],
        "checkpoint.sha256": ck.sha256, "prefect.flow_run_url": flow_run_url, "prefect.flow_run_name": flow_run_name,
        "parity": "pass" if par.passed else "fail",
        "cached_stages": ",".join(k for k, v in export.states.items() if v == "Cached") or "none",
    }
    return RunPayload(
        run_name=f"{export.name}-{tgt.name}-{flow_run_name or 'local'}", params=params, metrics=metrics, tags=tags,
        artifacts={role: [f.path for f in refs] for role, refs in export.files().items()}, manifest=manifest,
        fake_quant_model=export.fake_quant.path, inputs=ck.spec.inputs())


# ---- one flow run, one MLflow run: every step finds what an earlier attempt did -------------------------

fault_hook: Callable[[str, dict], None] | None = None
"""Tests only: when set, :func:`log_run` calls ``fault_hook(step, info)`` as it starts (``"start"``, before
it contacts the server) and after each step (``"run"``, ``"artifacts"``, ``"model"``, ``"registered"``,
``"tagged"``; ``info`` has ``run_id`` and, from ``"model"`` on, ``model_id`` and ``version``), so that a test
can stop or restart the tracking server, or raise, at an exact point."""

_runs_by_key: dict[str, tuple[str, str]] = {}  # logging key -> (MLflow run id, status we last gave it)


def logging_key(flow_run_id: str, manifest: str) -> str:
    """What identifies one export's logging: its flow run and its manifest's path (a flow run that makes
    several exports, as a batch does, logs each to its own run). Tagged ``amct.logging_key`` on the run."""
    return hashlib.sha256(f"{flow_run_id}\0{Path(manifest).resolve()}".encode()).hexdigest()[:32]


def _reached(step: str, **info) -> None:
    if fault_hook is not None:
        fault_hook(step, info)


def _resume_or_create_run(client, experiment_id: str, flow_run_id: str | None, key: str | None, run_name: str,
                          tracking: TrackingSpec | None = None):
    """The run tagged with the logging ``key`` (set RUNNING again if an attempt ended it), else a new run
    created with its tags in the same request (a run is never left without them). An export of a batch
    (``tracking.parent_run_id``) is created nested under the batch's run (MLflow's ``mlflow.parentRunId``)
    and tagged with its item (``amct.batch_item``); its logging key is its own, so a sibling never resumes it."""
    if key:
        found = client.search_runs([experiment_id], filter_string=f"tags.`{LOGGING_KEY_TAG}` = '{key}'",
                                   max_results=2, order_by=["attributes.start_time ASC"])
        if found:
            run = found[0]
            if run.info.status != "RUNNING":
                client.update_run(run.info.run_id, status="RUNNING")
            return run
    tags = {FLOW_RUN_TAG: flow_run_id, LOGGING_KEY_TAG: key} if key else {}
    if tracking is not None and tracking.parent_run_id:
        tags.update({PARENT_RUN_TAG: tracking.parent_run_id, BATCH_ITEM_TAG: tracking.batch_item or run_name})
    return client.create_run(experiment_id, run_name=run_name, tags=tags or None)


def _log_params_once(client, run, params: dict) -> None:
    """Params the run does not have yet; one it has with another value is an error naming it (MLflow keeps a
    param's first value)."""
    from mlflow.entities import Param

    have = run.data.params
    want = {k: str(v)[:6000] for k, v in params.items()}
    differ = sorted(k for k, v in want.items() if k in have and have[k] != v)
    if differ:
        k = differ[0]
        raise TrackingError(f"MLflow run {run.info.run_id} already has param {k!r} = {have[k]!r}, this export "
                            f"logs {want[k]!r} (params {differ} differ): it belongs to another export")
    new = [Param(k, v) for k, v in want.items() if k not in have]
    if new:
        client.log_batch(run.info.run_id, params=new)


def _log_metrics_once(client, run, metrics: dict) -> None:
    """Metrics the run does not have yet (a retry adds no second value to a metric's history)."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    new = [Metric(k, float(v), now, 0) for k, v in metrics.items() if v is not None and k not in run.data.metrics]
    if new:
        client.log_batch(run.info.run_id, metrics=new)


def _log_artifacts_once(client, run_id: str, files: list[tuple[str, str | None]]) -> None:
    """Each (local file, artifact directory) uploaded unless the run already has that file with the same
    size; a file an interrupted attempt left shorter (or otherwise different in size) is uploaded again."""
    listed: dict[str | None, dict[str, int | None]] = {}
    for local, where in files:
        if where not in listed:
            listed[where] = {Path(f.path).name: f.file_size for f in client.list_artifacts(run_id, where)
                             if not f.is_dir}
        if listed[where].get(Path(local).name) != Path(local).stat().st_size:
            client.log_artifact(run_id, local, where)


MODEL_NAME = "fake_quant_onnx"  # the logged MLflow ONNX model of a run


def _log_model_once(mlflow, client, experiment_id: str, run_id: str, payload: RunPayload) -> str:
    """The id of the run's MLflow ONNX model: the one an earlier attempt finished (READY), else a new one; an
    unfinished one an interrupted attempt left (PENDING/FAILED, partly uploaded) is deleted first."""
    from mlflow.entities import LoggedModelStatus

    mine = client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{run_id}' AND "
                                                                      f"name = '{MODEL_NAME}'")
    ready = sorted((m for m in mine if m.status == LoggedModelStatus.READY), key=lambda m: m.creation_timestamp)
    if ready:
        return ready[0].model_id
    for m in mine:
        client.delete_logged_model(m.model_id)
    signature, example = _signature(payload.fake_quant_model, payload.inputs)
    flavor_model, data_files = _flavor_model(payload.fake_quant_model)
    info = mlflow.onnx.log_model(
        flavor_model, name=MODEL_NAME, run_id=run_id, signature=signature, input_example=example,
        onnx_execution_providers=["CPUExecutionProvider"], save_as_external_data=False,
        extra_files=data_files or None,
        # what MLflow would infer by loading the model in a subprocess: the flavor's own requirements
        pip_requirements=mlflow.onnx.get_default_pip_requirements(),
    )
    return info.model_id


def _register_once(mlflow, client, name: str, run_id: str, model_id: str):
    """The registered version of the run's model: the one an earlier attempt created, else a new one."""
    found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if found:
        return min(found, key=lambda v: int(v.version))
    return mlflow.register_model(f"models:/{model_id}", name)


def end_run(tracking_uri: str, run_id: str, status: str = "FAILED") -> str | None:
    """End ``run_id`` with ``status`` (FAILED, KILLED) if it is still RUNNING; its status afterwards, or None
    when the tracking server cannot be reached (the run keeps whatever status it had). Never raises."""
    try:
        check_reachable(tracking_uri, timeout=3.0)
        client = _mlflow(tracking_uri).tracking.MlflowClient(tracking_uri)
        now = client.get_run(run_id).info.status
        if now != "RUNNING":
            return now
        client.set_terminated(run_id, status)
        return status
    except Exception:  # noqa: BLE001 - best effort: the caller reports the run as it was
        return None


def _flow_run() -> tuple[str | None, str | None, str | None]:
    """The Prefect flow run this task runs in: (id, name, UI link or None when the API has no UI)."""
    from prefect.runtime import flow_run

    url = flow_run.ui_url
    if not (isinstance(url, str) and url.startswith(("http://", "https://"))):
        url = None  # no UI (Prefect's ephemeral API): Prefect would give "None/flow-runs/..."
    return (str(flow_run.id) if flow_run.id else None), flow_run.name, url


@task(name="mlflow-log", cache_policy=NO_CACHE, persist_result=False, retries=3, retry_delay_seconds=[2, 4, 8],
      retry_condition_fn=retry_if_transient)
def log_to_mlflow(tracking: TrackingSpec, export: ExportResults, manifest: FileRef) -> TrackingResult:
    """Log ``export`` as one MLflow run (:func:`run_payload`, :func:`log_run`): a retried task resumes the
    run it started and completes it (:func:`log_run` is idempotent per flow run). Links the run from the
    Prefect flow run (markdown artifact ``mlflow-run``)."""
    from prefect.artifacts import create_link_artifact
    from prefect.runtime import task_run as runtime_task_run

    flow_run_id, flow_run_name, flow_run_url = _flow_run()
    payload = run_payload(export, manifest.path, tracking.metrics, flow_run_name, flow_run_url)
    try:
        result = log_run(tracking, payload, flow_run_id)
    except TrackingError as e:
        e.attempt = runtime_task_run.run_count  # the flow's final message says how many attempts were made
        key = logging_key(flow_run_id, payload.manifest) if flow_run_id else None
        if not getattr(e, "run_id", None) and key in _runs_by_key:  # this attempt found no run
            e.run_id, e.run_status = _runs_by_key[key]
        raise
    create_link_artifact(link=result.run_url, link_text=f"MLflow run {result.run_id}", key="mlflow-run",
                         description=f"MLflow run of {export.name} ({export.graph.target}) at {result.tracking_uri}")
    return result


def log_run(tracking: TrackingSpec, payload: RunPayload, flow_run_id: str | None = None) -> TrackingResult:
    """Log one run to MLflow at ``tracking``: params, metrics, tags, every file under its role's directory,
    the manifest, and the fake-quant model as an MLflow ONNX model (registered under
    ``tracking.registered_model_name`` if given). The experiment, if this call creates it, keeps its
    artifacts at ``tracking.artifact_location`` (default: :func:`default_artifact_location`).

    Idempotent per ``flow_run_id`` and export (:func:`logging_key`): a second call (a retried attempt)
    resumes the run the first created and completes what it left undone; no param, metric value, artifact, logged model or model version is
    added twice. The run ends FINISHED; a failure ends it FAILED (KeyboardInterrupt or a termination signal:
    KILLED) if the server can be reached then, and the TrackingError raised carries ``run_id`` and
    ``run_status`` (the run's status afterwards: RUNNING when the server could not be reached)."""
    from mlflow.entities import RunTag

    uri = resolve_tracking_uri(tracking.tracking_uri)
    _reached("start")
    check_reachable(uri)
    mlflow = _mlflow(uri)
    registered = tracking.registered_model_name or None
    key = logging_key(flow_run_id, payload.manifest) if flow_run_id else None
    run_id = version = None
    try:
        client = mlflow.tracking.MlflowClient(uri)  # a store MLflow cannot open fails here: a TrackingError below
        exp = _experiment(mlflow, tracking.experiment, uri, tracking.artifact_location)
        run = _resume_or_create_run(client, exp.experiment_id, flow_run_id, key, payload.run_name, tracking)
        run_id = run.info.run_id
        _remember(key, run_id, "RUNNING")
        _reached("run", run_id=run_id)
        client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in payload.tags.items() if v is not None])
        _log_params_once(client, run, payload.params)
        _log_metrics_once(client, run, payload.metrics)
        _log_artifacts_once(client, run_id, [(f, ARTIFACT_DIRS.get(role, role))
                                             for role, files in payload.artifacts.items() for f in files]
                            + [(payload.manifest, None)])
        _reached("artifacts", run_id=run_id)
        model_id = _log_model_once(mlflow, client, exp.experiment_id, run_id, payload)
        _reached("model", run_id=run_id, model_id=model_id, version=None)
        if registered:
            version = str(_register_once(mlflow, client, registered, run_id, model_id).version)
            _reached("registered", run_id=run_id, model_id=model_id, version=version)
            _tag_version(client, registered, version, run_id, payload)
            _reached("tagged", run_id=run_id, model_id=model_id, version=version)
        client.set_terminated(run_id, "FINISHED")
        _remember(key, run_id, "FINISHED")
    except TrackingError as e:
        _end_failed(e, uri, run_id, key)
        raise
    except Exception as e:  # noqa: BLE001
        # Failures deep inside MLflow (e.g. the server went away mid-run): name the URI.
        cls = TrackingUnavailable if _is_transient(e) else TrackingError
        err = cls(f"logging to MLflow tracking server {uri} failed: {type(e).__name__}: {e}")
        _end_failed(err, uri, run_id, key)
        raise err from e
    except BaseException:  # KeyboardInterrupt, SystemExit, Prefect's TerminationSignal (a cancelled run)
        if run_id:
            _remember(key, run_id, end_run(uri, run_id, "KILLED") or "RUNNING")
        raise
    return TrackingResult(uri, exp.experiment_id, run_id, run_url(uri, exp.experiment_id, run_id),
                          f"models:/{model_id}", registered, version)


def _tag_version(client, name: str, version: str, run_id: str, payload: RunPayload) -> None:
    """The registered version's tags (set again by a retry: same values)."""
    deploy_files = payload.artifacts.get("deploy_model", [])
    if deploy_files:
        client.set_model_version_tag(name, version, "deploy_model",
                                     f"runs:/{run_id}/{artifact_path('deploy_model', deploy_files[0])}")
    client.set_model_version_tag(name, version, "target", str(payload.tags.get("target")))


def _remember(key: str | None, run_id: str, status: str) -> None:
    """What a later attempt reports if it cannot reach the server (nothing once FINISHED)."""
    if key and status == "FINISHED":
        _runs_by_key.pop(key, None)
    elif key:
        _runs_by_key[key] = (run_id, status)


def _end_failed(err: TrackingError, uri: str, run_id: str | None, key: str | None) -> None:
    """End this attempt's run FAILED (a retry resumes it); note the run and its status on ``err``."""
    if run_id:
        err.run_id, err.run_status = run_id, end_run(uri, run_id, "FAILED") or "RUNNING"
        _remember(key, run_id, err.run_status)


def give_up_note(tracking_uri: str | None, err: BaseException) -> str:
    """When the flow gives up logging: end the run ``err`` names FAILED if it is still RUNNING and the server
    answers now; a sentence saying how the run was left ('' when no run was started)."""
    run_id = getattr(err, "run_id", None)
    if not run_id:
        return ""
    uri = resolve_tracking_uri(tracking_uri)
    status = getattr(err, "run_status", None)
    if status in (None, "RUNNING"):
        status = end_run(uri, run_id, "FAILED") or "RUNNING"
    if status == "RUNNING":
        return (f"MLflow run {run_id} stays RUNNING: the tracking server could not be reached to end it (once it "
                f"is back: MlflowClient({uri!r}).set_terminated({run_id!r}, 'FAILED')).")
    return f"MLflow run {run_id} ended {status}."


# ---- fetch: an export back from MLflow -----------------------------------------------------------

FETCH_ROLES = ("deploy_model", "fake_quant_model", "record")  # with manifest.json: what ATC and ORT need


class ExportMismatch(TrackingError):
    """What MLflow holds is not a complete export: no manifest, a role missing, or a file whose size or
    SHA-256 differs from the manifest."""


@dataclass
class FetchedExport:
    source: str  # the URI as given
    run_id: str
    model_version: str | None  # "name/version" when the URI named a registered model
    directory: str
    files: dict[str, list[str]]  # role -> fetched paths (the .onnx first, then its external data)
    manifest: dict
    atc_command: str  # the manifest's command, to be run in ``directory``


def _resolve_export_uri(client, uri: str) -> tuple[str, str | None]:
    """(run_id, "name/version" or None) for ``runs:/<run_id>[/...]`` or ``models:/<name>/<version|latest>``
    or ``models:/<name>@<alias>``. Raises ParameterError naming 'uri'."""
    from mlflow.exceptions import MlflowException

    if uri.startswith("runs:/"):
        run_id = uri[len("runs:/"):].strip("/").split("/")[0]
        if not run_id:
            raise ParameterError("uri", f"{uri!r} names no run: expected 'runs:/<run_id>'")
        try:
            client.get_run(run_id)
        except MlflowException as e:
            raise ParameterError("uri", f"{uri!r}: no run {run_id!r} at {client.tracking_uri}: {e.message}") from None
        return run_id, None
    if uri.startswith("models:/"):
        ref = uri[len("models:/"):].strip("/")
        try:
            if "@" in ref and "/" not in ref:
                name, alias = ref.split("@", 1)
                mv = client.get_model_version_by_alias(name, alias)
            else:
                name, _, version = ref.rpartition("/")
                if not name or not version:
                    raise ParameterError("uri", f"{uri!r}: expected 'models:/<name>/<version>', "
                                                f"'models:/<name>/latest' or 'models:/<name>@<alias>'")
                if version == "latest":
                    found = client.search_model_versions(f"name = '{name}'")
                    if not found:
                        raise ParameterError("uri", f"{uri!r}: registered model {name!r} has no version at "
                                                    f"{client.tracking_uri}")
                    mv = max(found, key=lambda v: int(v.version))
                else:
                    mv = client.get_model_version(name, version)
        except MlflowException as e:
            raise ParameterError("uri", f"{uri!r}: not found at {client.tracking_uri}: {e.message}") from None
        if not mv.run_id:
            raise ParameterError("uri", f"{uri!r}: model version {mv.name}/{mv.version} belongs to no run")
        return mv.run_id, f"{mv.name}/{mv.version}"
    raise ParameterError("uri", f"{uri!r}: expected 'runs:/<run_id>', 'models:/<name>/<version>', "
                                f"'models:/<name>/latest' or 'models:/<name>@<alias>'")


def _empty_target(dest: Path) -> None:
    if dest.exists() and not dest.is_dir():
        raise ParameterError("to", f"{str(dest)!r} exists and is not a directory")
    if dest.is_dir() and any(dest.iterdir()):
        raise ParameterError("to", f"{str(dest)!r} is not empty: fetch into a new or empty directory "
                                   f"(nothing already there is overwritten)")


def fetch_export(uri: str, dest: str | os.PathLike, tracking_uri: str | None = None) -> FetchedExport:
    """Download an export logged by the flow (deploy model with its external data, fake-quant model, record
    file, manifest.json) into the new or empty directory ``dest``, and check every file's size and SHA-256
    against the manifest. Everything is downloaded and checked in a temporary directory beside ``dest``
    first; ``dest`` appears only complete and checked.

    Raises ParameterError ('uri', 'to') for a bad or unknown URI or a non-empty ``dest``,
    TrackingUnavailable when the server cannot be reached, ExportMismatch when the run holds no complete
    export or a file differs from its manifest."""
    import shutil
    import tempfile

    dest = Path(dest).absolute()
    _empty_target(dest)
    uri_t = resolve_tracking_uri(tracking_uri)
    check_reachable(uri_t)
    mlflow = _mlflow(uri_t)
    from mlflow.exceptions import MlflowException

    client = mlflow.tracking.MlflowClient(uri_t)
    try:
        run_id, version = _resolve_export_uri(client, uri)
    except (ParameterError, TrackingError):
        raise
    except Exception as e:  # noqa: BLE001 - connection trouble inside MLflow's client
        cls = TrackingUnavailable if _is_transient(e) else TrackingError
        raise cls(f"MLflow tracking server {uri_t}: {type(e).__name__}: {e}") from e
    what = f"run {run_id}" + (f" (model version {version})" if version else "")

    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.fetch-", dir=dest.parent))
    staged = work / "export"
    staged.mkdir()

    def download(artifact_path: str) -> Path:
        try:
            return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path,
                                                            dst_path=str(work / "download"), tracking_uri=uri_t))
        except MlflowException as e:
            raise ExportMismatch(f"{what} at {uri_t} has no artifact {artifact_path!r}: {e.message}") from None
        except Exception as e:  # noqa: BLE001
            cls = TrackingUnavailable if _is_transient(e) else TrackingError
            raise cls(f"downloading {artifact_path!r} of {what} from {uri_t} failed: {type(e).__name__}: {e}") from e

    try:
        try:
            manifest_file = download("manifest.json")
        except ExportMismatch:
            raise ExportMismatch(f"{what} at {uri_t} has no manifest.json: it is not an export of the "
                                 f"distill-export flow") from None
        try:
            manifest = json.loads(manifest_file.read_text())
            entries = {role: list(manifest["files"][role]) for role in FETCH_ROLES}
        except (ValueError, KeyError, TypeError) as e:
            raise ExportMismatch(f"manifest.json of {what} is not a complete export manifest "
                                 f"(roles {list(FETCH_ROLES)} expected): {type(e).__name__}: {e}") from None
        files: dict[str, list[str]] = {}
        for role, role_entries in entries.items():
            if not role_entries:
                raise ExportMismatch(f"manifest.json of {what} lists no {role} file")
            for e in role_entries:
                got = download(e["artifact_path"])
                target = staged / Path(e["artifact_path"]).name
                if target.exists():
                    raise ExportMismatch(f"manifest.json of {what} lists two files named {target.name!r}")
                shutil.move(str(got), target)
                size, sha = target.stat().st_size, sha256_file(target)
                if size != e["size"] or sha != e["sha256"]:
                    raise ExportMismatch(
                        f"{e['artifact_path']} of {what} does not match manifest.json: {size} bytes, sha256 {sha} "
                        f"(manifest: {e['size']} bytes, sha256 {e['sha256']})")
                files.setdefault(role, []).append(str(dest / target.name))
        shutil.move(str(manifest_file), staged / "manifest.json")
        _empty_target(dest)  # still empty: nothing the user put there meanwhile is replaced
        os.rename(staged, dest)  # onto a missing or empty directory: the set appears at once
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return FetchedExport(uri, run_id, version, str(dest), files, manifest, manifest.get("atc_command", ""))


# ---- a batch: one parent run, the exports nested under it ----------------------------------------

BATCH_TABLE = "batch_summary.json"  # the parent run's summary table (mlflow.log_table: the UI's Evaluation view)
BATCH_COLUMNS = ("item", "name", "target", "status", "parity", "seconds", "files", "mlflow_run_id", "worker", "error")


def start_batch_run(tracking: TrackingSpec, run_name: str, params: dict, flow_run_id: str | None = None) -> str:
    """Start a batch's parent run (left running: the exports' runs are nested under it while they log;
    :func:`finish_batch_run` ends it). Returns its id. Raises TrackingError naming the URI."""
    uri = resolve_tracking_uri(tracking.tracking_uri)
    check_reachable(uri)
    mlflow = _mlflow(uri)
    try:
        exp = _experiment(mlflow, tracking.experiment, uri, tracking.artifact_location)
        client = mlflow.tracking.MlflowClient(uri)
        tags = {"amct.batch": "true", "mlflow.runName": run_name}
        if flow_run_id:
            tags["prefect.batch_flow_run_id"] = flow_run_id
        run = client.create_run(exp.experiment_id, run_name=run_name, tags=tags)
        for k, v in params.items():
            client.log_param(run.info.run_id, k, str(v)[:6000])
    except TrackingError:
        raise
    except Exception as e:  # noqa: BLE001
        cls = TrackingUnavailable if _is_transient(e) else TrackingError
        raise cls(f"starting the batch run at MLflow tracking server {uri} failed: {type(e).__name__}: {e}") from e
    return run.info.run_id


def finish_batch_run(tracking: TrackingSpec, run_id: str, rows: list[dict], seconds: float) -> None:
    """Log the batch's summary to its parent run and end it (FINISHED when every export passed, else FAILED):
    the table (one row per export: :data:`BATCH_COLUMNS`) as ``batch_summary.json``, the same as
    ``batch_summary.csv``, and the counts and wall time as metrics."""
    import csv
    import io
    import tempfile

    uri = resolve_tracking_uri(tracking.tracking_uri)
    mlflow = _mlflow(uri)
    table = {c: [("; ".join(r.get(c) or []) if c == "files" else r.get(c)) for r in rows] for c in BATCH_COLUMNS}
    passed = sum(r["status"] == "passed" for r in rows)
    try:
        client = mlflow.tracking.MlflowClient(uri)
        client.log_table(run_id, data=table, artifact_file=BATCH_TABLE)
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=BATCH_COLUMNS)
        w.writeheader()
        for i in range(len(rows)):
            w.writerow({c: table[c][i] for c in BATCH_COLUMNS})
        with tempfile.TemporaryDirectory() as d:
            f = Path(d) / "batch_summary.csv"
            f.write_text(buf.getvalue())
            client.log_artifact(run_id, str(f))
        for k, v in {"exports": len(rows), "exports_passed": passed, "exports_failed": len(rows) - passed,
                     "batch_seconds": seconds}.items():
            client.log_metric(run_id, k, float(v))
        client.set_terminated(run_id, "FINISHED" if passed == len(rows) else "FAILED")
    except Exception as e:  # noqa: BLE001
        cls = TrackingUnavailable if _is_transient(e) else TrackingError
        raise cls(f"logging the batch summary to run {run_id} at MLflow tracking server {uri} failed: "
                  f"{type(e).__name__}: {e}") from e
