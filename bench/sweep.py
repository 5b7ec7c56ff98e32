"""Size sweep: how export time and memory grow with parameter count.

The same architecture (bench.models.transformer_w: 6 post-LN encoder layers, heads of 64, ff = 4d,
sequence 64) at several widths; at each width save_distill_model and the bare torch.onnx.export run
side by side, alternating, in fresh child processes (bench.export's harness). Reports seconds and
added peak RSS per million parameters and how much that per-parameter cost varies across widths
(target: < 2x, i.e. time linear in parameter count).

    .venv/bin/python -m bench.sweep --widths 512,1024,1536,2048 --repeats 3
    .venv/bin/python -m bench.sweep --smoke        # widths 32,64, one run each
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.export import RESULTS, machine, run_child, summarize
from bench.models import SWEEP_WIDTHS


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", default=",".join(map(str, SWEEP_WIDTHS)))
    ap.add_argument("--kinds", default="bare,ours")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=str(RESULTS / "sweep.json"))
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args(argv)
    widths = [32, 64] if a.smoke else [int(w) for w in a.widths.split(",")]
    kinds = [k for k in a.kinds.split(",") if k]
    repeats = 1 if a.smoke else a.repeats
    info = machine()
    rows, all_runs = [], {}
    # Alternate over widths too, so slow phases of a shared machine spread over every width.
    runs = {w: {k: [] for k in kinds} for w in widths}
    for _ in range(repeats):
        for w in widths:
            for k in kinds:
                r = run_child(k, f"tx{w}", a.threads, inprocess=a.smoke)
                if "error" in r:
                    print(f"tx{w} {k}: {r['error'][-400:]}", file=sys.stderr)
                runs[w][k].append(r)
    for w in widths:
        med = summarize(runs[w])
        first = next((r for rs in runs[w].values() for r in rs if "error" not in r), {})
        n = first.get("params", 0)
        row = {"width": w, "params": n, "weight_bytes": first.get("weight_bytes"), "median": med}
        for k in kinds:
            if "seconds" in med.get(k, {}):
                row[f"{k}_s_per_Mparam"] = med[k]["seconds"] / (n / 1e6)
                row[f"{k}_added_mb_per_Mparam"] = med[k]["added_mb"] / (n / 1e6)
        rows.append(row)
        all_runs[w] = runs[w]
    print(f"size sweep: transformer_w(d), 6 layers, seq 64; {repeats} alternating run(s), median; {a.threads} thread(s)")
    head = f"{'width':>6}{'Mparams':>9}"
    for k in kinds:
        head += f"{k + ' s':>10}{'s/Mparam':>10}{'+MB/Mparam':>11}"
    if "bare" in kinds and "ours" in kinds:
        head += f"{'ours/bare':>10}"
    print(head)
    for r in rows:
        line = f"{r['width']:>6}{r['params'] / 1e6:>9.1f}"
        for k in kinds:
            m = r["median"].get(k, {})
            if "seconds" in m:
                line += f"{m['seconds']:>10.2f}{r[k + '_s_per_Mparam']:>10.4f}{r[k + '_added_mb_per_Mparam']:>11.2f}"
            else:
                line += f"{'failed':>31}"
        if "bare" in kinds and "ours" in kinds and "seconds" in r["median"].get("bare", {}) and "seconds" in r["median"].get("ours", {}):
            line += f"{r['median']['ours']['seconds'] / r['median']['bare']['seconds']:>9.2f}x"
        print(line)
    spread = {}
    for k in kinds:
        v = [r[f"{k}_s_per_Mparam"] for r in rows if f"{k}_s_per_Mparam" in r]
        if v:
            spread[k] = max(v) / min(v)
            print(f"{k}: per-parameter time varies {spread[k]:.2f}x across widths (max/min)")
    checks = [r["check"] for w in widths for r in runs[w].get("ours", []) if "check" in r]
    bad_files = [c["summary"] for c in checks if not c["passed"]]
    if checks:
        print(f"files of save_distill_model checked after each run: {len(checks) - len(bad_files)}/{len(checks)} passed"
              + (f"; first failure: {bad_files[0]}" if bad_files else ""))
    out = {"widths": widths, "repeats": repeats, "threads": a.threads, "machine": info, "rows": rows,
           "per_param_time_spread": spread, "runs": {str(w): v for w, v in all_runs.items()}}
    if not a.smoke:
        path = Path(a.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2))
        print(f"wrote {path}")
    failed = any("error" in m for r in rows for m in r["median"].values())
    return 1 if (failed and a.smoke) or bad_files else 0


if __name__ == "__main__":
    sys.exit(main())
