"""distill-export-batch on real Dask clusters: a LocalCluster batch with one bad checkpoint, a batch against a
`dask scheduler` and two `dask worker` processes started here, and one of those workers SIGKILLed while it
exports. Every file set is verified; MLflow's parent and child runs are read back through its client."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests import services

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    """Distilled (QAT-wrapped, calibrated) MLP and SmallCNN state_dicts, and a file that is no checkpoint."""
    import torch

    from tests import models

    d = tmp_path_factory.mktemp("batch-ck")
    out = {}
    for name, shape in (("mlp", [1, 20]), ("cnn", [1, 3, 16, 16])):
        torch.save(models.make_qat(name, d).state_dict(), d / f"{name}.pt")
        out[name] = {"checkpoint": str(d / f"{name}.pt"), "model": "tests.models:build",
                     "model_kwargs": {"name": name}, "distill_config": str(d / f"{name}_distill_config.json"),
                     "input_shape": shape}
    (d / "corrupt.pt").write_bytes(b"this is not a torch checkpoint")
    out["corrupt"] = {**out["mlp"], "checkpoint": str(d / "corrupt.pt")}
    return out


def _write_spec(path: Path, checkpoints: dict, items: list[tuple[str, str, dict]], **defaults) -> Path:
    """A JSON batch file: items (name, checkpoint kind, extra keys)."""
    spec = {"defaults": {"input_names": ["input"], "output_names": ["output"], **defaults},
            "exports": [{**checkpoints[kind], "name": name, **extra} for name, kind, extra in items]}
    path.write_text(json.dumps(spec))
    return path


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def assert_whole_export(out_dir: Path, name: str) -> None:
    """The file set of one export is whole and of one piece: every file the manifest lists has the size and
    SHA-256 the manifest says, nothing half-written is left beside it, and both models pass verify."""
    from amct_core.verify import verify

    manifest = json.loads((out_dir / "manifest.json").read_text())
    for role in ("fake_quant_model", "deploy_model", "record"):
        for e in manifest["files"][role]:
            f = out_dir / e["path"]
            assert f.stat().st_size == e["size"] and _sha(f) == e["sha256"], f"{f} differs from manifest.json"
    assert not [p.name for p in out_dir.iterdir() if p.name.endswith(".tmp")], f"temporary files left in {out_dir}"
    report, _ = verify(deploy=out_dir / f"{name}_deploy_model.onnx", fake_quant=out_dir / f"{name}_fake_quant_model.onnx")
    assert report["verdict"] == "pass", report["summary"]


def _run_cli(capsys, *args) -> tuple[int, list[dict]]:
    from flows.cli import main

    capsys.readouterr()
    rc = main(["batch", *map(str, args), "--json"])
    out = capsys.readouterr().out
    return rc, json.loads(out[out.index("["):])


# ---- a LocalCluster batch with one bad checkpoint --------------------------------------------------

@pytest.fixture(scope="module")
def local_batch(tmp_path_factory, checkpoints, prefect_api):
    """`amct-export batch --workers 2` on 4 exports (the MLP for A2 and 950, the CNN for A3, a corrupt
    checkpoint), logged to a SQLite MLflow store: (exit code, per-export rows, output dir, tracking URI)."""
    import contextlib
    import io

    from flows.cli import main

    d = tmp_path_factory.mktemp("local-batch")
    spec = _write_spec(d / "batch.json", checkpoints,
                       [("mlp", "mlp", {"targets": ["A2", "950"]}), ("cnn", "cnn", {"target": "A3"}),
                        ("broken", "corrupt", {})])
    uri = f"sqlite:///{d / 'mlflow.db'}"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["batch", str(spec), "--workers", "2", "--output-dir", str(d / "out"),
                   "--mlflow-tracking-uri", uri, "--mlflow-experiment", "batch-test", "--json"])
    out = buf.getvalue()
    return rc, json.loads(out[out.index("["):]), d / "out", uri


def test_local_batch_exits_1_and_names_the_bad_checkpoint_with_its_error(local_batch):
    rc, rows, _, _ = local_batch
    assert rc == 1
    failed = [r for r in rows if r["status"] != "passed"]
    assert [(r["name"], r["target"]) for r in failed] == [("broken", "A2")]
    assert "corrupt.pt" in failed[0]["error"] and "cannot be loaded" in failed[0]["error"]
    assert failed[0]["files"] == [] and failed[0]["mlflow_run_id"] is None


def test_local_batch_completes_the_other_exports_each_whole_in_its_own_directory(local_batch):
    _, rows, out, _ = local_batch
    passed = {(r["name"], r["target"]): r for r in rows if r["status"] == "passed"}
    assert set(passed) == {("mlp", "A2"), ("mlp", "950"), ("cnn", "A3")}
    for (name, target), r in passed.items():
        d = out / f"{name}-{target}"
        assert Path(r["output_dir"]) == d and all(Path(f).parent == d for f in r["files"])
        assert json.loads((d / "manifest.json").read_text())["target"] == target
        assert_whole_export(d, name)


def test_local_batch_runs_on_both_workers_of_the_local_cluster(local_batch):
    _, rows, _, _ = local_batch
    assert len({r["worker"] for r in rows}) == 2


def test_mlflow_has_one_parent_run_with_the_summary_table_and_one_child_per_export(local_batch):
    from mlflow.tracking import MlflowClient

    _, rows, _, uri = local_batch
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("batch-test")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("amct.batch") == "true"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FAILED"  # one export failed
    assert parent.data.metrics["exports"] == 4 and parent.data.metrics["exports_failed"] == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_id for r in children) == sorted(r["mlflow_run_id"] for r in rows if r["mlflow_run_id"])
    for child in children:  # what a single export's run holds
        assert child.data.params["target"] == child.data.tags["amct.batch_item"].rsplit("-", 1)[1]
        assert child.data.metrics["parity.passed"] == 1.0
        names = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"manifest.json", "models", "record", "parity"} <= names
    table = json.loads(Path(client.download_artifacts(parent.info.run_id, "batch_summary.json")).read_text())
    got = {(row[table["columns"].index("name")], row[table["columns"].index("target")]):
           row[table["columns"].index("status")] for row in table["data"]}
    assert got == {("mlp", "A2"): "passed", ("mlp", "950"): "passed", ("cnn", "A3"): "passed",
                   ("broken", "A2"): "failed"}
    assert {"item", "parity", "seconds", "files", "mlflow_run_id"} <= set(table["columns"])


def test_prefect_has_the_batch_as_a_table_artifact(local_batch, prefect_api):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["distill-export-batch"])))
    assert arts and arts[-1].type == "table"
    assert "3 of 4 export(s) passed" in arts[-1].description


def test_an_export_whose_parity_fails_is_a_failed_row_that_keeps_its_files_and_mlflow_run(
        checkpoints, tmp_path, prefect_api):
    from flows.batch import ExportItemFailed, export_item
    from flows.batch_spec import load_batch

    (item,) = load_batch({"exports": [{**checkpoints["cnn"], "name": "cnn",
                                       "parity_tolerances": {"layer_sqnr_min_db": 400.0}}]},
                         output_dir=str(tmp_path / "out"),
                         overrides={"mlflow_tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    with pytest.raises(ExportItemFailed) as e:
        export_item(item)  # the task, as a worker runs it
    row = e.value.row
    assert row["status"] == "failed" and row["parity"] == "fail" and row["error"].startswith("ParityFailed: ")
    assert row["mlflow_run_id"] and len(row["files"]) == 4 and all(Path(f).is_file() for f in row["files"])


def test_an_export_that_kills_every_worker_it_runs_on_is_named_failed_and_the_others_complete(
        checkpoints, tmp_path, prefect_api):
    """Dask gives up on a task that killed ``allowed-failures`` + 1 workers (here 0 + 1, to keep it short):
    the batch names it with the scheduler's KilledWorker and exits 1; the other export completes."""
    import contextlib
    import io

    import dask

    from flows.cli import main

    spec = _write_spec(tmp_path / "batch.json", checkpoints, [("mlp", "mlp", {})])
    data = json.loads(spec.read_text())
    data["exports"].append({**checkpoints["mlp"], "name": "killer", "model": "tests.batch_models:build_killing_its_worker"})
    spec.write_text(json.dumps(data))
    buf = io.StringIO()
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}), contextlib.redirect_stdout(buf):
        rc = main(["batch", str(spec), "--workers", "2", "--output-dir", str(tmp_path / "out"),
                   "--mlflow-tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--json"])
    rows = {r["name"]: r for r in json.loads(buf.getvalue()[buf.getvalue().index("["):])}
    assert rc == 1
    assert rows["killer"]["status"] == "failed" and "KilledWorker" in rows["killer"]["error"]
    assert rows["mlp"]["status"] == "passed"
    assert_whole_export(Path(rows["mlp"]["output_dir"]), "mlp")


