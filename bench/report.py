"""Markdown tables from the JSON the bench scripts wrote (bench/results/), for docs/BENCHMARKS.md.

    .venv/bin/python -m bench.report            # prints every table it finds results for
"""
from __future__ import annotations

import json
import statistics
import sys

from bench.export import LABELS, RESULTS


def _load(name: str):
    p = RESULTS / name
    return json.loads(p.read_text()) if p.is_file() else None


def export_table(res: dict) -> str:
    wb = res["weight_bytes"]
    med = res["median"]
    bare = med.get("bare", {})
    lines = [
        f"**{res['model']}** ({res['params'] / 1e6:.1f}M parameters, fp32 weights {wb / 2**30:.2f} GiB; "
        f"{res['repeats']} run(s) each, alternating, median; {res['threads']} thread(s); "
        f"load average at start {', '.join(f'{x:.1f}' for x in res['machine']['load_avg_at_start'])})",
        "",
        "| exporter | seconds | x bare | peak RSS (MB) | job peak (MB) | job peak / fp32 weights | added in call (MB) | files (MB) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for kind in ("bare", "ours", "ort"):
        m = med.get(kind)
        if m is None:
            continue
        if "error" in m:
            lines.append(f"| {LABELS[kind]} | failed: {m['error'].splitlines()[-1][:120]} | | | | | | |")
            continue
        ratio = m["seconds"] / bare["seconds"] if "seconds" in bare else float("nan")
        lines.append(
            f"| {LABELS[kind]} | {m['seconds']:.2f} | {ratio:.2f}x | {m['peak_rss_mb']:.0f} | {m['job_peak_mb']:.0f} | "
            f"{m['job_peak_mb'] * 2**20 / wb:.2f}x | {m['added_mb']:.0f} | {m['files_mb']:.1f} |")
    st = med.get("ours", {}).get("stages")
    if st:
        lines += ["", "save_distill_model by stage (median): " + "; ".join(
            f"{s} {v['seconds']:.2f} s, +{v['added_mb']:.0f} MB" for s, v in st.items())]
    checks = [r["check"] for r in res.get("runs", {}).get("ours", []) if "check" in r]
    if checks:
        passed = sum(c["passed"] for c in checks)
        line = f"Files of save_distill_model, checked after each run ({checks[0]['checks']}): {passed}/{len(checks)} passed"
        took = [c["seconds"] for c in checks if "seconds" in c]
        if took:
            line += f" ({statistics.median(took):.1f} s each, median)"
        failed = [c for c in checks if not c["passed"]]
        lines += ["", line + (f"; {failed[0]['summary']}" if failed else ".")]
        f = (failed[0] if failed else checks[0]).get("figures")
        if f:
            outs = ", ".join(f"{o['name']} ({o['opt_level']}): SQNR {o['sqnr_db']:.1f} dB, cosine {o['cosine']:.4f}"
                             + (f", arg-max agreement {o['argmax_agreement']:.2f}" if o.get("argmax_agreement") is not None
                                else "")
                             + (f", over {o['batches']} input batches" if o.get("batches", 1) > 1 else "")
                             for o in f["outputs"])
            lines += ["", f"Figures of {'that' if failed else 'the first'} run: outputs {outs}; {f['layers']} layers, worst local SQNR "
                          f"{f['min_local_sqnr_db']:.1f} dB, worst local error {f['max_local_error_steps']:.2f} steps; "
                          f"preflight {'passed' if f['preflight_ok'] else 'failed'}, deploy simulation "
                          f"{'passed' if f['deploy_simulation_ok'] else 'failed'}."]
    if "ort_calibrate_s" in med.get("ort", {}):
        lines += ["", f"ORT's calibration that produced the fixed scales (2 batches; not in the ORT row): "
                      f"{med['ort']['ort_calibrate_s']:.2f} s."]
    return "\n".join(lines)


def sweep_table(res: dict) -> str:
    lines = [
        f"{res['repeats']} run(s) each, alternating over widths and exporters, median; {res['threads']} thread(s).",
        "",
        "| width d | parameters | bare s | ours s | ours / bare | bare s per M params | ours s per M params | ours job peak MB per M params |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in res["rows"]:
        b, o = r["median"].get("bare", {}), r["median"].get("ours", {})
        if "seconds" not in b or "seconds" not in o:
            lines.append(f"| {r['width']} | {r['params'] / 1e6:.1f}M | failed | | | | | |")
            continue
        n = r["params"] / 1e6
        lines.append(f"| {r['width']} | {n:.1f}M | {b['seconds']:.2f} | {o['seconds']:.2f} | "
                     f"{o['seconds'] / b['seconds']:.2f}x | {b['seconds'] / n:.4f} | {o['seconds'] / n:.4f} | "
                     f"{o['job_peak_mb'] / n:.2f} |")
    sp = res.get("per_param_time_spread", {})
    lines += ["", "Per-parameter time, max / min across widths: " + ", ".join(f"{k} {v:.2f}x" for k, v in sp.items())]
    return "\n".join(lines)


def main(argv=None) -> int:
    for p in sorted(RESULTS.glob("export_*.json")):
        print(export_table(json.loads(p.read_text())), end="\n\n")
    s = _load("sweep.json")
    if s:
        print(sweep_table(s), end="\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
