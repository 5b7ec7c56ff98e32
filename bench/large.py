"""What comes after the export, on a large model: verify and the distill-export flow against
save_distill_model, side by side in one run, as ratios.

    .venv/bin/python -m bench.large --model large          # 2.53 GiB of fp32 weights; ~20 GB of disk, ~7 GB RAM
    .venv/bin/python -m bench.large --model tiny --smoke   # seconds (the smoke test)

Steps, each in a fresh child process (so its memory is its own), one at a time, in this order:

  checkpoint     the model QAT-wrapped and calibrated as bench.export does it (create_distill_config +
                 create_distill_model on the example input), its state_dict written as .safetensors
                 and the distill config beside it. Not measured.
  export         save_distill_model of that QAT model (bench.export's "ours" measurement); its files are
                 kept for the verify steps.
  verify         amct_core.verify.verify(deploy, fake_quant, report_dir=...): the ATC preflight, the deploy
                 simulation and the report - what `python -m amct_core.verify <prefix>` runs.
  verify+parity  the same with torch parity, the model loaded as the flow and the verify CLI load it
                 (amct_core.checkpoint.load_distilled_model: float callable + distill config + the
                 .safetensors checkpoint); loading included.
  flow           flows.distill_export.distill_export(..., force=True) on the checkpoint, against a Prefect
                 server of its own (started and stopped by PID), logging to a SQLite MLflow store in the
                 temporary directory; every stage measured on its own (time and peak).

Memory: each child resets the kernel's peak-RSS mark (/proc/self/clear_refs) just before a measured
block and reads VmHWM after it. "job peak" = that peak minus the child's RSS before any model or file
was touched (torch, ONNX Runtime, Prefect and MLflow imported), the figure the targets are about;
"/ weights" divides it by the model's fp32 parameter bytes. Time is wall time; "x export" divides it
by the export's. One thread (torch and ONNX Runtime). Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.export import Probe, machine, rss_mb

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
STEPS = ("checkpoint", "export", "verify", "verify+parity", "flow")
FLOW_STAGES = ("load-checkpoint", "trace", "record", "fake-quant-build", "deploy-build", "parity", "manifest",
               "mlflow-log")


def _qat(model_name: str):
    from amct_core import create_distill_config, create_distill_model
    from bench import models

    model, x = models.by_name(model_name)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return model, x, weight_bytes, create_distill_config, create_distill_model


def _input_spec(x) -> tuple[list[int], str]:
    return list(x.shape), str(x.dtype).replace("torch.", "")


# ---- children ----------------------------------------------------------------------------------

def step_checkpoint(model_name: str, work: Path) -> dict:
    from safetensors.torch import save_file

    model, x, weight_bytes, create_distill_config, create_distill_model = _qat(model_name)
    cfg = work / "distill_config.json"
    create_distill_config(str(cfg), model, x)
    qat = create_distill_model(str(cfg), model, x).eval()
    del model
    save_file({k: v.contiguous() for k, v in qat.state_dict().items()}, str(work / "student.safetensors"))
    shape, dtype = _input_spec(x)
    return {"weight_bytes": weight_bytes, "input_shape": shape, "input_dtype": dtype,
            "params": sum(p.numel() for p in qat.parameters())}


def step_export(model_name: str, work: Path) -> dict:
    from bench.export import child

    return child("ours", model_name, str(work), 1)  # writes work/ours/m_*.onnx and work/ours/rec.txt


def _example_input(ck: dict):
    """The flow's example input for this shape and dtype (tasks.model.example_input: 0..9 for integers)."""
    from tasks.model import example_input

    return example_input(ck["input_shape"], ck["input_dtype"], 0)


def step_verify(model_name: str, work: Path, ck: dict, parity: bool) -> dict:
    import mlflow  # noqa: F401 - imported by every step, so the baselines are alike
    import torch

    from amct_core.checkpoint import load_distilled_model
    from amct_core.verify import verify

    torch.set_num_threads(1)
    x = _example_input(ck)
    gc.collect()
    base = rss_mb()
    d = work / "ours"
    probe = Probe()
    with probe.measure():
        kw = {}
        if parity:
            kw = dict(torch_model=load_distilled_model("bench.models:float_model", work / "student.safetensors",
                                                       work / "distill_config.json", model_kwargs={"name": model_name}),
                      example_inputs=(x,))
        report, _ = verify(deploy=d / "m_deploy_model.onnx", fake_quant=d / "m_fake_quant_model.onnx",
                           report_dir=work / f"report-{'parity' if parity else 'files'}", **kw)
    return {**probe.as_dict(), "rss_imports_mb": base, "job_peak_mb": probe.peak_mb - base,
            "verdict": report["verdict"], "summary": report["summary"], "checks": report["checks_run"]}


