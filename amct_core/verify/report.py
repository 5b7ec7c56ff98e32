"""The verification report: versioned JSON for machines, one self-contained HTML page for people,
and a per-layer chart (PNG, embedded in the page and also written next to it)."""
from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

from .._io import atomic_write_bytes
from .tolerances import Tolerances, as_tolerances

REPORT_SCHEMA = "amct_core.verify.report"
REPORT_VERSION = 1


@dataclass(frozen=True)
class ReportPaths:
    json: Path
    html: Path
    png: Path | None


def _clean(o):
    """JSON-safe: NaN/inf floats become None (the schema documents it), tuples become lists."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if hasattr(o, "item") and callable(o.item):  # numpy scalars
        return _clean(o.item())
    return o


def build_report(*, preflight=None, parity=None, deploy=None, tolerances=None, files: dict | None = None,
                 errors: list[str] | None = None, file_set: dict | None = None) -> dict:
    """Assemble the report dict from the results of :func:`preflight`, :func:`check_parity` and
    :func:`compare_deploy` (any may be None: that check did not run). ``errors``: checks that could not
    run at all (they fail the verdict). ``file_set``: whether the files come from one export
    (``{"ok", "export_id", "message", "notes"}``); a mixed set fails the verdict and leads the summary."""
    from .. import __version__

    tol: Tolerances = as_tolerances(tolerances)
    sections = {}
    failures = []
    if preflight is not None:
        sections["preflight"] = preflight.to_dict()
        if not preflight.ok:
            e = preflight.errors[0]
            failures.append({"check": "preflight", "layer": e.node, "figure": e.code, "message": str(e)})
    if parity is not None:
        sections["parity"] = parity.to_dict()
        if not parity.ok:
            w = next((l for l in parity.layers_sorted() if not l.ok), None)
            o = next((o for o in parity.outputs if not o.ok), None)
            failures.append({
                "check": "parity", "layer": w.name if w else None,
                "output": o.name if (o and not w) else None,
                "figure": (w.failed[0] if w else (o.failed[0] if o else None)), "message": parity.message,
            })
    if deploy is not None:
        sections["deploy_simulation"] = deploy.to_dict()
        if not deploy.ok:
            w = next((l for l in deploy.layers_sorted() if not l.ok), None)
            failures.append({"check": "deploy_simulation", "layer": w.name if w else None,
                             "figure": w.failed_figure if w else None, "message": deploy.message})
    for e in errors or []:
        failures.append({"check": "error", "layer": None, "figure": None, "message": e})
    if file_set is not None:
        sections["file_set"] = file_set
        if not file_set["ok"]:
            failures.insert(0, {"check": "file_set", "layer": None, "figure": None, "message": file_set["message"]})
    ran = [k for k in ("preflight", "parity", "deploy_simulation") if k in sections]
    ok = not failures and bool(ran)
    if ok:
        summary = "PASS: " + "; ".join(
            s.summary() if hasattr(s, "summary") else s.message for s in (preflight, parity, deploy) if s is not None)
    elif not ran and not failures:
        summary = "FAIL: no check ran"
    else:
        summary = "FAIL: " + failures[0]["message"]
        if len(failures) > 1:
            summary += " | also failed: " + "; ".join(
                f"{f['check']}" + (f" (layer {f['layer']!r}: {f['figure']})" if f.get("layer") else "")
                for f in failures[1:])
    return _clean({
        "schema": REPORT_SCHEMA,
        "version": REPORT_VERSION,
        "generator": f"amct_core {__version__}",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "verdict": "pass" if ok else "fail",
        "summary": summary,
        "failures": failures,
        "checks_run": ran,
        "files": {k: str(v) for k, v in (files or {}).items()},
        "tolerances": tol.to_dict(),
        **sections,
    })


# ---------------------------------------------------------------------------------------------
# chart
# ---------------------------------------------------------------------------------------------
def layer_chart_figure(report: dict):
    """The per-layer chart as a matplotlib Figure (None when no check has per-layer figures): parity SQNR
    (local and end-to-end) and deploy accumulator agreement, each panel in its section's ``layer_order``
    (worst at top), the legend below the panels where it covers no bar."""
    par = report.get("parity")
    dep = report.get("deploy_simulation")
    panels = [p for p in (par and par.get("layers"), dep and dep.get("layers")) if p]
    if not panels:
        return None
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n = max(len(p) for p in panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), max(3.0, 0.38 * n + 2.0)), squeeze=False,
                             layout="constrained")
    k = 0
    tol = report.get("tolerances", {})
    if par and par.get("layers"):
        ax = axes[0][k]
        k += 1
        layers = par["layers"]
        names = [l["name"] for l in layers][::-1]
        loc = [min((l["local"] or l["figures"])["sqnr_db"] or 0.0, 150.0) for l in layers][::-1]
        e2e = [min(l["figures"]["sqnr_db"] or 0.0, 150.0) for l in layers][::-1]
        ys = range(len(names))
        ax.barh([y + 0.2 for y in ys], loc, height=0.4, label="local: torch layer on ONNX Runtime's input (orders the rows)",
                color=["#c0392b" if not l["ok"] else "#2e86c1" for l in layers][::-1])
        ax.barh([y - 0.2 for y in ys], e2e, height=0.4, label="end-to-end: layer output, same model inputs",
                color="#aed6f1")
        ax.axvline(tol.get("layer_local_sqnr_min_db", 40.0), color="#1a5276", ls=":", lw=1.5, label="local threshold")
        ax.axvline(tol.get("layer_sqnr_min_db", 20.0), color="#c0392b", ls="--", lw=1, label="end-to-end threshold")
        ax.set_yticks(list(ys), names, fontsize=8)
        ax.set_xlabel("SQNR torch vs ONNX Runtime fake-quant [dB] (capped at 150)")
        ax.set_title("Fake-quant parity per layer\n(worst at top: failing, then lowest local SQNR)", fontsize=10)
        fig.legend(*ax.get_legend_handles_labels(), loc="outside lower left", fontsize=7, ncol=2, frameon=False)
    if dep and dep.get("layers"):
        ax = axes[0][k]
        layers = dep["layers"]
        names = [l["name"] for l in layers][::-1]
        frac = [100.0 * (l["acc_exact_fraction"] or 0.0) for l in layers][::-1]
        ax.barh(range(len(names)), frac, color=["#c0392b" if not l["ok"] else "#27ae60" for l in layers][::-1])
        for y, l in enumerate(layers[::-1]):
            d = l["acc_max_abs_diff"]
            label = f"max|diff| {d:.0f}" if d is not None else "n/a"
            if l.get("inherited"):
                label += " (input already differs upstream)"
            ax.text(1.5, y, label, va="center", fontsize=7,
                    color="white" if (l["acc_exact_fraction"] or 0) > 0.6 else "#1b2631")
        ax.set_yticks(list(range(len(names))), names, fontsize=8)
        ax.set_xlim(0, 100)
        ax.set_xlabel("int32 accumulators equal to fake-quant [%]")
        ax.set_title("Deploy simulation per layer\n(worst at top: failing layers first, in graph order)", fontsize=10)
    return fig


def layer_chart_png(report: dict) -> bytes | None:
    """:func:`layer_chart_figure` as PNG bytes."""
    fig = layer_chart_figure(report)
    if fig is None:
        return None
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------
def _fmt(v, nd=4) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 1e5 or abs(v) < 1e-3:
            return f"{v:.3e}"
        return f"{v:.{nd}f}".rstrip("0").rstrip(".")
    return html.escape(str(v))


def _table(headers: list[str], rows: list[list], row_ok: list[bool] | None = None) -> str:
    h = "".join(f"<th>{html.escape(x)}</th>" for x in headers)
    body = []
    for i, r in enumerate(rows):
        cls = "" if row_ok is None else (' class="ok"' if row_ok[i] else ' class="bad"')
        body.append(f"<tr{cls}>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>")
    return f"<table><thead><tr>{h}</tr></thead><tbody>{''.join(body)}</tbody></table>"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5em auto;max-width:1200px;color:#1b2631;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #d5d8dc}
.verdict{padding:.8em 1em;border-radius:6px;font-weight:600;font-size:1.05em}
.pass{background:#d4efdf;border:1px solid #27ae60}.fail{background:#fadbd8;border:1px solid #c0392b}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0;width:100%}
th,td{border:1px solid #d5d8dc;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#f4f6f7}tr.bad td{background:#fdedec}tr.ok td:first-child{border-left:3px solid #27ae60}
tr.bad td:first-child{border-left:3px solid #c0392b}code{font-size:.95em}
img{max-width:100%;border:1px solid #d5d8dc}.muted{color:#707b7c;font-size:.85em}
"""


