"""Prove on a CPU that the exported models compute what was trained.

* :func:`check_parity` — the distilled torch model vs the fake-quant ONNX model in ONNX Runtime
  (graph optimizations off and on): per output and per quantized layer figures.
* :func:`compare_deploy` — the deploy model simulated on the CPU exactly as the device defines it
  (int8 data, int8 weights, int32 accumulation and bias, uint64 deq_scale) vs the fake-quant model:
  every layer's int32 accumulator must equal the fake-quant pre-dequant output.
* :func:`preflight` — FORMATS §5/§6 checks of any deploy model, without ATC.
* :func:`build_report` / :func:`write_report` — versioned JSON, a self-contained HTML page, a PNG chart.
* :func:`verify` — all of the above on files, as ``python -m amct_core.verify`` does.
* :func:`run_with_layer_outputs` — the fake-quant model in ONNX Runtime with the quantized layers' outputs, as parity sees them (diagnosis).
"""
from __future__ import annotations

from pathlib import Path

from ._run import InputSizeError
from .deploy_sim import DeployCheckResult, SimulationError, build_simulation, compare_deploy, simulate_deploy
from .parity import ParityResult, check_parity, make_inputs, run_with_layer_outputs
from .preflight import Finding, PreflightResult, preflight
from .report import REPORT_SCHEMA, REPORT_VERSION, ReportPaths, build_report, write_report
from .tolerances import Tolerances


def verify(*, deploy=None, fake_quant=None, torch_model=None, inputs=None, example_inputs=None,
           target=None, seed: int = 0, dims=None, tolerances=None, report_dir=None,
           report_name: str = "verify_report", record=None) -> tuple[dict, ReportPaths | None]:
    """Run every check the given files allow and build (and, with ``report_dir``, write) the report.

    preflight needs ``deploy``; the deploy simulation needs ``deploy`` and ``fake_quant``; parity needs
    ``fake_quant`` and ``torch_model``. ``inputs`` feed the ONNX models (dict by graph input name or a
    sequence); for parity they are the torch model's inputs as well. Without them, inputs are generated
    (``seed``; parity shapes them like ``example_inputs`` when given); their symbolic dimensions take
    ``dims[name]``, else the export's size recorded in the file, else 1. A check that cannot run at all
    (unreadable file, unsimulatable graph) is recorded as a failure, never skipped silently.

    First, the given files (and ``record``, the record file) must come from one export: a set whose
    export ids differ, or whose record is not the one the models were built from, fails the verdict
    with a message naming the files and ids (:func:`amct_core.export_id.check_set`; files without an id
    are accepted with a note).
    """
    pf = par = dep = None
    errors: list[str] = []
    file_set = check_file_set(deploy=deploy, fake_quant=fake_quant, record=record)
    if deploy is not None:
        try:
            pf = preflight(deploy, target=target)
        except Exception as e:  # noqa: BLE001 - recorded in the report
            errors.append(f"preflight could not run on {deploy}: {type(e).__name__}: {e}")
    if deploy is not None and fake_quant is not None:
        try:
            dep = compare_deploy(deploy, fake_quant, inputs=_onnx_inputs(inputs), seed=seed, dims=dims,
                                 tolerances=tolerances)
        except Exception as e:  # noqa: BLE001
            errors.append(f"deploy simulation could not run: {type(e).__name__}: {e}")
    if torch_model is not None and fake_quant is not None:
        try:
            par = check_parity(torch_model, fake_quant, inputs=_torch_inputs(inputs),
                               example_inputs=example_inputs, seed=seed, dims=dims, tolerances=tolerances)
        except Exception as e:  # noqa: BLE001
            errors.append(f"parity could not run: {type(e).__name__}: {e}")
    if deploy is None and fake_quant is None:
        errors.append("no file given: pass a deploy model and/or a fake-quant model")
    files = {k: v for k, v in (("deploy", deploy), ("fake_quant", fake_quant)) if isinstance(v, (str, Path))}
    if isinstance(record, (str, Path)):
        files["record"] = record
    report = build_report(preflight=pf, parity=par, deploy=dep, tolerances=tolerances, files=files, errors=errors,
                          file_set=file_set)
    paths = write_report(report, report_dir, report_name) if report_dir is not None else None
    return report, paths


def check_file_set(*, deploy=None, fake_quant=None, record=None) -> dict | None:
    """Whether the given model files (paths) and record file come from one export, as the report's
    ``file_set`` section; None when fewer than two files are given or a model is not a path."""
    from ..export_id import MixedSetError, check_set, model_stamp, record_stamp

    models = [(role, p) for role, p in (("fake-quant model", fake_quant), ("deploy model", deploy)) if p is not None]
    if any(not isinstance(p, (str, Path)) for _, p in models) or len(models) + (record is not None) < 2:
        return None
    try:
        stamps = [model_stamp(role, p) for role, p in models]
        rec = record_stamp(record) if record is not None else None
        result = check_set(stamps, rec)
    except MixedSetError as e:
        return {"ok": False, "export_id": None, "message": str(e), "notes": []}
    except (OSError, ValueError) as e:  # unreadable files: the checks below say what is wrong with them
        return {"ok": False, "export_id": None, "message": f"the files could not be checked for one export: {e}",
                "notes": []}
    msg = (f"one export: id {result.export_id}" if result.export_id else "no export id in the files")
    return {"ok": True, "export_id": result.export_id, "message": msg, "notes": result.notes}


def _onnx_inputs(inputs):
    if inputs is None or isinstance(inputs, dict):
        return inputs
    try:
        import torch
        if isinstance(inputs, torch.Tensor):
            return [inputs.detach().cpu().numpy()]
        return [t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else t for t in inputs]
    except ImportError:  # pragma: no cover
        return inputs


def _torch_inputs(inputs):
    if inputs is None:
        return None
    import numpy as np
    import torch
    if isinstance(inputs, dict):
        inputs = list(inputs.values())
    if isinstance(inputs, (torch.Tensor, np.ndarray)):
        inputs = [inputs]
    return tuple(t if isinstance(t, torch.Tensor) else torch.from_numpy(np.asarray(t)) for t in inputs)


__all__ = [
    "check_file_set", "check_parity", "compare_deploy", "simulate_deploy", "build_simulation", "preflight", "verify",
    "build_report", "write_report", "make_inputs", "run_with_layer_outputs", "Tolerances", "ParityResult",
    "DeployCheckResult",
    "PreflightResult", "Finding", "SimulationError", "InputSizeError", "ReportPaths", "REPORT_SCHEMA",
    "REPORT_VERSION",
]