def _rss_split() -> dict:
    """Resident memory now, anonymous (heap) and file-backed (mapped files: weights read from disk)."""
    from bench.export import _status_mb

    return {"rss_anon_after_mb": _status_mb("RssAnon"), "rss_file_after_mb": _status_mb("RssFile")}


def _probed(fn, name: str, out: dict):
    """``fn`` measured on its own (time, peak RSS) into ``out[name]``; the signature stays fn's for Prefect."""

    @functools.wraps(fn)
    def probed(*args, **kwargs):
        p = Probe()
        with p.measure(collect=False):
            result = fn(*args, **kwargs)
        out[name] = {**p.as_dict(), **_rss_split()}
        return result

    return probed


def step_flow(model_name: str, work: Path, ck: dict, api_url: str | None = None) -> dict:
    """The flow against ``api_url``, or against a Prefect server of its own (a child process only: its
    PREFECT_HOME must be set before Prefect is imported)."""
    server = None
    if api_url is None:
        home = work / "prefect-home"
        home.mkdir(exist_ok=True)
        os.environ.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                          PREFECT_CLI_PROMPT="false", PREFECT_LOGGING_TO_API_ENABLED="false")
        os.environ.pop("PREFECT_API_URL", None)
    import mlflow  # noqa: F401 - imported before the baseline, as in the other steps
    import torch

    import flows.distill_export as fm
    from tests import services

    torch.set_num_threads(1)
    if api_url is None:
        server = services.start_prefect_server(work / "server-home")
        api_url = server.url
    stages: dict[str, dict] = {}
    originals = {}
    cwd = os.getcwd()
    try:
        from prefect.settings import PREFECT_API_URL, temporary_settings

        import tasks.tracking as tr
        task_objects = [fm.load_checkpoint, fm.trace, fm.record, fm.fake_quant_build, fm.deploy_build, fm.parity,
                        fm.write_manifest, tr.log_to_mlflow]
        for t in task_objects:
            originals[t] = t.fn
            t.fn = _probed(t.fn, t.name, stages)
        os.chdir(work)  # MLflow's default artifact root of a SQLite store is ./mlruns
        params = dict(checkpoint=str(work / "student.safetensors"), model="bench.models:float_model",
                      model_kwargs={"name": model_name}, distill_config=str(work / "distill_config.json"),
                      input_shape=ck["input_shape"], input_dtype=ck["input_dtype"], output_dir=str(work / "flow"),
                      name=model_name, mlflow_experiment="bench-large",
                      mlflow_tracking_uri=f"sqlite:///{work / 'mlflow.db'}", force=True)
        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            gc.collect()
            base = rss_mb()
            probe = Probe()
            with probe.measure(collect=False):
                state = fm.distill_export(**params, return_state=True)
        # each stage reset the high-water mark: the run's peak is the highest of theirs
        peak = max([probe.peak_mb] + [s["peak_rss_mb"] for s in stages.values()])
        ok = state.is_completed()
        summary = state.result() if ok else {"error": str(state.message)}
    finally:
        os.chdir(cwd)
        for t, fn in originals.items():
            t.fn = fn
        if server is not None:
            server.stop()
    return {"seconds": probe.seconds, "peak_rss_mb": peak, "rss_imports_mb": base, "job_peak_mb": peak - base,
            "stages": {k: {**v, "job_peak_mb": v["peak_rss_mb"] - base} for k, v in stages.items()},
            "completed": ok, "parity_summary": summary.get("parity_summary", summary.get("error"))}


def run_step(step: str, model_name: str, work: Path, ck: dict | None, inprocess: bool,
             api_url: str | None = None) -> dict:
    if inprocess:
        return _dispatch(step, model_name, work, ck, api_url)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "bench.large", "--child", step, "--model", model_name,
                           "--work", str(work), "--ck", json.dumps(ck or {})]
                          + (["--prefect-api-url", api_url] if api_url else []),
                          cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-3000:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _dispatch(step: str, model_name: str, work: Path, ck: dict | None, api_url: str | None = None) -> dict:
    if step == "checkpoint":
        return step_checkpoint(model_name, work)
    if step == "export":
        return step_export(model_name, work)
    if step in ("verify", "verify+parity"):
        return step_verify(model_name, work, ck or {}, parity=step == "verify+parity")
    if step == "flow":
        return step_flow(model_name, work, ck or {}, api_url)
    raise SystemExit(f"unknown step {step!r}")


