"""The `distill-export-batch` flow: many checkpoints x targets, each export on a Dask worker.

The batch file (:mod:`flows.batch_spec`) is checked whole before any work. Then one task ``export-item``
per export is submitted to Dask through prefect-dask's ``DaskTaskRunner``: a ``LocalCluster`` of
``n_workers`` processes with one thread each, or the existing scheduler at ``dask_address``. Each
``export-item`` runs :func:`flows.distill_export.export` (the recipe of ``distill-export``, unchanged) on
its worker; the recipe's stages are Prefect tasks, and called inside a task they run as nested task runs
in that worker process, one after the other, with their usual caching, retries and artifacts (task runs
of the batch's flow run in Prefect). No stage is re-implemented here.

- A failing export does not stop the others; the flow ends Failed (:class:`BatchFailed`) naming the
  failed exports and their errors unless all of them passed.
- An export whose worker dies (killed, out of memory) is run again on another worker by Dask's scheduler
  (a lost task is rescheduled, up to ``distributed.scheduler.allowed-failures`` times, 3 by default).
  The stages write every file to a temporary file renamed into place, and a re-run recomputes any stage
  whose cached files are incomplete, so the re-run's file set is whole.
- MLflow: one parent run per batch (summary table ``batch_summary.json`` / ``.csv``, counts, wall time),
  one child run per export, nested under it, holding what a single export logs.
- Prefect: the batch as a table artifact (``distill-export-batch``).

Workers must see the batch's paths (checkpoints, output directories) at the same paths as the flow (a
shared filesystem; checkpoints may also be MLflow URIs) and must import amct-core and the models' modules.
They report task runs to the flow's Prefect API (its ephemeral server too, when the flow runs on one).
"""
from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager
from typing import Any, Optional, Union

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.batch_spec import BatchItem, load_batch
from flows.distill_export import ParityFailed, export
from tasks.tracking import finish_batch_run, resolve_tracking_uri, start_batch_run

FLOW_NAME = "distill-export-batch"
ARTIFACT_KEY = "distill-export-batch"


class BatchFailed(RuntimeError):
    """Some exports of the batch failed; the message names them. ``results``: every export's row."""

    def __init__(self, message: str, results: list[dict]):
        super().__init__(message, results)
        self.results = results

    def __str__(self) -> str:
        return self.args[0]


class ExportItemFailed(RuntimeError):
    """One export of a batch failed; ``row`` says where it ran, for how long, and what it left."""

    def __init__(self, message: str, row: dict):
        super().__init__(message, row)
        self.row = row

    def __str__(self) -> str:
        return self.args[0]


def _worker() -> str:
    """The Dask worker running this task (its address), or ``local``."""
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return "local"


def _row(item: BatchItem, **fields) -> dict:
    row = {"item": item.index, "name": item.name, "target": item.target, "output_dir": item.output_dir,
           "status": "failed", "parity": None, "seconds": None, "files": [], "mlflow_run_id": None,
           "worker": None, "error": None}
    row.update(fields)
    return row


@task(name="export-item", cache_policy=NO_CACHE, persist_result=False, task_run_name="export-{item.name}-{item.target}")
def export_item(item: BatchItem) -> dict:
    """One export of the batch: the distill-export recipe on this worker. Returns its row; raises
    ExportItemFailed (with the row) when the export failed."""
    worker, t0 = _worker(), time.perf_counter()
    try:
        s = export(item.plan)
    except ParityFailed as e:
        s = e.summary
        raise ExportItemFailed(f"{item.key}: parity failed: {e}", _row(
            item, parity="fail", seconds=time.perf_counter() - t0, worker=worker, error=f"ParityFailed: {e}",
            files=[s["fake_quant_model"], s["deploy_model"], s["record_file"], s["manifest"]],
            mlflow_run_id=s["mlflow_run_id"])) from None
    except Exception as e:  # noqa: BLE001 - every failure of one export is that export's, named in its row
        raise ExportItemFailed(f"{item.key}: {type(e).__name__}: {e}", _row(
            item, seconds=time.perf_counter() - t0, worker=worker, error=f"{type(e).__name__}: {e}")) from e
    return _row(item, status="passed", parity="pass", seconds=time.perf_counter() - t0, worker=worker,
                files=[s["fake_quant_model"], s["deploy_model"], s["record_file"], s["manifest"]],
                mlflow_run_id=s["mlflow_run_id"])


def task_runner(dask_address: str | None, n_workers: int, api_url: str | None = None):
    """prefect-dask's runner: the scheduler at ``dask_address``, else a LocalCluster of ``n_workers``
    processes with one thread each (Dask's nanny gives each worker OMP_NUM_THREADS=1: torch runs on one
    thread per worker) whose environment names the Prefect API ``api_url``."""
    from prefect_dask import DaskTaskRunner

    if dask_address:
        return DaskTaskRunner(address=dask_address)
    cluster = {"n_workers": n_workers, "threads_per_worker": 1, "processes": True, "dashboard_address": ":0"}
    if api_url:
        cluster["env"] = {"PREFECT_API_URL": api_url}
    return DaskTaskRunner(cluster_kwargs=cluster)


