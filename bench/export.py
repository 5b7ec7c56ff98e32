"""Export cost side by side in one run: save_distill_model, the bare torch.onnx.export of the same
float model (the lower bound for any exporter that traces) and ONNX Runtime's quantize_static (QDQ,
per-channel weights, fixed scales) on the same float ONNX (a peer users pick instead).

Each measurement runs in a fresh child process, so its memory is its own; runs alternate between the
exporters (in reverse order every other repeat) and the median of --repeats is reported. Time is wall time of the one call. Memory is the
peak resident set size *during* the call: the child resets the kernel's high-water mark
(``/proc/self/clear_refs``) just before the call and reads ``VmHWM`` after it, so building the model
and the QAT copy does not count; "added" is that peak minus the RSS just before the call (the model
already in memory). For save_distill_model each stage is measured the same way (per-stage time and
peak RSS). Prints a table with the ratios and writes JSON.

    .venv/bin/python -m bench.export --model resnet50 --repeats 3
    .venv/bin/python -m bench.export --model bert_base --repeats 3
    .venv/bin/python -m bench.export --model large --repeats 1          # 2.65 GB of fp32 weights
    .venv/bin/python -m bench.export --model tiny --smoke               # seconds; for the smoke test

    # save_distill_model of this checkout against another commit's, alternating, with per-run ratios
    git worktree add --detach /tmp/amct-base <commit>
    .venv/bin/python -m bench.export --model resnet50 --kinds ours --baseline /tmp/amct-base --repeats 5

What each column includes:
  bare  torch.onnx.export(model, x, file, dynamo=False, opset 11) of the float model; nothing else.
  ours  save_distill_model(qat_model, ...) -> fake-quant model + deploy model + record (three files);
        the QAT model is built and calibrated before the clock starts. After the clock (and the
        memory probe) every run's files are checked (``check_files``: amct_core.verify, or for
        models of 1 GiB of weights and more preflight + the ONNX checker); a failed check makes the
        script exit 1.
  ort   onnxruntime.quantization.quantize_static(float.onnx -> qdq.onnx), QDQ, int8 activations and
        weights, per-channel weights, Conv/MatMul/Gemm only, with the activation ranges read from a
        calibration cache (fixed scales). Not included: the float export it starts from (= bare)
        and the calibration that produced the cache (2 batches, reported as ort_calibrate_s).
  baseline  (with --baseline DIR) the ``ours`` measurement of another checkout of this repository,
        run from DIR with this interpreter, alternating with ``ours``; the ratios ours / baseline of
        time and job peak are taken run by run (pairs) and their median reported.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
KINDS = ("bare", "ours", "ort")
ORDER = ("bare", "ours", "baseline", "ort")  # the rows of a table
LABELS = {
    "bare": "torch.onnx.export (float)",
    "ours": "save_distill_model",
    "baseline": "save_distill_model (baseline)",
    "ort": "ORT quantize_static (QDQ)",
}


# ---- memory probes (Linux) -------------------------------------------------------------------

def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb() -> float:
    return _status_mb("VmRSS")


def reset_peak() -> bool:
    """Reset the peak RSS (VmHWM) to the current RSS. False if the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_mb() -> float:
    return _status_mb("VmHWM")


class Probe:
    """Time and peak RSS of one block: ``with probe.measure(): ...``."""

    def __init__(self):
        self.seconds = self.rss_before_mb = self.peak_mb = float("nan")

    @contextmanager
    def measure(self, collect: bool = True):
        if collect:  # outside the clock; ~0.3 s with torch loaded, so not done per stage
            gc.collect()
        self.rss_before_mb = rss_mb()
        self.resettable = reset_peak()
        t0 = time.perf_counter()
        try:
            yield self
        finally:
            self.seconds = time.perf_counter() - t0
            self.peak_mb = peak_mb()

    def as_dict(self) -> dict:
        return {"seconds": self.seconds, "rss_before_mb": self.rss_before_mb, "peak_rss_mb": self.peak_mb,
                "added_mb": self.peak_mb - self.rss_before_mb, "peak_reset": self.resettable}