# ---- parent --------------------------------------------------------------------------------------

def print_table(model_name: str, res: dict) -> None:
    wb = res["checkpoint"]["weight_bytes"]
    ex = res["export"].get("seconds", float("nan"))
    print(f"model {model_name}: {res['checkpoint']['params'] / 1e6:.1f}M params, fp32 weights {wb / 2**30:.2f} GiB; "
          "1 thread; each step a fresh process")
    print(f"{'step':<40}{'seconds':>9}{'x export':>10}{'peak RSS MB':>13}{'job MB':>9}{'job/wts':>9}")

    def row(label, r):
        if "error" in r:
            print(f"{label:<40}  failed: {r['error'].splitlines()[-1][:120]}")
            return
        print(f"{label:<40}{r['seconds']:>9.2f}{r['seconds'] / ex:>9.2f}x{r['peak_rss_mb']:>13.0f}"
              f"{r['job_peak_mb']:>9.0f}{r['job_peak_mb'] * 2**20 / wb:>8.2f}x")

    row("save_distill_model (export)", res["export"])
    row("verify (preflight + deploy simulation)", res["verify"])
    row("verify + torch parity (loading incl.)", res["verify+parity"])
    row("flow (Prefect + MLflow, force=True)", res["flow"])
    for s in FLOW_STAGES:
        r = res["flow"].get("stages", {}).get(s)
        if r:
            row(f"  flow stage {s}", r)
    for k in ("verify", "verify+parity"):
        if "verdict" in res[k]:
            print(f"{k}: {res[k]['verdict']}: {res[k]['summary'][:160]}")
    if "completed" in res["flow"]:
        print(f"flow: {'completed' if res['flow']['completed'] else 'FAILED'}: {res['flow']['parity_summary'][:160]}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="large", help="large, tiny, bert_base, resnet50 or tx<width>")
    ap.add_argument("--json", default=str(RESULTS / "large_{model}.json"))
    ap.add_argument("--workdir", help="where the files go (default: a temporary directory, removed at the end)")
    ap.add_argument("--smoke", action="store_true", help="every step in this process (memory figures not clean); "
                    "the flow step only with --prefect-api-url")
    ap.add_argument("--prefect-api-url", help="run the flow against this Prefect server instead of starting one")
    ap.add_argument("--child", choices=STEPS, help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--ck", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(_dispatch(a.child, a.model, Path(a.work), json.loads(a.ck or "{}"), a.prefect_api_url)))
        return 0
    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench-large-"))
    work.mkdir(parents=True, exist_ok=True)
    info = machine()
    res: dict = {}
    t0 = time.perf_counter()
    try:
        for step in STEPS:
            if step == "flow" and a.smoke and not a.prefect_api_url:
                res[step] = {"error": "not run: in --smoke mode the flow step needs --prefect-api-url"}
                continue
            r = run_step(step, a.model, work, res.get("checkpoint"), a.smoke, a.prefect_api_url)
            res[step] = r
            if "error" in r:
                print(f"{step}: {r['error'][-1500:]}", file=sys.stderr)
                if step in ("checkpoint", "export"):
                    break
            if step == "verify+parity":  # the export's files are no longer needed: room on disk for the flow
                shutil.rmtree(work / "ours", ignore_errors=True)
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    for step in STEPS:
        res.setdefault(step, {"error": "not run"})
    print_table(a.model, res)
    print(f"(whole benchmark {time.perf_counter() - t0:.0f} s)")
    out = {"model": a.model, "machine": info, "steps": res}
    if not a.smoke or "--json" in (argv or sys.argv):
        path = Path(a.json.format(model=a.model))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2))
        print(f"wrote {path}")
    failed = [s for s in STEPS if "error" in res[s]] + [s for s in ("verify", "verify+parity")
                                                       if res[s].get("verdict") not in (None, "pass")]
    if "completed" in res["flow"] and not res["flow"]["completed"]:
        failed.append("flow")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
