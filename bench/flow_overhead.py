"""Orchestration overhead: the distill-export Prefect flow against the same work called directly.

Starts its own ``prefect server`` (own session, PREFECT_HOME in a temporary directory, analytics off,
a free port on 127.0.0.1), warms it up with one flow run, then alternates N runs of

  flow    flows.distill_export.distill_export(..., force=True) called in this process against the
          server: every stage recomputed (no cache hits), task runs, states, cache keys (file hashes),
          persisted results and artifacts recorded by Prefect;
  direct  the flow's recipe (flows.distill_export.export) with each Prefect task replaced by its plain
          function (task.fn) and the Prefect-only calls (artifacts, run logger) made no-ops: the same
          library calls, files, parity check, manifest and MLflow logging, without Prefect;

and reports the median of each and the difference (the overhead per export). It also times a bare
save_distill_model of the same model (what a user calls without the flow: no parity, no MLflow), and
one cached re-run of the flow (unchanged inputs). The server is stopped at the end (its process
group, by PID). The MLflow store is a SQLite file in the temporary directory, for both paths.

    .venv/bin/python -m bench.flow_overhead --model resnet50 --runs 3
    .venv/bin/python -m bench.flow_overhead --smoke            # small CNN, no Prefect: the plain-call path only
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

INPUT_SHAPES = {"resnet50": [1, 3, 224, 224], "cnn": [1, 3, 16, 16]}


class _Done:
    """A completed 'state' for a plain call: what the flow body reads from a task's state."""

    name = "Completed"

    def __init__(self, value):
        self._value = value

    def is_completed(self) -> bool:
        return True

    def result(self, raise_on_failure: bool = True):
        return self._value


# Seconds of each task body in the direct runs, by task name (where the work of an export goes).
PLAIN_SECONDS: dict[str, list[float]] = {}


class _Plain:
    """A Prefect task stand-in that calls the task's function directly (and times it)."""

    def __init__(self, task):
        self.fn, self.name = task.fn, task.name

    def with_options(self, **_):
        return self

    def __call__(self, *args, return_state: bool = False, **kwargs):
        t0 = time.perf_counter()
        value = self.fn(*args, **kwargs)
        PLAIN_SECONDS.setdefault(self.name, []).append(time.perf_counter() - t0)
        return _Done(value) if return_state else value


@contextmanager
def without_prefect():
    """Patch the flow module so its recipe (flows.distill_export.export) runs the same work with no Prefect
    involvement: each task is its plain function, the Prefect UI table a no-op, the logging stage MLflow
    logging alone (tasks.tracking.log_run: no task retries, no Prefect link). Yields: params -> summary."""
    import flows.distill_export as fm
    import tasks.tracking as tr

    names = ("load_checkpoint", "trace", "record", "fake_quant_build", "deploy_build", "parity", "write_manifest")
    saved = {n: getattr(fm, n) for n in names}
    saved.update(show_parity=fm.show_parity, log=fm.log, get_run_logger=fm.get_run_logger)

    def log(tracking, done, manifest):
        t0 = time.perf_counter()
        logged = tr.log_run(tracking, tr.run_payload(done, manifest.path, tracking.metrics))
        PLAIN_SECONDS.setdefault("mlflow-log", []).append(time.perf_counter() - t0)
        return logged

    try:
        for n in names:
            setattr(fm, n, _Plain(saved[n]))
        fm.show_parity = lambda *_: None
        fm.log = log
        fm.get_run_logger = lambda: logging.getLogger("bench.direct")
        yield lambda params: fm.export(fm.ExportPlan.check(params))
    finally:
        for n, v in saved.items():
            setattr(fm, n, v)


def make_checkpoint(model_name: str, d: Path) -> dict:
    """A distilled checkpoint of the bench model (QAT-wrapped, calibrated, state_dict) + flow parameters."""
    import torch

    from amct_core import create_distill_config, create_distill_model

    if model_name == "cnn":
        from tests import models as tm

        qat = tm.make_qat("cnn", d)
        cfg = d / "cnn_distill_config.json"
        model_ref, kwargs = "tests.models:build", {"name": "cnn"}
    else:
        from bench import models

        model, x = models.by_name(model_name)
        cfg = d / "distill_config.json"
        create_distill_config(str(cfg), model, x)
        qat = create_distill_model(str(cfg), model, x)
        model_ref, kwargs = "bench.models:float_model", {"name": model_name}
    ck = d / "distilled.pt"
    torch.save(qat.state_dict(), ck)
    return dict(checkpoint=str(ck), model=model_ref, model_kwargs=kwargs, distill_config=str(cfg),
                input_shape=INPUT_SHAPES[model_name], name=model_name, input_names=["input"], output_names=["logits"],
                mlflow_experiment="bench-flow-overhead", mlflow_tracking_uri=f"sqlite:///{d / 'mlflow.db'}")


def time_flow(params: dict, out: Path, force: bool = True) -> tuple[float, dict]:
    from flows.distill_export import distill_export

    t0 = time.perf_counter()
    state = distill_export(**params, output_dir=str(out), force=force, return_state=True)
    dt = time.perf_counter() - t0
    if not state.is_completed():
        raise RuntimeError(f"flow run failed: {state.message}")
    return dt, state.result()["stage_states"]


def time_direct(params: dict, out: Path) -> float:
    with without_prefect() as export:
        t0 = time.perf_counter()
        export({**params, "output_dir": str(out), "force": True})
        return time.perf_counter() - t0