@contextmanager
def stage_probes(save_mod, out: dict):
    """Per-stage time and peak RSS of save_distill_model, by wrapping its ``_stage`` timer.

    If the library has no such timer any more, only the stage seconds it publishes are reported."""
    orig = getattr(save_mod, "_stage", None)
    if orig is None:
        try:
            yield
        finally:
            out.update({k: {"seconds": v, "peak_rss_mb": float("nan"), "added_mb": float("nan")}
                        for k, v in getattr(save_mod, "last_stage_seconds", {}).items()})
        return

    @contextmanager
    def probed(name):
        p = Probe()
        with p.measure(collect=False), orig(name):
            yield
        out[name] = p.as_dict()

    save_mod._stage = probed
    try:
        yield
    finally:
        save_mod._stage = orig


# ---- children ----------------------------------------------------------------------------------

def _dir_bytes(d: Path, skip=()) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in d.iterdir() if p.is_file() and p.name not in skip}


def _export_float(model, x, path: Path) -> None:
    import torch

    torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=11, input_names=["input"])


class _Reader:
    """quantize_static's calibration data: the example input and one more seeded batch."""

    def __init__(self, x, n: int = 2):
        import torch

        g = torch.Generator().manual_seed(123)
        xs = [x]
        for _ in range(n - 1):
            if x.dtype.is_floating_point:
                xs.append(torch.randn(x.shape, generator=g))
            else:
                xs.append(torch.randint(0, int(x.max()) + 1, x.shape, generator=g, dtype=x.dtype))
        self.batches = iter([{"input": t.numpy()} for t in xs])

    def get_next(self):
        return next(self.batches, None)


VERIFY_MAX_WEIGHT_BYTES = 1 << 30


def verify_figures(report: dict) -> dict:
    """The figures of a verify report that say where a difference comes from: each output's SQNR and
    cosine per ONNX Runtime optimization level, the layers' worst local figures (torch layer fed ONNX
    Runtime's own input), and the verdicts of preflight and the deploy simulation."""
    par = report.get("parity") or {}
    local = [l["local"] for l in par.get("layers", []) if l.get("local")]
    steps = [v["max_error_steps"] for v in local if v.get("max_error_steps") is not None]
    return {
        "outputs": [{"name": o["name"], "opt_level": o["opt_level"], "sqnr_db": o["figures"].get("sqnr_db"),
                     "cosine": o["figures"].get("cosine"), "argmax_agreement": o["figures"].get("argmax_agreement"),
                     "batches": o["figures"].get("batches", 1)}
                    for o in par.get("outputs", [])],
        "layers": len(par.get("layers", [])),
        "min_local_sqnr_db": min((v["sqnr_db"] for v in local), default=None),
        "max_local_error_steps": max(steps, default=None),
        "preflight_ok": (report.get("preflight") or {}).get("ok"),
        "deploy_simulation_ok": (report.get("deploy_simulation") or {}).get("ok"),
    }


def check_files(qat, x, prefix: Path, weight_bytes: int) -> dict:
    """Check the files save_distill_model wrote: ``amct_core.verify`` (preflight, deploy simulation,
    torch parity) below ``VERIFY_MAX_WEIGHT_BYTES`` of weights; above it, preflight of the deploy
    model and the ONNX checker (full check, from the path, external data in place) of the fake-quant
    model only - verify itself holds several copies of a model that size in memory."""
    import onnx

    from amct_core.verify import preflight, verify

    fq, dep = Path(f"{prefix}_fake_quant_model.onnx"), Path(f"{prefix}_deploy_model.onnx")
    if weight_bytes < VERIFY_MAX_WEIGHT_BYTES:
        t0 = time.perf_counter()
        report, _ = verify(deploy=dep, fake_quant=fq, torch_model=qat, inputs=(x,))
        return {"checks": "verify", "passed": report["verdict"] == "pass", "summary": report["summary"],
                "seconds": time.perf_counter() - t0, "figures": verify_figures(report)}
    p = preflight(dep)
    try:
        onnx.checker.check_model(str(fq), full_check=True)
        checker = None
    except Exception as e:  # noqa: BLE001 - reported
        checker = f"{type(e).__name__}: {e}"
    return {"checks": "preflight + onnx.checker", "passed": p.ok and checker is None,
            "summary": p.summary() + ("; onnx.checker: " + checker if checker else "; onnx.checker: clean")}


def require_valid(qat, x, prefix) -> None:
    """:func:`check_files` on the files a bench wrote for ``prefix``; prints the outcome and stops the
    bench (exit 1) when they fail: a figure measured on invalid files is no figure."""
    weight_bytes = sum(p.numel() * p.element_size() for p in qat.parameters())
    res = check_files(qat, x, Path(prefix), weight_bytes)
    print(f"files {prefix}_*: {res['checks']} {'passed' if res['passed'] else 'FAILED'}: {res['summary']}")
    if not res["passed"]:
        raise SystemExit(1)


