"""Stage 6: checks of the exported models, by amct_core.verify (one call: :func:`amct_core.verify.verify`).

* ATC preflight of the deploy model (FORMATS §5/§6, no ATC needed);
* deploy simulation on the CPU vs the fake-quant model (int32 accumulators must be identical);
* parity of the fake-quant model in ONNX Runtime vs the distilled torch model (per output, per layer).

Writes ``report.json``, ``report.html`` and ``report_layers.png`` into the stage's directory and
returns the verdict with flat figures for MLflow and rows for Prefect's table artifact.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from prefect import task
from prefect.artifacts import create_table_artifact

from .files import FileRef
from .model import build_model, spec_inputs
from .specs import ModelSpec
from .stage import measured, stage_cache

REPORT_NAME = "report"
MAX_LAYER_ROWS = 10


@dataclass
class ParityResult:
    passed: bool
    summary: str
    metrics: dict  # flat name -> float, ready for MLflow
    rows: list[dict]  # the table shown in Prefect's UI
    files: list[FileRef]  # report.json, report.html, plots
    seconds: float
    peak_rss_mb: float
    checks: list[str] = field(default_factory=list)  # which checks ran
    layer_order: str = ""  # how the parity layers are ordered, in the report and in ``rows``

    def intact(self) -> bool:
        return all(f.intact() for f in self.files)


def _num(v):
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def summarize(report: dict) -> tuple[dict, list[dict]]:
    """Flat metrics (MLflow) and table rows (Prefect) from a verify report."""
    metrics: dict[str, float] = {"verify.passed": 1.0 if report.get("verdict") == "pass" else 0.0}
    rows: list[dict] = []
    figs = ("cosine", "sqnr_db", "max_abs_error", "max_error_steps", "argmax_agreement")

    def row(check, name, ok, f=None, message="", local=None):
        r = {"check": check, "name": name, "ok": bool(ok)}
        for k in figs:
            r[k] = None if f is None else _num(f.get(k))
        r["local_sqnr_db"] = None if local is None else _num(local.get("sqnr_db"))
        r["local_max_error_steps"] = None if local is None else _num(local.get("max_error_steps"))
        r["message"] = message
        rows.append(r)

    pf = report.get("preflight")
    if pf:
        metrics["preflight.errors"] = float(pf.get("errors", 0))
        metrics["preflight.warnings"] = float(pf.get("warnings", 0))
        row("preflight", pf.get("model", "deploy"), pf.get("ok"),
            message=f"{pf.get('errors', 0)} error(s), {pf.get('warnings', 0)} warning(s)")
    par = report.get("parity")
    if par:
        for o in par.get("outputs", []):
            lvl = o.get("opt_level", "disabled")
            suffix = "" if lvl == "disabled" else f".ort_{lvl}"
            for k in figs:
                v = _num(o.get("figures", {}).get(k))
                if v is not None:
                    metrics[f"parity.{o['name']}{suffix}.{k}"] = v
            row(f"parity output (ORT {lvl})", o["name"], o.get("ok"), o.get("figures"), ", ".join(o.get("failed", [])))
        layers = par.get("layers", [])
        sq = [_num(l.get("figures", {}).get("sqnr_db")) for l in layers]
        cs = [_num(l.get("figures", {}).get("cosine")) for l in layers]
        if any(v is not None for v in sq):
            metrics["parity.worst_layer_sqnr_db"] = min(v for v in sq if v is not None)
        if any(v is not None for v in cs):
            metrics["parity.worst_layer_cosine"] = min(v for v in cs if v is not None)
        for l in layers[:MAX_LAYER_ROWS]:  # the report's order (its "layer_order"), worst first
            row("parity layer", l["name"], l.get("ok", True), l.get("figures"), ", ".join(l.get("failed", []) or []),
                l.get("local"))
    dep = report.get("deploy_simulation")
    if dep:
        layers = dep.get("layers", [])
        metrics["deploy_sim.acc_mismatches"] = float(sum(int(l.get("acc_mismatches") or 0) for l in layers))
        outs = dep.get("outputs", [])
        if outs:
            metrics["deploy_sim.output_max_abs_diff"] = max(_num(o.get("max_abs_diff")) or 0.0 for o in outs)
        row("deploy simulation", "all layers", dep.get("ok"), message=dep.get("message", ""))
    for f in report.get("failures", []):
        if f.get("check") == "error":
            row("error", "", False, message=f.get("message", ""))
    return metrics, rows


@task(name="parity", cache_policy=stage_cache("out_dir"), persist_result=True)
def parity(spec: ModelSpec, fake_quant_path: str, deploy_path: str, out_dir: str, tolerances: dict | None,
           target: str) -> ParityResult:
    """Preflight + deploy simulation + parity of the exported models; the report goes to ``out_dir``."""
    from amct_core.verify import verify

    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    with measured() as m:
        model = build_model(spec)
        report, paths = verify(deploy=deploy_path, fake_quant=fake_quant_path, torch_model=model,
                               example_inputs=spec_inputs(spec), target=target, seed=spec.seed,
                               tolerances=tolerances or None, report_dir=d, report_name=REPORT_NAME)
    metrics, rows = summarize(report)
    files = [FileRef.of(paths.json), FileRef.of(paths.html)] + ([FileRef.of(paths.png)] if paths.png else [])
    return ParityResult(report.get("verdict") == "pass", report.get("summary", ""), metrics, rows, files,
                        m.seconds, m.peak_rss_mb, list(report.get("checks_run", [])),
                        (report.get("parity") or {}).get("layer_order", ""))


def show_parity(par: ParityResult, name: str, target: str) -> None:
    """The parity verdict as a table in Prefect's UI (the flow run's artifact ``parity-summary``): per check,
    per output, and the ten worst layers in the report's order."""
    print(par.summary)  # the flow's log (log_prints)
    create_table_artifact(
        table=[{"verdict": "PASS" if par.passed else "FAIL", **r} for r in par.rows],
        key="parity-summary",
        description=f"Parity of {name} ({target}): {par.summary}. Parity layers: {par.layer_order or 'worst first'}.",
    )