# ---- an existing cluster: `dask scheduler` + two `dask worker` -------------------------------------

def _spawn(args: list[str], log: Path, env: dict) -> services.Service:
    proc = subprocess.Popen(args, stdout=open(log, "ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=env, cwd=str(services.REPO), start_new_session=True)
    return services.Service(Path(args[0]).name, proc, log)


@pytest.fixture
def dask_cluster(tmp_path, prefect_api):
    """A `dask scheduler` and two `dask worker` processes (one thread each, no nanny: a killed worker stays
    dead) on 127.0.0.1, each in its own session, stopped by PID: (address, {worker address: Service})."""
    from distributed import Client

    port = services.free_port()
    env = services.base_env(PREFECT_API_URL=prefect_api, PYTHONPATH=str(services.REPO), OMP_NUM_THREADS="1",
                            PREFECT_HOME=os.environ["PREFECT_HOME"], PREFECT_LOGGING_TO_API_ENABLED="false")
    address = f"tcp://127.0.0.1:{port}"
    procs = [_spawn([services._exe("dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                     "--dashboard-address", ":0", "--no-show"], tmp_path / "scheduler.log", env)]
    try:
        for i in range(2):
            procs.append(_spawn([services._exe("dask"), "worker", address, "--host", "127.0.0.1", "--nthreads", "1",
                                 "--no-nanny", "--name", f"w{i}", "--no-dashboard"], tmp_path / f"worker{i}.log", env))
        with Client(address, timeout=60) as c:
            c.wait_for_workers(2, timeout=120)
            info = c.scheduler_info(n_workers=-1)["workers"]
        by_name = {w["name"]: a for a, w in info.items()}
        yield address, {by_name[f"w{i}"]: procs[1 + i] for i in range(2)}
    finally:
        for p in reversed(procs):
            p.stop()


def test_batch_completes_against_an_existing_scheduler(dask_cluster, checkpoints, tmp_path, capsys):
    address, workers = dask_cluster
    spec = _write_spec(tmp_path / "batch.json", checkpoints,
                       [("mlp", "mlp", {"targets": ["A2", "A3"]}), ("cnn", "cnn", {})])
    rc, rows = _run_cli(capsys, spec, "--dask-address", address, "--output-dir", tmp_path / "out",
                        "--mlflow-tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert rc == 0, rows
    assert [r["status"] for r in rows] == ["passed"] * 3
    assert {r["worker"] for r in rows} <= set(workers)
    for r in rows:
        assert_whole_export(Path(r["output_dir"]), r["name"])


def test_exports_of_a_sigkilled_worker_are_rerun_on_the_other_and_the_batch_completes(
        dask_cluster, checkpoints, tmp_path, capsys):
    import threading

    from distributed import Client

    address, workers = dask_cluster
    out = tmp_path / "out"
    spec = _write_spec(tmp_path / "batch.json", checkpoints,
                       [("mlp", "mlp", {"targets": ["A2", "A3", "950"]}), ("cnn", "cnn", {"targets": ["A2"]})])
    killed: dict = {}

    def kill_a_busy_worker():
        """As soon as a worker has been running an export for a moment, SIGKILL it (by its PID)."""
        with Client(address, timeout=60) as c:
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:
                busy = [a for a, keys in c.processing().items() if keys and a in workers]
                started = [d for d in out.glob("*-*") if (d / ".amct_work").exists()] if out.exists() else []
                if busy and started:
                    time.sleep(1.0)  # mid-export
                    victim = busy[0]
                    killed["address"] = victim
                    killed["finished_before"] = {d.name for d in out.glob("*-*") if (d / "manifest.json").exists()}
                    os.kill(workers[victim].proc.pid, signal.SIGKILL)
                    return
                time.sleep(0.2)

    killer = threading.Thread(target=kill_a_busy_worker, daemon=True)
    killer.start()
    rc, rows = _run_cli(capsys, spec, "--dask-address", address, "--output-dir", out,
                        "--mlflow-tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}")
    killer.join(timeout=10)
    assert killed, "no worker was killed: the batch ended before any export started"
    victim_proc = workers[killed["address"]].proc
    assert victim_proc.wait(timeout=10) == -signal.SIGKILL
    assert rc == 0, rows
    assert [r["status"] for r in rows] == ["passed"] * 4
    survivor = next(a for a in workers if a != killed["address"])
    for r in rows:  # an export ends on the killed worker only if it had finished before the kill
        if r["worker"] == killed["address"]:
            assert f"{r['name']}-{r['target']}" in killed["finished_before"]
    unfinished = [r for r in rows if f"{r['name']}-{r['target']}" not in killed["finished_before"]]
    assert unfinished and all(r["worker"] == survivor for r in unfinished)
    for r in rows:
        assert_whole_export(Path(r["output_dir"]), r["name"])