def child(kind: str, model_name: str, outdir: str, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    from bench import models

    if kind == "ours":
        import amct_core  # noqa: F401
    elif kind == "ort":
        import onnxruntime.quantization  # noqa: F401
    gc.collect()
    rss_imports = rss_mb()  # the process before the model exists: torch and the exporter imported
    out = Path(outdir)
    model, x = models.by_name(model_name)
    n_params = models.param_count(model)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    probe, stages, extra = Probe(), {}, {}
    if kind == "bare":
        d = out / "bare"
        d.mkdir()
        with probe.measure():
            _export_float(model, x, d / "bare.onnx")
        files = _dir_bytes(d)
    elif kind == "ours":
        from amct_core import create_distill_config, create_distill_model, save_distill_model
        from amct_core import save as save_mod

        cfg = out / "cfg.json"
        create_distill_config(str(cfg), model, x)
        qat = create_distill_model(str(cfg), model, x).eval()
        del model
        d = out / "ours"
        with stage_probes(save_mod, stages), probe.measure():
            save_distill_model(qat, str(d / "m"), x, record_file=str(d / "rec.txt"))
        # each stage reset the high-water mark: the call's peak is the highest of theirs
        probe.peak_mb = max([probe.peak_mb] + [s["peak_rss_mb"] for s in stages.values()
                                               if s["peak_rss_mb"] == s["peak_rss_mb"]])  # skip NaN
        files = _dir_bytes(d)
        extra = {"check": check_files(qat, x, d / "m", weight_bytes)}  # after the clock and the memory probe
    elif kind == "ort":
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        d = out / "float"
        d.mkdir()
        float_path = d / "float.onnx"
        _export_float(model, x, float_path)
        del model
        big = sum(_dir_bytes(d).values()) >= 2**31 - 2**27
        cache = out / "calib.json"
        kw = dict(quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QInt8,
                  weight_type=QuantType.QInt8, op_types_to_quantize=["Conv", "MatMul", "Gemm"],
                  use_external_data_format=big, calibrate_method=CalibrationMethod.MinMax,
                  calibration_cache_path=str(cache))
        q = out / "ort"
        q.mkdir()
        calib = Probe()
        with calib.measure():  # fills the cache: these are the fixed scales of the timed call
            quantize_static(str(float_path), str(out / "calib_run.onnx"), _Reader(x), **kw)
        for p in out.glob("calib_run.onnx*"):
            p.unlink()
        extra = {"ort_calibrate_s": calib.seconds, "ort_calibrate_peak_rss_mb": calib.peak_mb,
                 "external_data": big}
        with probe.measure():
            quantize_static(str(float_path), str(q / "qdq.onnx"), None, **kw)
        files = _dir_bytes(q)
    else:
        raise SystemExit(f"unknown kind {kind!r}")
    res = {"kind": kind, **probe.as_dict(), "rss_imports_mb": rss_imports,
           "job_peak_mb": probe.peak_mb - rss_imports, "stages": stages, "files": files, "params": n_params,
           "weight_bytes": weight_bytes, **extra}
    return res


def run_child(kind: str, model_name: str, threads: int, timeout: float | None = None, inprocess: bool = False,
              root: Path = ROOT) -> dict:
    """One measurement in a fresh process; its output files live in a temporary directory.

    ``inprocess`` (smoke runs only) calls the child in this process: no interpreter start-up, but the
    memory figures are then this process's, not a clean child's. ``root``: the checkout whose code
    the child runs (``bench.export`` and ``amct_core`` imported from there).
    """
    with tempfile.TemporaryDirectory(prefix=f"bench-{kind}-") as d:
        if inprocess:
            import torch

            n = torch.get_num_threads()
            try:
                return child(kind, model_name, d, threads)
            except Exception as e:  # noqa: BLE001 - reported like a failed child
                return {"kind": kind, "error": f"{type(e).__name__}: {e}"}
            finally:
                torch.set_num_threads(n)
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        proc = subprocess.run(
            [sys.executable, "-m", "bench.export", "--child", kind, "--model", model_name, "--outdir", d,
             "--threads", str(threads)],
            cwd=root, env=env, capture_output=True, text=True, timeout=timeout,
        )
        if proc.returncode != 0:
            return {"kind": kind, "error": f"exit {proc.returncode}: {proc.stderr.strip()[-2000:]}"}
        return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- parent ------------------------------------------------------------------------------------

def _commit(root: Path) -> str | None:
    """The commit checked out in ``root`` (None outside git)."""
    proc = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return (proc.stdout.strip() or None) if proc.returncode == 0 else None


def paired_ratios(ours: list[dict], base: list[dict]) -> dict:
    """Median of the run-by-run ratios ours / baseline of time and job peak (the i-th run of each, both ok)."""
    pairs = [(o, b) for o, b in zip(ours, base, strict=True) if "error" not in o and "error" not in b]
    out: dict = {"pairs": len(pairs)}
    for key in ("seconds", "job_peak_mb"):
        vals = [o[key] / b[key] for o, b in pairs]
        out[key + "_runs"] = vals
        out[key] = statistics.median(vals) if vals else float("nan")
    return out


def machine() -> dict:
    """The machine and versions (without importing torch: the parent process stays small)."""
    from importlib.metadata import version

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": cpu, "cpus": os.cpu_count(), "mem_gib": round(mem_gib, 1), "python": platform.python_version(),
            "torch": version("torch"), "onnx": version("onnx"), "onnxruntime": version("onnxruntime"),
            "kernel": platform.release(), "load_avg_at_start": os.getloadavg()}


