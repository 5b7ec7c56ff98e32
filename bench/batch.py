"""The batch on Dask: throughput on 1 vs 2 workers, and the engine's cost per export against direct flow runs.

Starts its own ``prefect server`` (own session, PREFECT_HOME in a temporary directory, analytics off, a
free port on 127.0.0.1; stopped by PID at the end), makes one distilled checkpoint (``--model``: the
test SmallCNN, or ResNet-50), and for ``--repeats`` rounds, in alternating order, runs the same ``--items`` exports (names e0, e1, ...,
targets A2, A3, 950 in turn; ``force=True``, so every stage is computed) as

  direct     that many ``distill-export`` flow runs, one after the other, in this process;
  batch-1    one ``distill-export-batch`` flow run on a LocalCluster of 1 worker process (one thread);
  batch-2    the same on 2 worker processes (one thread each);

each into its own directory, all logged to one SQLite MLflow store in the temporary directory. It prints
the median wall time of each, the throughput ratio batch-1 / batch-2 beside what the machine gives two
processes at that moment (two CPU-bound processes against one, measured right before each batch-2 run), exports per hour, the batch against
direct flow runs per export ((batch-1 - direct) / items: a direct flow run also pays its own flow run and
parameter check, which a batch pays once), the median time of one export inside its worker, and the
engine's own time per export: (wall - the exports' time in the workers / workers) / items (cluster start,
the workers' imports, submission, the MLflow parent run and summary). Every file set is checked afterwards: the fake-quant model with
``onnx.checker`` (full check) and both models with ``amct_core.verify`` (preflight, deploy simulation).

    .venv/bin/python -m bench.batch --items 8 --repeats 3
    .venv/bin/python -m bench.batch --items 8 --model resnet50     # exports ~10x longer: fixed costs amortized
    .venv/bin/python -m bench.batch --smoke          # 2 exports, 1 round: the script runs end to end
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
TARGETS = ("A2", "A3", "950")
KINDS = ("direct", "batch-1", "batch-2")


def make_checkpoint(model: str, d: Path) -> dict:
    """A distilled checkpoint of ``model`` (bench.flow_overhead's: the test SmallCNN, or ResNet-50): the
    exports' shared parameters."""
    from bench.flow_overhead import make_checkpoint as checkpoint

    params = checkpoint(model, d)
    return {k: v for k, v in params.items() if k not in ("name", "mlflow_experiment", "mlflow_tracking_uri")}


def items(n: int) -> list[dict]:
    return [{"name": f"e{i}", "target": TARGETS[i % len(TARGETS)]} for i in range(n)]


def run_direct(base: dict, n: int, out: Path, uri: str) -> float:
    from flows.distill_export import distill_export

    t0 = time.perf_counter()
    for it in items(n):
        state = distill_export(**base, **it, output_dir=str(out / f"{it['name']}-{it['target']}"), force=True,
                               mlflow_tracking_uri=uri, mlflow_experiment="bench-batch-direct", return_state=True)
        if not state.is_completed():
            raise RuntimeError(f"direct flow run of {it} failed: {state.message}")
    return time.perf_counter() - t0


def run_batch(base: dict, n: int, workers: int, out: Path, uri: str) -> tuple[float, list[dict]]:
    from flows.batch import distill_export_batch

    spec = {"defaults": base, "exports": items(n)}
    t0 = time.perf_counter()
    state = distill_export_batch(spec=spec, n_workers=workers, force=True, output_dir=str(out),
                                 mlflow_tracking_uri=uri, mlflow_experiment="bench-batch", return_state=True)
    dt = time.perf_counter() - t0
    if not state.is_completed():
        raise RuntimeError(f"batch on {workers} worker(s) failed: {state.message}")
    return dt, state.result()


def _spin(seconds_of_work: int) -> float:
    t0 = time.perf_counter()
    x = 0
    for i in range(seconds_of_work * 20_000_000):
        x += i
    return time.perf_counter() - t0


def machine_parallelism(work: int = 1) -> float:
    """What this machine gives two processes right now: the throughput of two CPU-bound processes run at once
    against one alone (2.0 on two idle cores; less when other work shares them). The ceiling of any
    1 -> 2 worker ratio measured beside it."""
    import multiprocessing as mp

    one = _spin(work)
    with mp.get_context("spawn").Pool(2) as pool:
        t0 = time.perf_counter()
        pool.map(_spin, [work, work])
        two = time.perf_counter() - t0
    return 2 * one / two


def check_files(out: Path) -> int:
    """Every export directory under ``out``: onnx.checker on the fake-quant model, verify on both. Returns how
    many sets passed; raises on the first that does not."""
    import onnx

    from amct_core.verify import verify

    n = 0
    for d in sorted(p for p in out.iterdir() if p.is_dir()):
        name = d.name.rsplit("-", 1)[0]
        fq, dp = d / f"{name}_fake_quant_model.onnx", d / f"{name}_deploy_model.onnx"
        onnx.checker.check_model(str(fq), full_check=True)
        report, _ = verify(deploy=dp, fake_quant=fq)
        if report["verdict"] != "pass":
            raise RuntimeError(f"{d}: verify failed: {report['summary']}")
        n += 1
    return n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=8, help="exports per run (default: %(default)s)")
    ap.add_argument("--model", default="cnn", choices=("cnn", "resnet50"),
                    help="cnn: the test SmallCNN, ~3 s an export; resnet50: ~10x that (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=1, help="rounds, each running direct, batch-1 and batch-2")
    ap.add_argument("--json", default=str(RESULTS / "batch.json"))
    ap.add_argument("--smoke", action="store_true", help="2 exports, 1 round")
    a = ap.parse_args(argv)
    n, repeats = (2, 1) if a.smoke else (a.items, a.repeats)
    tmp = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    os.environ.update(PREFECT_HOME=str(tmp / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                      PREFECT_CLI_PROMPT="false", PREFECT_LOGGING_TO_API_ENABLED="false")
    os.environ.pop("PREFECT_API_URL", None)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tests import services

    cwd = os.getcwd()
    os.chdir(tmp)  # MLflow puts artifacts of a SQLite store in ./mlruns: keep them in the temp dir
    server = None
    try:
        t0 = time.perf_counter()
        server = services.start_prefect_server(tmp / "server-home")
        print(f"prefect server {server.url} (pid {server.proc.pid}) up in {time.perf_counter() - t0:.1f} s", flush=True)
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: server.url}):
            base = make_checkpoint(a.model, tmp)
            uri = f"sqlite:///{tmp / 'mlflow.db'}"
            run_direct(base, 1, tmp / "warm-up", uri)  # imports, the server's first flow run: not timed
            times: dict[str, list[float]] = {k: [] for k in KINDS}
            item_seconds: dict[str, list[float]] = {k: [] for k in KINDS[1:]}  # one export, inside its worker
            engine: dict[str, list[float]] = {k: [] for k in KINDS[1:]}  # wall - exports' time / workers
            checked = 0
            control: list[float] = []
            for r in range(repeats):
                order = KINDS if r % 2 == 0 else tuple(reversed(KINDS))
                for kind in order:
                    if kind == "batch-2":
                        control.append(machine_parallelism())
                    out = tmp / f"r{r}-{kind}"
                    if kind == "direct":
                        dt = run_direct(base, n, out, uri)
                    else:
                        dt, rows = run_batch(base, n, int(kind[-1]), out, uri)
                        assert len(rows) == n and all(row["status"] == "passed" for row in rows), rows
                        item_seconds[kind].extend(row["seconds"] for row in rows)
                        engine[kind].append(dt - sum(row["seconds"] for row in rows) / int(kind[-1]))
                    times[kind].append(dt)
                    checked += check_files(out)
                    print(f"round {r + 1}/{repeats} {kind}: {n} exports in {dt:.1f} s", flush=True)
        med = {k: statistics.median(v) for k, v in times.items()}
        res = {
            "model": a.model, "items": n, "repeats": repeats, "cpus": os.cpu_count(), "load_average": os.getloadavg(),
            "seconds": times, "median_seconds": med,
            "throughput_ratio_2_vs_1": med["batch-1"] / med["batch-2"],
            "machine_parallelism": control,
            "exports_per_hour": {k: 3600.0 * n / v for k, v in med.items()},
            "overhead_per_export_seconds": (med["batch-1"] - med["direct"]) / n,
            "engine_seconds_per_export": {k: statistics.median(v) / n for k, v in engine.items()},
            "median_export_seconds_in_worker": {k: statistics.median(v) for k, v in item_seconds.items()},
            "file_sets_verified": checked,
        }
        from bench.export import machine

        res["machine"] = machine()
        print(f"\n{n} exports of {a.model} (force=True), median of {repeats} round(s), {os.cpu_count()} CPUs, "
              f"load average {res['load_average'][0]:.1f}")
        print(f"{'':<44}{'seconds':>9}{'exports/h':>11}")
        for k, label in (("direct", "direct: distill-export flow runs in sequence"),
                         ("batch-1", "batch on a LocalCluster of 1 worker"),
                         ("batch-2", "batch on a LocalCluster of 2 workers")):
            print(f"{label:<44}{med[k]:>9.1f}{res['exports_per_hour'][k]:>11.0f}")
        rounds = [b1 / b2 for b1, b2 in zip(times["batch-1"], times["batch-2"], strict=True)]
        res["throughput_ratio_by_round"] = rounds
        print("by round: batch-1 / batch-2 " + ", ".join(f"{x:.2f}x" for x in rounds) + "; two CPU-bound processes "
              "vs one, right before that batch-2 run (the machine's ceiling for it): "
              + ", ".join(f"{c:.2f}x" for c in control))
        print(f"throughput 2 workers vs 1: {res['throughput_ratio_2_vs_1']:.2f}x; batch-1 against direct flow runs, "
              f"per export: (batch-1 - direct) / {n} = {res['overhead_per_export_seconds']:+.2f} s")
        print("the engine's own time per export, (wall - exports' time in the workers / workers) / exports: "
              + ", ".join(f"{k} {v:.2f} s" for k, v in res["engine_seconds_per_export"].items()))
        print("one export inside its worker (median s): " + ", ".join(
            f"{k} {v:.1f}" for k, v in res["median_export_seconds_in_worker"].items())
              + f"; direct flow run {med['direct'] / n:.1f} (mean)")
        print(f"file sets verified (onnx.checker + verify): {checked}")
        path = Path(a.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=2))
        print(f"wrote {path}")
    finally:
        os.chdir(cwd)
        if server is not None:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