@contextmanager
def _workers_use_this_api():
    """Workers report to the flow's Prefect API: the settings travel with each submitted task, and the
    ephemeral server's URL (the flow's own, when no PREFECT_API_URL is set) is made one of them, so a
    worker does not start a server of its own. Yields that URL (a LocalCluster's workers also get it in
    their environment)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield PREFECT_API_URL.value()
        return
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        url = str(client.api_url)
    with temporary_settings(updates={PREFECT_API_URL: url}):
        yield url


def _collect(future, item: BatchItem) -> dict:
    """The row of one export from its future: its own row, or a failed row naming the error (a worker that
    died more often than the scheduler allows, say)."""
    try:
        value = future.result(raise_on_failure=False)
    except Exception as e:  # noqa: BLE001 - e.g. distributed's KilledWorker: the task itself never ended
        return _row(item, error=f"{type(e).__name__}: {e}")
    if isinstance(value, ExportItemFailed):
        return value.row
    if isinstance(value, BaseException):
        return _row(item, error=f"{type(value).__name__}: {value}")
    return value


@flow(name=FLOW_NAME, log_prints=True)
def distill_export_batch(
    spec: Union[str, dict[str, Any]],
    dask_address: Optional[str] = None,
    n_workers: int = 2,
    force: bool = False,
    mlflow_experiment: Optional[str] = None,
    mlflow_tracking_uri: Optional[str] = None,
    output_dir: Optional[str] = None,
) -> list[dict]:
    """Export every item of a batch file on Dask: one distill-export per item and target.

    Args:
        spec: the batch file (YAML or JSON: defaults: + exports:), or the same structure inline.
        dask_address: an existing Dask scheduler, e.g. tcp://10.0.0.5:8786 (default: a LocalCluster).
        n_workers: worker processes of the LocalCluster (one thread each); ignored with dask_address.
        force: recompute every stage of every export even if its inputs are unchanged.
        mlflow_experiment: the experiment of the batch's run and its exports' runs (default: the batch
            file's defaults, else amct-export).
        mlflow_tracking_uri: where to log (default: the batch file's defaults, else $MLFLOW_TRACKING_URI,
            else sqlite:///mlflow.db in the working directory).
        output_dir: the batch's output directory (default: the batch file's defaults, else out); each
            export writes to <output_dir>/<name>-<target>/.
    """
    t0 = time.perf_counter()
    logger = get_run_logger()
    data = spec if isinstance(spec, dict) else None
    defaults = (data or _read(spec)).get("defaults") or {}
    experiment = mlflow_experiment or defaults.get("mlflow_experiment") or "amct-export"
    uri = resolve_tracking_uri(mlflow_tracking_uri or defaults.get("mlflow_tracking_uri"))
    overrides = {"mlflow_experiment": experiment, "mlflow_tracking_uri": uri}
    if force:
        overrides["force"] = True
    items = load_batch(spec, output_dir, overrides)
    logger.info(f"batch of {len(items)} export(s): {', '.join(i.key for i in items)}")

    from prefect.runtime import flow_run

    tracking = items[0].plan.tracking
    parent = start_batch_run(tracking, f"batch-{flow_run.name or 'local'}",
                             {"spec": spec if isinstance(spec, str) else "inline", "exports": len(items),
                              "dask_address": dask_address or f"LocalCluster({n_workers})"},
                             str(flow_run.id) if flow_run.id else None)
    items = [dataclasses.replace(i, plan=dataclasses.replace(i.plan, tracking=dataclasses.replace(
        i.plan.tracking, parent_run_id=parent, batch_item=i.key))) for i in items]

    with _workers_use_this_api() as api_url, task_runner(dask_address, n_workers, api_url) as runner:
        futures = [runner.submit(export_item, {"item": i}) for i in items]
        rows = [_collect(f, i) for f, i in zip(futures, items, strict=True)]

    finish_batch_run(tracking, parent, rows, time.perf_counter() - t0)
    _table_artifact(rows, parent)
    failed = [r for r in rows if r["status"] != "passed"]
    for r in rows:
        print(f"{r['status'].upper():6s} {r['name']}-{r['target']} in {r['output_dir']} "
              f"({(r['seconds'] or 0):.1f} s on {r['worker']})" + (f": {r['error']}" if r["error"] else ""))
    if failed:
        raise BatchFailed(f"{len(failed)} of {len(rows)} export(s) failed: " + "; ".join(
            f"exports[{r['item']}] {r['name']}-{r['target']}: {r['error']}" for r in failed), rows)
    return rows


def _read(spec: str) -> dict:
    from flows.batch_spec import read_batch_file

    data = read_batch_file(spec)
    return data if isinstance(data, dict) else {}


def _table_artifact(rows: list[dict], parent_run_id: str) -> None:
    from prefect.artifacts import create_table_artifact

    passed = sum(r["status"] == "passed" for r in rows)
    create_table_artifact(
        key=ARTIFACT_KEY,
        table=[{k: ("\n".join(v) if isinstance(v, list) else v) for k, v in r.items()} for r in rows],
        description=f"{passed} of {len(rows)} export(s) passed; MLflow parent run {parent_run_id}")