def median_of(runs: list[dict], key: str) -> float:
    vals = [r[key] for r in runs if key in r]
    return statistics.median(vals) if vals else float("nan")


def summarize(runs: dict[str, list[dict]]) -> dict:
    med = {}
    for kind, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            med[kind] = {"error": rs[0]["error"] if rs else "not run"}
            continue
        med[kind] = {k: median_of(ok, k) for k in ("seconds", "peak_rss_mb", "rss_before_mb", "added_mb", "job_peak_mb")}
        med[kind]["files_mb"] = sum(ok[-1]["files"].values()) / 1e6
        if kind in ("ours", "baseline") and ok[0]["stages"]:
            med[kind]["stages"] = {s: {k: statistics.median(r["stages"][s][k] for r in ok)
                                       for k in ("seconds", "peak_rss_mb", "added_mb")}
                                   for s in ok[0]["stages"]}
        if kind == "ort":
            med[kind]["ort_calibrate_s"] = median_of(ok, "ort_calibrate_s")
    return med


def print_table(model_name: str, med: dict, first: dict, repeats: int, threads: int, runs_ours=None) -> None:
    """peak RSS: of the child during the call. job: that peak minus the child's RSS before the model was
    built (torch + exporter imported), i.e. the model itself plus everything the call added. added: the
    peak minus the RSS just before the call (freed heap can hide part of it)."""
    wb = first.get("weight_bytes", 0)
    print(f"model {model_name}: {first.get('params', 0) / 1e6:.1f}M params, fp32 weights {wb / 2**20:.0f} MiB; "
          f"{repeats} alternating run(s) each, median; {threads} thread(s)")
    print(f"{'exporter':<28}{'seconds':>9}{'x bare':>8}{'peak RSS MB':>13}{'job MB':>9}{'job/wts':>9}"
          f"{'added MB':>10}{'files MB':>10}")
    bare = med.get("bare", {})
    for kind in ORDER:
        m = med.get(kind)
        if m is None:
            continue
        if "error" in m:
            print(f"{LABELS[kind]:<28}  failed: {m['error'].splitlines()[-1][:100]}")
            continue
        ratio = m["seconds"] / bare["seconds"] if "seconds" in bare else float("nan")
        print(f"{LABELS[kind]:<28}{m['seconds']:>9.2f}{ratio:>7.2f}x{m['peak_rss_mb']:>13.0f}{m['job_peak_mb']:>9.0f}"
              f"{m['job_peak_mb'] * 2**20 / wb if wb else float('nan'):>8.2f}x{m['added_mb']:>10.0f}{m['files_mb']:>10.1f}")
    for kind in ("ours", "baseline"):
        if "stages" in med.get(kind, {}):
            print(f"{LABELS[kind]} stages (median): " + ", ".join(
                f"{s} {v['seconds']:.2f}s/+{v['added_mb']:.0f}MB" for s, v in med[kind]["stages"].items()))
    checks = [r["check"] for r in runs_ours if "check" in r] if runs_ours else []
    if checks:
        passed = sum(c["passed"] for c in checks)
        took = [c["seconds"] for c in checks if "seconds" in c]
        print(f"files of save_distill_model: {checks[0]['checks']} passed on {passed}/{len(checks)} run(s)"
              + (f" ({statistics.median(took):.1f} s each, median)" if took else "")
              + ("" if passed == len(checks) else f"; first failure: {next(c for c in checks if not c['passed'])['summary']}"))
        f = checks[0].get("figures")
        if f:
            print("verify's output figures (first run): " + "; ".join(
                f"{o['name']} (ONNX Runtime {o['opt_level']}): SQNR {o['sqnr_db']:.1f} dB over {o['batches']} input "
                f"batch(es)" for o in f["outputs"]))
    if "ort_calibrate_s" in med.get("ort", {}):
        print(f"(ORT calibration that made the fixed scales, not in the ORT row: {med['ort']['ort_calibrate_s']:.2f} s)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet50", help="resnet50, bert_base, large, tiny or tx<width>")
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma-separated subset of bare,ours,ort")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=str(RESULTS / "export_{model}.json"))
    ap.add_argument("--baseline", metavar="DIR",
                    help="a checkout of another commit of this repository: its save_distill_model is measured too, "
                         "alternating with this one's, and the ratios reported")
    ap.add_argument("--smoke", action="store_true",
                    help="one run of each, in this process (not timed cleanly), on --model (use tiny); no JSON unless --json")
    ap.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    ap.add_argument("--outdir", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child, a.model, a.outdir, a.threads)))
        return 0
    kinds = [k.strip() for k in a.kinds.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        ap.error(f"--kinds: unknown {bad}; choose from {list(KINDS)}")
    baseline = Path(a.baseline).resolve() if a.baseline else None
    if baseline is not None and not (baseline / "bench" / "export.py").is_file():
        ap.error(f"--baseline {a.baseline!r}: not a checkout of this repository (no bench/export.py in it)")
    if baseline is not None and a.smoke:
        ap.error("--baseline measures in child processes; drop --smoke")
    repeats = 1 if a.smoke else a.repeats
    measured = kinds + (["baseline"] if baseline is not None else [])
    runs: dict[str, list[dict]] = {k: [] for k in measured}
    info = machine()
    for i in range(repeats):
        for kind in measured if i % 2 == 0 else measured[::-1]:  # no exporter always runs after the same one
            if kind == "baseline":
                r = run_child("ours", a.model, a.threads, root=baseline)
            else:
                r = run_child(kind, a.model, a.threads, inprocess=a.smoke)
            runs[kind].append(r)
            if "error" in r:
                print(f"{kind}: {r['error'][-500:]}", file=sys.stderr)
    med = summarize(runs)
    first = next((r for rs in runs.values() for r in rs if "error" not in r), {})
    print_table(a.model, med, first, repeats, a.threads, [r for r in runs.get("ours", []) if "error" not in r])
    result = {"model": a.model, "params": first.get("params"), "weight_bytes": first.get("weight_bytes"),
              "repeats": repeats, "threads": a.threads, "machine": info, "median": med, "runs": runs}
    if "seconds" in med.get("bare", {}):
        result["ratio_time_vs_bare"] = {k: med[k]["seconds"] / med["bare"]["seconds"] for k in med if "seconds" in med[k]}
    if baseline is not None:
        result["baseline"] = {"root": str(baseline), "commit": _commit(baseline), "commit_ours": _commit(ROOT)}
        result["ratio_vs_baseline"] = r = paired_ratios(runs.get("ours", []), runs["baseline"])
        print(f"ours / baseline ({result['baseline']['commit_ours']} / {result['baseline']['commit']}), median of "
              f"{r['pairs']} run-by-run ratios: time {r['seconds']:.3f}x (runs "
              f"{', '.join(f'{x:.3f}' for x in r['seconds_runs'])}), job peak {r['job_peak_mb']:.3f}x (runs "
              f"{', '.join(f'{x:.3f}' for x in r['job_peak_mb_runs'])})")
    if not a.smoke or "--json" in (argv or sys.argv):
        path = Path(a.json.format(model=a.model))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
        print(f"wrote {path}")
    failed = [k for k, m in med.items() if "error" in m]
    bad_files = [r["check"]["summary"] for r in runs.get("ours", []) if "check" in r and not r["check"]["passed"]]
    return 1 if (failed and a.smoke) or bad_files else 0


if __name__ == "__main__":
    sys.exit(main())
