"""The zoo table: coverage and speed read together.

For every architecture of the conformance zoo (tests/zoo_models.py, the models tests/test_zoo.py
checks): how many layers are quantized (and how many the config skips), the wall time of
``save_distill_model`` (fake-quant model + deploy model + record, target A2, opset 11, dynamic batch
axis) against the bare ``torch.onnx.export`` of the same float model with the same inputs, names,
dynamic axes and opset (and, of save_distill_model's time, its post-condition stage: sorted graphs,
the ONNX checker), and the ``amct_core.verify`` verdict of every file the runs wrote.

Everything runs in this process, one torch thread. Each model is calibrated once (the zoo's tiny
loader) before any clock starts; one untimed run of each exporter per model warms torch's exporter
up; then the runs alternate (bare, ours / ours, bare) over models and repeats, and the median of
the repeats is reported. Every file is checked after its run, outside the clock: the float model of
the bare export with ``onnx.checker.check_model(full_check=True)``, the files of save_distill_model
with ``verify(deploy=..., fake_quant=..., torch_model=...)`` (preflight, deploy simulation, parity)
on a batch of another size.

    .venv/bin/python -m bench.zoo --repeats 5
    .venv/bin/python -m bench.zoo --models resnet50,bert --repeats 1
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.export import RESULTS, machine

TARGET, OPSET = "A2", 11
EXPORT_BATCH, CHECK_BATCH = 2, 3


def _calibrated(z, workdir: Path):
    """The zoo model's float teacher and its QAT student, calibrated as the zoo's calibrated state."""
    from amct_core import create_distill_config, create_distill_model
    from amct_core.distill import calibrate_distill_model

    teacher = z.float_model()
    cfg = workdir / f"{z.name}_distill_config.json"
    create_distill_config(cfg, teacher, z.inputs(EXPORT_BATCH, 0))
    student = create_distill_model(cfg, teacher, z.inputs(EXPORT_BATCH, 0))
    calibrate_distill_model(student, cfg, [z.inputs(4, s) for s in range(1, 4)], model=teacher)
    config = json.loads(cfg.read_text())
    layers = {k: v for k, v in config.items() if isinstance(v, dict) and "quant_enable" in v}
    return teacher, student.eval(), sum(v["quant_enable"] for v in layers.values()), \
        sum(not v["quant_enable"] for v in layers.values())


def _bare(z, teacher, out: Path) -> None:
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(teacher, z.inputs(EXPORT_BATCH, 0), str(out / "bare.onnx"), dynamo=False, opset_version=OPSET,
                          input_names=list(z.input_names), output_names=list(z.output_names),
                          dynamic_axes=z.dynamic_axes)


def _ours(z, student, out: Path) -> None:
    from amct_core import save_distill_model

    save_distill_model(student, str(out / "m"), z.inputs(EXPORT_BATCH, 0), record_file=str(out / "record.txt"),
                       input_names=list(z.input_names), output_names=list(z.output_names),
                       dynamic_axes=z.dynamic_axes, target=TARGET, opset_version=OPSET)


def _check_bare(out: Path) -> str | None:
    import onnx

    try:
        onnx.checker.check_model(str(out / "bare.onnx"), full_check=True)
    except Exception as e:  # noqa: BLE001 - reported in the table
        return f"{type(e).__name__}: {e}"
    return None


def _verify_ours(z, student, out: Path) -> tuple[str | None, dict]:
    from amct_core.verify import verify

    report, _ = verify(deploy=out / "m_deploy_model.onnx", fake_quant=out / "m_fake_quant_model.onnx",
                       torch_model=student, inputs=z.inputs(CHECK_BATCH, 7), target=TARGET)
    return (None if report["verdict"] == "pass" else report["summary"]), {"checks": report["checks_run"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="", help="comma-separated subset of the zoo (default: all)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=str(RESULTS / "zoo.json"))
    a = ap.parse_args(argv)

    import torch

    from amct_core import save as save_mod
    from tests.zoo_models import ZOO

    names = [m.strip() for m in a.models.split(",") if m.strip()] or list(ZOO)
    unknown = [m for m in names if m not in ZOO]
    if unknown:
        ap.error(f"--models: unknown {unknown}; the zoo has {list(ZOO)}")
    if a.repeats < 1:
        ap.error("--repeats must be >= 1")
    torch.set_num_threads(a.threads)
    info = machine()
    runs = {n: {"bare": [], "ours": [], "check": []} for n in names}
    problems = {n: {"bare": [], "ours": []} for n in names}
    with tempfile.TemporaryDirectory(prefix="bench-zoo-") as tmp:
        root = Path(tmp)
        prepared = {}
        for n in names:
            z = ZOO[n]
            teacher, student, quantized, skipped = _calibrated(z, root)
            params = sum(p.numel() for p in teacher.parameters())
            prepared[n] = (z, teacher, student, quantized, skipped, params)

        def one(n: str, kind: str, tag: str, timed: bool) -> None:
            z, teacher, student, *_ = prepared[n]
            out = root / n / kind / tag
            out.mkdir(parents=True)
            t0 = time.perf_counter()
            if kind == "bare":
                _bare(z, teacher, out)
            else:
                _ours(z, student, out)
            seconds = time.perf_counter() - t0
            if timed:
                runs[n][kind].append(seconds)
                if kind == "ours":
                    runs[n]["check"].append(save_mod.last_stage_seconds.get("check", float("nan")))
            problem = _check_bare(out) if kind == "bare" else _verify_ours(z, student, out)[0]
            problems[n][kind].append(problem)

        for n in names:  # warm-up: torch's exporter machinery is loaded on first use
            for kind in ("bare", "ours"):
                one(n, kind, "warmup", timed=False)
        for r in range(a.repeats):
            for n in names:
                for kind in (("bare", "ours") if r % 2 == 0 else ("ours", "bare")):
                    one(n, kind, f"run{r}", timed=True)

    rows = []
    for n in names:
        z, teacher, student, quantized, skipped, params = prepared[n]
        bare, ours = statistics.median(runs[n]["bare"]), statistics.median(runs[n]["ours"])
        bad = {k: [p for p in v if p] for k, v in problems[n].items()}
        rows.append({"model": n, "params": params, "quantized": quantized, "skipped": skipped,
                     "bare_s": bare, "ours_s": ours, "ratio": ours / bare, "check_s": statistics.median(runs[n]["check"]),
                     "bare_runs": runs[n]["bare"], "ours_runs": runs[n]["ours"],
                     "bare_files": len(problems[n]["bare"]), "bare_failed": bad["bare"],
                     "ours_files": len(problems[n]["ours"]), "ours_failed": bad["ours"]})

    print(f"zoo: {len(names)} model(s), target {TARGET}, opset {OPSET}, dynamic batch axis; {a.repeats} alternating "
          f"run(s) each after one warm-up, median; {a.threads} thread(s); load average at start "
          f"{', '.join(f'{x:.1f}' for x in info['load_avg_at_start'])}")
    print()
    print("| model | parameters | layers quantized | skipped | torch.onnx.export s | save_distill_model s | ours / bare "
          "| of which post-condition s | checks of every file written |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        ok_ours = r["ours_files"] - len(r["ours_failed"])
        ok_bare = r["bare_files"] - len(r["bare_failed"])
        verdict = (f"verify pass {ok_ours}/{r['ours_files']}; bare: checker {ok_bare}/{r['bare_files']}")
        print(f"| {r['model']} | {r['params'] / 1e6:.3f}M | {r['quantized']} | {r['skipped']} | {r['bare_s']:.3f} "
              f"| {r['ours_s']:.3f} | {r['ratio']:.2f}x | {r['check_s']:.3f} | {verdict} |")
    failures = [(r["model"], p) for r in rows for p in r["ours_failed"] + r["bare_failed"]]
    for model, p in failures:
        print(f"FAILED {model}: {p}", file=sys.stderr)
    result = {"target": TARGET, "opset": OPSET, "repeats": a.repeats, "threads": a.threads, "machine": info,
              "rows": rows}
    path = Path(a.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