def _layer_figures_note(tol: dict) -> str:
    """How to read the per-layer parity figures, in particular a large end-to-end max error in a PASS."""
    return (
        '<p class="muted">A step is one unit of the layer\'s int32 accumulator (its dequantization scale = input '
        "scale &times; weight scale). <b>Local</b> figures feed the torch layer ONNX Runtime's own input of the "
        "layer, so they measure this layer's factors alone; the verdict uses them (local SQNR &ge; "
        f"{_fmt(tol.get('layer_local_sqnr_min_db'))} dB; local max error &le; {_fmt(tol.get('layer_local_max_steps'))} "
        f"steps or &le; {_fmt(tol.get('layer_local_max_rel'))} of the layer's max |output|). <b>End-to-end</b> "
        "figures compare the layer outputs for the same model inputs: the file rounds each bias to the "
        "accumulator's step (torch keeps it in float) and torch and ONNX Runtime add in a different float32 order, "
        "so an activation on a rounding boundary can quantize one int8 step apart, which moves an output by its "
        "weight, up to 127 steps, and such flips add up downstream. An end-to-end max error of "
        "about 127 steps is one flipped input element, not an error of the export; only the end-to-end SQNR "
        f"(&ge; {_fmt(tol.get('layer_sqnr_min_db'))} dB) and cosine (&ge; {_fmt(tol.get('layer_cosine_min'))}) are "
        f"checked. An output or layer with fewer than {_fmt(tol.get('figure_min_values'))} values per input batch "
        "is compared on as many batches as give it that many, and its figures pool them.</p>")