def time_save(params: dict, out: Path) -> float:
    """save_distill_model alone on the same distilled model (rebuilt from the checkpoint, untimed)."""
    from amct_core import save_distill_model
    from tasks.model import build_model, spec_inputs
    from tasks.specs import ModelSpec

    spec = ModelSpec(checkpoint=params["checkpoint"], model=params["model"], model_kwargs=params["model_kwargs"],
                     distill_config=params["distill_config"], input_shape=params["input_shape"],
                     input_dtype="float32", seed=0)
    model = build_model(spec)
    x = spec_inputs(spec)[0]
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    save_distill_model(model, str(out / "m"), x, record_file=str(out / "rec.txt"), input_names=["input"],
                       output_names=["logits"])
    seconds = time.perf_counter() - t0
    from bench.export import require_valid

    require_valid(model, x, out / "m")  # untimed (the flow's own files are checked by its parity stage)
    return seconds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet50", choices=sorted(INPUT_SHAPES))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=str(RESULTS / "flow_overhead_{model}.json"))
    ap.add_argument("--smoke", action="store_true", help="small CNN, no Prefect server or flow run: the plain-call path")
    a = ap.parse_args(argv)
    model_name = "cnn" if a.smoke else a.model
    runs = 1 if a.smoke else a.runs
    tmp = Path(tempfile.mkdtemp(prefix="bench-flow-"))
    home = tmp / "prefect-home"
    home.mkdir()
    if not a.smoke:
        # Before Prefect is imported: its home (settings, results, local storage) lives in the temp dir.
        os.environ.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_CLI_PROMPT="false")
        os.environ.pop("PREFECT_API_URL", None)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(a.threads)
    server = None
    cwd = os.getcwd()
    os.chdir(tmp)  # MLflow puts artifacts of a SQLite store in ./mlruns: keep them in the temp dir
    try:
        if not a.smoke:
            from tests import services

            t0 = time.perf_counter()
            server = services.start_prefect_server(tmp / "server-home")
            print(f"prefect server {server.url} (pid {server.proc.pid}) up in {time.perf_counter() - t0:.1f} s")
            os.environ["PREFECT_API_URL"] = server.url
        from prefect.settings import PREFECT_API_URL, temporary_settings  # noqa: F401 (after PREFECT_HOME)

        params = make_checkpoint(model_name, tmp)
        if a.smoke:  # no Prefect at all: the plain-call path (what could rot here) and save_distill_model
            t_direct = time_direct(params, tmp / "direct")
            t_save = time_save(params, tmp / "save")
            files = sorted(p.name for p in (tmp / "direct").iterdir())
            print(f"smoke, model {model_name}: direct (flow body, tasks as plain calls) {t_direct:.2f} s, "
                  f"save_distill_model {t_save:.2f} s; direct wrote {files}")
            return 0 if any(f.endswith("_deploy_model.onnx") for f in files) else 1
        with temporary_settings(updates={PREFECT_API_URL: server.url}):
            t_warm, _ = time_flow(params, tmp / "warm")  # warm-up: server, DB, imports, model memo, MLflow store
            t_direct_warm = time_direct(params, tmp / "warm-direct")
            flow_s, direct_s, save_s = [], [], []
            PLAIN_SECONDS.clear()
            for i in range(runs):
                flow_s.append(time_flow(params, tmp / f"flow{i}")[0])
                direct_s.append(time_direct(params, tmp / f"direct{i}"))
                save_s.append(time_save(params, tmp / f"save{i}"))
                for d in (tmp / f"flow{i}", tmp / f"direct{i}", tmp / f"save{i}"):
                    shutil.rmtree(d, ignore_errors=True)
            cached_s, cached_states = time_flow(params, tmp / "warm", force=False)
        med = {k: statistics.median(v) for k, v in (("flow", flow_s), ("direct", direct_s), ("save", save_s))}
        over = med["flow"] - med["direct"]
        print(f"flow overhead, model {model_name}, warm prefect server; {runs} alternating run(s), median; "
              f"{a.threads} thread(s)")
        print(f"{'':<52}{'seconds':>9}")
        print(f"{'flow (Prefect, force=True, every stage recomputed)':<52}{med['flow']:>9.2f}")
        print(f"{'direct (same body, tasks as plain calls)':<52}{med['direct']:>9.2f}")
        print(f"{'overhead per export (flow - direct)':<52}{over:>9.2f}   ratio {med['flow'] / med['direct']:.2f}x")
        print(f"{'save_distill_model alone (no parity/MLflow)':<52}{med['save']:>9.2f}")
        print(f"{'flow re-run, unchanged inputs (cached stages)':<52}{cached_s:>9.2f}")
        print(f"(first flow run incl. warm-up: {t_warm:.2f} s; first direct: {t_direct_warm:.2f} s)")
        tasks_med = {k: statistics.median(v) for k, v in PLAIN_SECONDS.items()}
        print("direct run by task (median s): " + ", ".join(f"{k} {v:.2f}" for k, v in tasks_med.items())
              + f"; flow body outside tasks {med['direct'] - sum(tasks_med.values()):.2f}")
        res = {"model": model_name, "runs": runs, "threads": a.threads, "median": med,
               "overhead_s": over, "flow_s": flow_s, "direct_s": direct_s, "save_s": save_s,
               "cached_rerun_s": cached_s, "cached_states": cached_states, "warmup_flow_s": t_warm,
               "warmup_direct_s": t_direct_warm, "direct_task_seconds": tasks_med}
        from bench.export import machine

        res["machine"] = machine()
        path = Path(a.json.format(model=model_name))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=2))
        print(f"wrote {path}")
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
        if server is not None:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
