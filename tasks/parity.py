"""Stage 6: parity of the exported models with the distilled torch model.

Uses amct_core.verify (issue 4: fake-quant parity, deploy simulation, ATC preflight, HTML/JSON report)
when it is importable. Until then a minimal check runs here: the fake-quant model in ONNX Runtime
against the torch model on seeded inputs (max abs error, cosine, arg-max agreement), with a JSON
report, an HTML page and one PNG plot.
"""
from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path

from prefect import task

from ._common import FileRef, ModelSpec, build_model, example_input, measured, stage_cache

DEFAULT_TOLERANCES = {"min_cosine": 0.999, "max_abs_error": None, "min_argmax_agreement": 0.99}
PARITY_SAMPLES = 4


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

    def intact(self) -> bool:
        return all(f.intact() for f in self.files)


def known_tolerance_keys() -> set[str]:
    return set(DEFAULT_TOLERANCES)


def _cos(a, b) -> float:
    import numpy as np

    a = a.astype(np.float64).ravel()
    b = b.astype(np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float(a @ b / (na * nb))


def _minimal_parity(spec: ModelSpec, fake_quant_path: str, out_dir: Path, tol: dict) -> tuple[bool, str, dict, list, list]:
    import numpy as np
    import onnxruntime as ort
    import torch

    model = build_model(spec)
    sess = ort.InferenceSession(fake_quant_path, providers=["CPUExecutionProvider"])
    in_names = [i.name for i in sess.get_inputs()]
    out_names = [o.name for o in sess.get_outputs()]
    per_out: dict[str, dict[str, list]] = {n: {"ref": [], "got": []} for n in out_names}
    for s in range(PARITY_SAMPLES):
        x = example_input(spec.input_shape, spec.input_dtype, spec.seed + s)
        with torch.no_grad():
            ref = model(x)
        refs = [ref] if isinstance(ref, torch.Tensor) else list(ref)
        got = sess.run(None, {in_names[0]: x.numpy()})
        for n, r, g in zip(out_names, refs, got):
            per_out[n]["ref"].append(r.detach().float().numpy())
            per_out[n]["got"].append(np.asarray(g, dtype=np.float32))
    rows, metrics, failures = [], {}, []
    for n, d in per_out.items():
        ref, got = np.concatenate(d["ref"]), np.concatenate(d["got"])
        err = np.abs(ref - got)
        row = {"output": n, "max_abs_error": float(err.max()), "mean_abs_error": float(err.mean()),
               "cosine": _cos(ref, got)}
        if ref.ndim >= 2 and ref.shape[-1] > 1:
            row["argmax_agreement"] = float((ref.argmax(-1) == got.argmax(-1)).mean())
        rows.append(row)
        for k, v in row.items():
            if k != "output":
                metrics[f"parity.{n}.{k}"] = v
        if tol.get("min_cosine") is not None and row["cosine"] < tol["min_cosine"]:
            failures.append(f"output {n!r}: cosine {row['cosine']:.6f} < min_cosine {tol['min_cosine']}")
        if tol.get("max_abs_error") is not None and row["max_abs_error"] > tol["max_abs_error"]:
            failures.append(f"output {n!r}: max_abs_error {row['max_abs_error']:.6g} > max_abs_error {tol['max_abs_error']}")
        if tol.get("min_argmax_agreement") is not None and "argmax_agreement" in row \
                and row["argmax_agreement"] < tol["min_argmax_agreement"]:
            failures.append(f"output {n!r}: argmax_agreement {row['argmax_agreement']:.4f} < "
                            f"min_argmax_agreement {tol['min_argmax_agreement']}")
        # plot
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.hist(err.ravel(), bins=50)
        ax.set_title(f"|torch - fake-quant ONNX| for output {n}")
        ax.set_xlabel("absolute error")
        ax.set_ylabel("count")
        fig.tight_layout()
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in n)
        fig.savefig(out_dir / f"abs_error_{safe}.png", dpi=90)
        plt.close(fig)
    passed = not failures
    summary = "parity passed" if passed else "parity failed: " + "; ".join(failures)
    return passed, summary, metrics, rows, failures


def _write_reports(out_dir: Path, passed: bool, summary: str, rows: list, tol: dict, checks: list) -> None:
    from amct_core._io import atomic_write_bytes

    report = {"version": 1, "verdict": "pass" if passed else "fail", "summary": summary, "tolerances": tol,
              "checks": checks, "outputs": rows}
    atomic_write_bytes(out_dir / "report.json", (json.dumps(report, indent=2) + "\n").encode())
    cols = sorted({k for r in rows for k in r}, key=lambda k: (k != "output", k))
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(str(r.get(c, '')))}</td>" for c in cols) + "</tr>" for r in rows)
    imgs = "".join(f'<p><img src="{p.name}" alt="{p.name}"></p>' for p in sorted(out_dir.glob("*.png")))
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>Parity report</title></head><body>"
            f"<h1>Parity: {'PASS' if passed else 'FAIL'}</h1><p>{html.escape(summary)}</p>"
            f"<p>Tolerances: {html.escape(json.dumps(tol))}</p>"
            f"<table border='1'><tr>{''.join(f'<th>{html.escape(c)}</th>' for c in cols)}</tr>{trs}</table>"
            f"{imgs}</body></html>")
    atomic_write_bytes(out_dir / "report.html", page.encode())


@task(name="parity", cache_policy=stage_cache("out_dir"), persist_result=True)
def parity(spec: ModelSpec, model_source_sha256: str, fake_quant_path: str, deploy_path: str, out_dir: str,
           tolerances: dict | None, target: str) -> ParityResult:
    """Compare the exported models with the torch model; write the report (JSON, HTML, PNG) to ``out_dir``."""
    tol = dict(DEFAULT_TOLERANCES)
    tol.update(tolerances or {})
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    for old in d.glob("*.png"):
        old.unlink()
    with measured() as m:
        checks = ["fake_quant_parity(minimal, onnxruntime vs torch)"]
        passed, summary, metrics, rows, _ = _minimal_parity(spec, fake_quant_path, d, tol)
        _write_reports(d, passed, summary, rows, tol, checks)
    files = [FileRef.of(d / "report.json"), FileRef.of(d / "report.html")] + [FileRef.of(p) for p in sorted(d.glob("*.png"))]
    return ParityResult(passed, summary, metrics, rows, files, m.seconds, m.peak_rss_mb, checks)
