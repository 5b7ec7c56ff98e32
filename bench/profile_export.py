"""Where save_distill_model's time and memory go, on one model, in this process.

Three passes over the same QAT model (each a full save_distill_model):
  1. cProfile: the functions with the most cumulative and own time, split into torch / onnx / numpy /
     amct_core by file;
  2. RSS timeline: a thread samples VmRSS every 10 ms while the stages run (stage boundaries marked),
     giving the memory at each stage and what is still alive when the next starts;
  3. tracemalloc (numpy and Python allocations, not torch's own allocator): the peak of traced memory
     and the allocation sites holding the most at that peak.

    .venv/bin/python -m bench.profile_export --model resnet50
    .venv/bin/python -m bench.profile_export --model bert_base --passes cprofile,rss
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import tempfile
import threading
import time
import tracemalloc
from contextlib import contextmanager
from pathlib import Path

from bench.export import RESULTS, rss_mb

AREAS = (("amct_core", "/amct_core/"), ("torch", "/torch/"), ("onnx", "/onnx/"), ("numpy", "/numpy/"),
         ("protobuf", "/google/protobuf/"))


def _area(filename: str) -> str:
    for name, part in AREAS:
        if part in filename:
            return name
    if filename.startswith("~") or filename.startswith("<"):
        return "builtin"
    return "other"


def _prepare(model_name: str, threads: int):
    import torch

    torch.set_num_threads(threads)
    from amct_core import create_distill_config, create_distill_model
    from bench import models

    model, x = models.by_name(model_name)
    d = tempfile.mkdtemp(prefix="bench-profile-")
    create_distill_config(f"{d}/cfg.json", model, x)
    qat = create_distill_model(f"{d}/cfg.json", model, x).eval()
    return qat, x, d


def _save(qat, x, d):
    from amct_core import save_distill_model

    save_distill_model(qat, f"{d}/m", x, record_file=f"{d}/rec.txt")


def pass_cprofile(qat, x, d, top: int) -> dict:
    pr = cProfile.Profile()
    t0 = time.perf_counter()
    pr.enable()
    _save(qat, x, d)
    pr.disable()
    wall = time.perf_counter() - t0
    st = pstats.Stats(pr)
    own_by_area: dict[str, float] = {}
    rows = []
    for (fn, line, func), (_cc, nc, tt, ct, _) in st.stats.items():
        a = _area(fn)
        own_by_area[a] = own_by_area.get(a, 0.0) + tt
        rows.append({"function": f"{Path(fn).name}:{line}({func})", "file": fn, "area": a, "calls": nc,
                     "own_s": tt, "cum_s": ct})
    by_own = sorted(rows, key=lambda r: -r["own_s"])[:top]
    by_cum = sorted((r for r in rows if "/amct_core/" in r["file"] or "torch/onnx" in r["file"]),
                    key=lambda r: -r["cum_s"])[:top]
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(top)
    return {"wall_s": wall, "own_s_by_area": own_by_area, "top_own": by_own, "top_cum_amct_and_torch_onnx": by_cum,
            "pstats_text": s.getvalue()}


@contextmanager
def _marked_stages(marks: list):
    from amct_core import save as save_mod

    orig = save_mod._stage

    @contextmanager
    def marked(name):
        marks.append((time.perf_counter(), name, "start", rss_mb()))
        with orig(name):
            yield
        marks.append((time.perf_counter(), name, "end", rss_mb()))

    save_mod._stage = marked
    try:
        yield
    finally:
        save_mod._stage = orig


def pass_rss(qat, x, d, interval: float = 0.01) -> dict:
    import gc

    gc.collect()
    samples, marks, stop = [], [], threading.Event()

    def sample():
        while not stop.is_set():
            samples.append((time.perf_counter(), rss_mb()))
            time.sleep(interval)

    base = rss_mb()
    th = threading.Thread(target=sample, daemon=True)
    t0 = time.perf_counter()
    th.start()
    with _marked_stages(marks):
        _save(qat, x, d)
    stop.set()
    th.join()
    stages = {}
    for i, (t, name, kind, r) in enumerate(marks):
        if kind != "start":
            continue
        t_end, _, _, r_end = next(m for m in marks[i + 1:] if m[1] == name and m[2] == "end")
        inside = [s[1] for s in samples if t <= s[0] <= t_end] or [r, r_end]
        stages[name] = {"seconds": t_end - t, "rss_start_mb": r, "rss_end_mb": r_end, "peak_mb": max(inside + [r, r_end])}
    return {"rss_before_mb": base, "peak_mb": max([s[1] for s in samples] + [base]), "stages": stages,
            "timeline": [(round(t - t0, 3), round(r, 1)) for t, r in samples[:: max(1, len(samples) // 400)]]}


def pass_tracemalloc(qat, x, d, top: int) -> dict:
    import gc

    gc.collect()
    tracemalloc.start(8)
    peak_snap = {}
    marks = []
    from amct_core import save as save_mod

    orig = save_mod._stage

    @contextmanager
    def snap_stage(name):
        tracemalloc.reset_peak()
        with orig(name):
            yield
        cur, peak = tracemalloc.get_traced_memory()
        marks.append({"stage": name, "current_mb": cur / 2**20, "stage_peak_mb": peak / 2**20})
        peak_snap[name] = tracemalloc.take_snapshot()

    save_mod._stage = snap_stage
    try:
        _save(qat, x, d)
    finally:
        save_mod._stage = orig
        tracemalloc.stop()
    held = {}
    for name, snap in peak_snap.items():
        stats = snap.statistics("lineno")[:top]
        held[name] = [{"site": str(s.traceback[0]), "mb": s.size / 2**20, "count": s.count} for s in stats]
    return {"stages": marks, "held_at_stage_end": held}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--passes", default="cprofile,rss,tracemalloc")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--json", default=str(RESULTS / "profile_{model}.json"))
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args(argv)
    qat, x, d = _prepare(a.model, a.threads)
    try:
        return _run(a, qat, x, d)
    finally:
        import shutil

        shutil.rmtree(d, ignore_errors=True)


def _run(a, qat, x, d) -> int:
    _save(qat, x, d)  # warm-up: first-call imports and caches are not the exporter's steady cost
    from bench.export import require_valid

    require_valid(qat, x, f"{d}/m")  # every pass below writes these same files again
    out = {"model": a.model}
    passes = [p for p in a.passes.split(",") if p]
    if "cprofile" in passes:
        r = out["cprofile"] = pass_cprofile(qat, x, d, a.top)
        print(f"== cProfile ({r['wall_s']:.2f} s under the profiler); own time by area:")
        for k, v in sorted(r["own_s_by_area"].items(), key=lambda kv: -kv[1]):
            print(f"   {k:<10}{v:>8.2f} s")
        print("   top own time:")
        for row in r["top_own"][:15]:
            print(f"   {row['own_s']:>7.2f} s own {row['cum_s']:>7.2f} s cum {row['calls']:>8} calls  {row['function']}")
        print("   top cumulative (amct_core, torch.onnx):")
        for row in r["top_cum_amct_and_torch_onnx"][:20]:
            print(f"   {row['cum_s']:>7.2f} s cum {row['own_s']:>7.2f} s own {row['calls']:>8} calls  {row['function']}")
    if "rss" in passes:
        r = out["rss"] = pass_rss(qat, x, d)
        print(f"== RSS timeline: before {r['rss_before_mb']:.0f} MB, peak {r['peak_mb']:.0f} MB "
              f"(+{r['peak_mb'] - r['rss_before_mb']:.0f})")
        for name, s in r["stages"].items():
            print(f"   {name:<18}{s['seconds']:>7.2f} s  RSS start {s['rss_start_mb']:>7.0f}  peak {s['peak_mb']:>7.0f}  end {s['rss_end_mb']:>7.0f} MB")
    if "tracemalloc" in passes:
        r = out["tracemalloc"] = pass_tracemalloc(qat, x, d, a.top)
        print("== tracemalloc (numpy + Python allocations), per stage:")
        for m in r["stages"]:
            print(f"   {m['stage']:<18} peak {m['stage_peak_mb']:>8.1f} MB, held at end {m['current_mb']:>8.1f} MB")
        for name, sites in r["held_at_stage_end"].items():
            big = [s for s in sites[:4] if s["mb"] >= 1]
            if big:
                print(f"   held at end of {name}: " + "; ".join(f"{s['site']} {s['mb']:.0f} MB" for s in big))
    if not a.smoke:
        path = Path(a.json.format(model=a.model))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2, default=str))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