def render_html(report: dict, png: bytes | None, png_name: str | None) -> str:
    e = html.escape
    ok = report["verdict"] == "pass"
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>amct_core verification report: {'PASS' if ok else 'FAIL'}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>amct_core verification report</h1>",
        f'<div class="verdict {"pass" if ok else "fail"}" id="verdict">{e(report["summary"])}</div>',
        f'<p class="muted">schema {e(report["schema"])} v{report["version"]}, {e(report["generator"])}, '
        f'{e(report["created"])}. Checks run: {e(", ".join(report["checks_run"]) or "none")}.</p>',
    ]
    if report.get("failures"):
        parts.append("<h2>Failures</h2>")
        parts.append(_table(["check", "layer / node", "figure", "message"],
                            [[e(f["check"]), e(f.get("layer") or f.get("output") or ""), e(f.get("figure") or ""),
                              e(f["message"])] for f in report["failures"]]))
    if report.get("files"):
        parts.append("<h2>Files</h2>")
        parts.append(_table(["role", "path"], [[e(k), f"<code>{e(v)}</code>"] for k, v in report["files"].items()]))
    pf = report.get("preflight")
    if pf is not None:
        parts.append("<h2>ATC preflight</h2>")
        parts.append(f"<p>Target <b>{e(pf['target'])}</b>, opset {_fmt(pf['opset'])}, {len(pf['layers'])} quantized "
                     f"layer(s), {pf['errors']} error(s), {pf['warnings']} warning(s).</p>")
        if pf["findings"]:
            parts.append(_table(["severity", "code", "node", "finding", "expected"],
                                [[e(f["severity"]), e(f["code"]), f"<code>{e(f['node'])}</code>", e(f["message"]),
                                  e(f["expected"])] for f in pf["findings"]],
                                [f["severity"] != "error" for f in pf["findings"]]))
    par = report.get("parity")
    if par is not None:
        parts.append("<h2>Fake-quant parity: torch vs ONNX Runtime</h2>")
        parts.append(f"<p>{e(par['message'])}</p>")
        if par.get("problems"):
            parts.append("<ul>" + "".join(f"<li><b>problem:</b> {e(p)}</li>" for p in par["problems"]) + "</ul>")
        if par.get("notes"):
            parts.append("<ul>" + "".join(f"<li>note: {e(p)}</li>" for p in par["notes"]) + "</ul>")
        parts.append("<h3>Per output</h3>")
        parts.append(_table(
            ["output", "ORT optimizations", "input batches", "max abs error", "max error [output steps]", "cosine",
             "SQNR [dB]", "arg-max agreement", "failed"],
            [[f"<code>{e(o['name'])}</code>", e(o["opt_level"]), _fmt(o["figures"].get("batches", 1)),
              _fmt(o["figures"]["max_abs_error"]),
              _fmt(o["figures"]["max_error_steps"]), _fmt(o["figures"]["cosine"], 6), _fmt(o["figures"]["sqnr_db"], 2),
              _fmt(o["figures"]["argmax_agreement"]), e("; ".join(o["failed"]))] for o in par["outputs"]],
            [o["ok"] for o in par["outputs"]]))
        parts.append(f"<h3>Per quantized layer ({e(par.get('layer_order', 'worst first'))})</h3>")
        parts.append(_table(
            ["layer", "op", "local SQNR [dB]", "local max error [steps]", "end-to-end SQNR [dB]",
             "end-to-end SQNR, ORT opt. on [dB]", "end-to-end cosine", "end-to-end max error [steps] (not checked)",
             "folded BN", "failed"],
            [[f"<code>{e(l['name'])}</code>", e(l["kind"]), _fmt((l.get("local") or {}).get("sqnr_db"), 2),
              _fmt((l.get("local") or {}).get("max_error_steps"), 3), _fmt(l["figures"]["sqnr_db"], 2),
              _fmt((l.get("figures_opt_all") or {}).get("sqnr_db"), 2), _fmt(l["figures"]["cosine"], 6),
              _fmt(l["figures"]["max_error_steps"], 2), e(l.get("folded_bn") or ""), e("; ".join(l["failed"]))]
             for l in par["layers"]],
            [l["ok"] for l in par["layers"]]))
        parts.append(_layer_figures_note(report["tolerances"]))
    dep = report.get("deploy_simulation")
    if dep is not None:
        parts.append("<h2>Deploy simulation vs fake-quant model</h2>")
        parts.append(f"<p>{e(dep['message'])}</p>")
        if dep.get("problems"):
            parts.append("<ul>" + "".join(f"<li><b>problem:</b> {e(p)}</li>" for p in dep["problems"]) + "</ul>")
        if dep.get("notes"):
            parts.append("<ul>" + "".join(f"<li>note: {e(p)}</li>" for p in dep["notes"]) + "</ul>")
        parts.append(f"<h3>Per quantized layer ({e(dep.get('layer_order', 'worst first'))})</h3>")
        parts.append(_table(
            ["layer", "op", "cause", "int8 input mismatches", "int32 acc. equal [%]", "acc. max |diff|", "allowed slack",
             "acc. max |value|", "dequant max rel. diff", "weights differing", "result"],
            [[f"<code>{e(l['name'])}</code>", e(l["kind"]),
              "" if l["ok"] else ("upstream (its input already differs)" if l.get("inherited") else "<b>this layer</b>"),
              _fmt(l["input_grid_mismatches"]),
              _fmt(100.0 * (l["acc_exact_fraction"] or 0.0), 3), _fmt(l["acc_max_abs_diff"]), _fmt(l["acc_allowed_slack"]),
              _fmt(l["acc_max_abs"]), _fmt(l["dequant_max_rel_diff"]),
              _fmt((l.get("static") or {}).get("weight_differences")), e(l["message"])] for l in dep["layers"]],
            [l["ok"] for l in dep["layers"]]))
        parts.append("<h3>Per output</h3>")
        parts.append(_table(["output", "max |deploy - fake-quant|", "allowed", "max |fake-quant|", "bit-identical"],
                            [[f"<code>{e(o['name'])}</code>", _fmt(o["max_abs_diff"]), _fmt(o["allowed"]),
                              _fmt(o["ref_max_abs"]), _fmt(o["identical"])] for o in dep["outputs"]],
                            [o["ok"] for o in dep["outputs"]]))
    if png is not None:
        b64 = base64.b64encode(png).decode("ascii")
        parts.append("<h2>Per-layer chart</h2>")
        parts.append(f'<img alt="per-layer chart" src="data:image/png;base64,{b64}">')
        if png_name:
            parts.append(f'<p class="muted">Also written as <code>{e(png_name)}</code>.</p>')
    parts.append("<h2>Tolerances</h2>")
    parts.append(_table(["name", "value"], [[f"<code>{e(k)}</code>", _fmt(v, 8)] for k, v in report["tolerances"].items()]))
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(report: dict, out_dir, basename: str = "verify_report") -> ReportPaths:
    """Write ``<basename>.json``, ``<basename>.html`` and ``<basename>_layers.png`` into ``out_dir``
    (each atomically). The PNG is also embedded in the HTML page."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    png = layer_chart_png(report)
    png_path = d / f"{basename}_layers.png" if png is not None else None
    if png is not None:
        atomic_write_bytes(png_path, png)
    jp, hp = d / f"{basename}.json", d / f"{basename}.html"
    atomic_write_bytes(jp, (json.dumps(report, indent=2, allow_nan=False) + "\n").encode("utf-8"))
    atomic_write_bytes(hp, render_html(report, png, png_path.name if png_path else None).encode("utf-8"))
    return ReportPaths(jp, hp, png_path)
