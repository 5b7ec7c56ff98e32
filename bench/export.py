"""save_distill_model against a bare torch.onnx.export of the same float model, side by side in one run.

Each measurement runs in a fresh child process (so peak RSS is its own); runs alternate between the
two exporters and the median of --repeats is reported. Prints a table with the ratios and writes JSON.

    .venv/bin/python -m bench.export --model resnet50 --repeats 3
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _build(model_name: str):
    from bench import models

    return getattr(models, model_name)()


def child(kind: str, model_name: str, outdir: str) -> dict:
    import torch

    torch.manual_seed(0)
    model, x = _build(model_name)
    stages = {}
    if kind == "bare":
        gc.collect()
        rss0 = _rss_mb()
        t0 = time.perf_counter()
        torch.onnx.export(model, (x,), os.path.join(outdir, "bare.onnx"), dynamo=False, opset_version=11)
        seconds = time.perf_counter() - t0
    else:
        from amct_core import create_distill_config, create_distill_model, save_distill_model
        from amct_core import save as save_mod

        cfg = os.path.join(outdir, "cfg.json")
        create_distill_config(cfg, model, x)
        qat = create_distill_model(cfg, model, x).eval()
        del model
        gc.collect()
        rss0 = _rss_mb()
        t0 = time.perf_counter()
        save_distill_model(qat, os.path.join(outdir, "m"), x, record_file=os.path.join(outdir, "rec.txt"))
        seconds = time.perf_counter() - t0
        stages = dict(save_mod.last_stage_seconds)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    sizes = {p.name: p.stat().st_size for p in Path(outdir).iterdir() if p.suffix in (".onnx", ".data")}
    return {"kind": kind, "seconds": seconds, "rss_before_mb": rss0, "peak_rss_mb": peak, "stages": stages, "files": sizes}


def run_child(kind: str, model_name: str, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        out = subprocess.run(
            [sys.executable, "-m", "bench.export", "--child", kind, "--model", model_name, "--outdir", d],
            cwd=ROOT, env=env, capture_output=True, text=True, check=True,
        )
        return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet50", help="a function of bench/models.py (resnet50, bert_base)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "export_{model}.json"))
    ap.add_argument("--child", choices=["bare", "ours"], help=argparse.SUPPRESS)
    ap.add_argument("--outdir", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child, a.model, a.outdir)))
        return 0
    runs = {"bare": [], "ours": []}
    for _ in range(a.repeats):
        for kind in ("bare", "ours"):
            runs[kind].append(run_child(kind, a.model, a.threads))
    med = {k: {f: statistics.median(r[f] for r in v) for f in ("seconds", "peak_rss_mb", "rss_before_mb")} for k, v in runs.items()}
    stages = {s: statistics.median(r["stages"][s] for r in runs["ours"]) for s in runs["ours"][0]["stages"]}
    ratio_t = med["ours"]["seconds"] / med["bare"]["seconds"]
    extra = {k: med[k]["peak_rss_mb"] - med[k]["rss_before_mb"] for k in med}
    print(f"model {a.model}; {a.repeats} alternating runs each, median; {a.threads} threads; {platform.processor() or platform.machine()}, {os.cpu_count()} cpus")
    print(f"{'exporter':<28}{'seconds':>10}{'peak RSS MB':>14}{'RSS before':>12}{'added MB':>10}")
    for k, label in (("bare", "torch.onnx.export (float)"), ("ours", "save_distill_model")):
        print(f"{label:<28}{med[k]['seconds']:>10.2f}{med[k]['peak_rss_mb']:>14.0f}{med[k]['rss_before_mb']:>12.0f}{extra[k]:>10.0f}")
    print(f"ratio time ours/bare: {ratio_t:.2f}x   ratio peak RSS: {med['ours']['peak_rss_mb'] / med['bare']['peak_rss_mb']:.2f}x")
    print("save_distill_model stages (median s): " + ", ".join(f"{s} {v:.2f}" for s, v in stages.items()))
    print("files: " + ", ".join(f"{n} {s / 1e6:.1f} MB" for n, s in runs["ours"][-1]["files"].items()))
    path = Path(a.json.format(model=a.model))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"model": a.model, "median": med, "ratio_time": ratio_t, "stages": stages, "runs": runs}, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
