"""The distill-export flow's parameter rules, in one place: the flow checks its parameters with
:func:`validate_parameters` before any work, and the CLI calls the same function before it starts any flow.

Importable without Prefect, torch or MLflow: the cheap rules run first (files exist, names, shapes,
numbers), then the ones that need the library (target, opset, tolerances), then the model: its reference
must import and the float model must run on the example input (on the CPU when it is small, else on
PyTorch's ``meta`` device, which allocates no weights). That run also gives the number of outputs, from which the default graph names
come (:func:`default_names`).
"""
from __future__ import annotations

import ast
import math
from functools import lru_cache
from pathlib import Path
from typing import Any

from tasks._params import (
    ParameterError,
    import_callable,
    input_list,
    is_mlflow_uri,
    make_float_model,
)

FLOW_FILE = Path(__file__).with_name("distill_export.py")
SMALL_MODEL_BYTES = 64 << 20  # parameters + buffers up to this are checked on the CPU
FLOW_FUNCTION = "distill_export"


@lru_cache(maxsize=1)
def flow_defaults() -> dict[str, Any]:
    """The flow's parameter defaults, read from its signature in flows/distill_export.py (not imported:
    that would import Prefect)."""
    tree = ast.parse(FLOW_FILE.read_text())
    fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == FLOW_FUNCTION)
    args = fn.args.args
    return {a.arg: ast.literal_eval(d) for a, d in zip(args[len(args) - len(fn.args.defaults):], fn.args.defaults)}


def default_names(prefix: str, count: int) -> list[str]:
    """Graph input/output names when none are given: ``input`` / ``output`` for one, ``input_0``,
    ``input_1``, ... for several."""
    return [prefix] if count == 1 else [f"{prefix}_{i}" for i in range(count)]


def known_tolerance_keys() -> set[str]:
    from dataclasses import fields

    from amct_core.verify.tolerances import Tolerances

    return {f.name for f in fields(Tolerances)}


def _names(value, parameter: str) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(n, str) and n for n in value):
        raise ParameterError(parameter, f"must be a non-empty list of non-empty strings, got {value!r}")
    if len(set(value)) != len(value):
        raise ParameterError(parameter, f"has duplicate names: {value!r}")
    return list(value)


def _number(p: dict, key: str, minimum: float, integer: bool = False) -> None:
    v = p[key]
    kind = (int,) if integer else (int, float)
    if isinstance(v, bool) or not isinstance(v, kind) or v < minimum:
        raise ParameterError(key, f"must be {'an integer' if integer else 'a number'} >= {minimum}, got {v!r}")


def _metrics(m) -> None:
    if m is None:
        return
    if not isinstance(m, dict):
        raise ParameterError("metrics", f"must be an object of metric name -> number, got {m!r}")
    for k, v in m.items():
        if not isinstance(k, str) or not k.strip() or not all(c.isalnum() or c in "_-./ " for c in k):
            raise ParameterError("metrics", f"name {k!r} must be non-empty and made of letters, digits, '_', '-', "
                                            f"'.', '/' and spaces (MLflow's rule)")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ParameterError("metrics", f"[{k!r}] must be a finite number, got {v!r}")


def _existing_file(p: dict, key: str, what: str) -> str | None:
    v = p.get(key)
    if not v:
        return None
    f = Path(v)
    if not f.is_file():
        raise ParameterError(key, f"{str(f)!r} does not exist{what}")
    return str(f.resolve())


def _dynamic_axes(axes, names: list[str], ranks: dict[str, int]) -> dict | None:
    if axes is None:
        return None
    if not isinstance(axes, dict):
        raise ParameterError("dynamic_axes", f"must be an object like {{\"input\": [0]}}, got {axes!r}")
    for n, ax in axes.items():
        if n not in names:
            raise ParameterError("dynamic_axes", f"names {n!r}, which is not a graph input or output name {names} "
                                                 f"(input_names/output_names, or the defaults)")
        idx = list(ax) if isinstance(ax, (list, tuple)) else list(ax.keys()) if isinstance(ax, dict) else None
        if idx is None:
            raise ParameterError("dynamic_axes", f"[{n!r}] must be a list of axes or an object axis -> name, got {ax!r}")
        try:
            idx = [int(a) for a in idx]
        except (TypeError, ValueError):
            raise ParameterError("dynamic_axes", f"[{n!r}] axes must be ints, got {ax!r}") from None
        if n in ranks and any(not 0 <= a < ranks[n] for a in idx):
            raise ParameterError("dynamic_axes", f"[{n!r}] = {idx} is out of range for an input of rank {ranks[n]}")
    # JSON object keys are strings: give amct_core int axes.
    return {n: ([int(a) for a in ax] if isinstance(ax, (list, tuple)) else {int(k): str(v) for k, v in ax.items()})
            for n, ax in axes.items()}


def _devices(model_ref: str, model_kwargs: dict) -> tuple[str, ...]:
    """Where to run the model for the check: a small one on the CPU (quick); a large one on the ``meta``
    device, which allocates no memory (its first use costs about a second of loading), then on the CPU
    if its forward needs real values."""
    import torch

    try:
        with torch.device("meta"):
            probe = make_float_model(model_ref, model_kwargs)
    except ParameterError as e:
        if e.parameter != "model_kwargs":
            raise
        # the callable failed on meta (e.g. it fills weights from tensors it makes): the CPU decides, and
        # reports real argument errors there
        return ("cpu",)
    except Exception:  # noqa: BLE001 - a factory that cannot build on meta: the CPU decides
        return ("cpu",)
    nbytes = sum(t.numel() * t.element_size() for t in [*probe.parameters(), *probe.buffers()])
    return ("cpu",) if nbytes <= SMALL_MODEL_BYTES else ("meta", "cpu")


def count_outputs(model_ref: str, model_kwargs: dict, inputs: list[tuple[list[int], str]]) -> int:
    """How many tensors the float model returns for example inputs of these shapes and dtypes (see
    :func:`_devices` for where it runs). Raises ParameterError naming 'input_shape' when the model does not
    accept the inputs."""
    import torch
    from torch.utils._pytree import tree_leaves

    def run(device: str) -> int:
        with torch.device(device), torch.no_grad():
            model = make_float_model(model_ref, model_kwargs).eval()
            xs = [torch.zeros(s, dtype=getattr(torch, d)) for s, d in inputs]
            return sum(isinstance(t, torch.Tensor) for t in tree_leaves(model(*xs)))

    for device in _devices(model_ref, model_kwargs):
        try:
            return run(device)
        except ParameterError:
            raise
        except Exception as e:  # noqa: BLE001
            error = e
    shapes = "; ".join(f"{s} {d}" for s, d in inputs)
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    raise ParameterError("input_shape", f"model {model_ref} does not run on example input(s) of shape {shapes}: "
                                        f"{type(error).__name__}: {first} (give the shape(s) the model takes, and "
                                        f"input_dtype if it is not float32)")


def validate_parameters(p: dict[str, Any]) -> dict[str, Any]:
    """Check every parameter of the flow (``p`` holds all of them; see :func:`flow_defaults`) and return
    them normalised (absolute paths, int axes, default graph names); raise ParameterError naming the first
    bad one. Cheap rules first; the model is imported and run last."""
    out = dict(p)
    ck = p["checkpoint"]
    if not isinstance(ck, str) or not ck.strip():
        raise ParameterError("checkpoint", "is required: a file path or an MLflow URI ('runs:/<id>/<path>', "
                                           "'models:/<name>/<version>')")
    if not is_mlflow_uri(ck):
        out["checkpoint"] = _existing_file(p, "checkpoint", " (give a file path, or an MLflow URI such as "
                                                            "'runs:/<run_id>/<path>' or 'models:/<name>/<version>')")
    name = p["name"]
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
        raise ParameterError("name", f"must be a file-name prefix without '/', got {name!r}")
    od = Path(p["output_dir"])
    probe = od.resolve()
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise ParameterError("output_dir", f"{str(od)!r} cannot be created: {str(probe)!r} is not a directory")
    out["output_dir"] = str(od.resolve())
    inputs = input_list(p["input_shape"], p["input_dtype"])
    out["input_names"] = _names(p.get("input_names"), "input_names")
    out["output_names"] = _names(p.get("output_names"), "output_names")
    if out["input_names"] is not None and len(out["input_names"]) != len(inputs):
        raise ParameterError("input_names", f"gives {len(out['input_names'])} name(s) for {len(inputs)} input(s) "
                                            f"(input_shape {p['input_shape']!r}): {out['input_names']!r}")
    kw = p.get("model_kwargs") or {}
    if not isinstance(kw, dict) or not all(isinstance(k, str) for k in kw):
        raise ParameterError("model_kwargs", f"must be a JSON object of keyword arguments, got {kw!r}")
    out["model_kwargs"] = kw
    if p.get("distill_config"):
        out["distill_config"] = _existing_file(p, "distill_config", "")
    if p.get("record_file"):
        out["record_file"] = _existing_file(p, "record_file", " (omit it to write the record from the model)")
    tol = p.get("parity_tolerances") or {}
    if not isinstance(tol, dict):
        raise ParameterError("parity_tolerances", f"must be an object, got {tol!r}")
    for k, v in tol.items():
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise ParameterError("parity_tolerances", f"[{k!r}] must be a number or null, got {v!r}")
    if not isinstance(p["mlflow_experiment"], str) or not p["mlflow_experiment"].strip():
        raise ParameterError("mlflow_experiment", "must be a non-empty experiment name")
    loc = p.get("mlflow_artifact_location")
    if loc is not None:
        if not isinstance(loc, str) or not loc.strip():
            raise ParameterError("mlflow_artifact_location", f"must be a directory or an artifact URI, got {loc!r}")
        if "://" not in loc and not loc.startswith("file:"):
            out["mlflow_artifact_location"] = str(Path(loc).resolve())
    _metrics(p.get("metrics"))
    _number(p, "mlflow_retries", 0, integer=True)
    _number(p, "mlflow_retry_delay_seconds", 0)
    _number(p, "seed", 0, integer=True)

    # the library's rules (imports amct_core, hence torch)
    from amct_core.distill import load_distill_config
    from amct_core.errors import ConfigError, TargetError
    from amct_core.targets import check_opset, get_target

    if out.get("distill_config"):
        try:  # its keys and values; the layer names are checked against the model when it is wrapped
            load_distill_config(out["distill_config"])
        except ConfigError as e:
            raise ParameterError("distill_config", str(e)) from None

    try:
        tgt = get_target(p["target"])
    except TargetError as e:
        raise ParameterError("target", str(e)) from None
    out["target"] = tgt.name
    try:
        check_opset(tgt, p["opset"])
    except TargetError as e:
        raise ParameterError("opset", str(e)) from None
    if tol:
        unknown = sorted(set(tol) - known_tolerance_keys())
        if unknown:
            raise ParameterError("parity_tolerances", f"unknown key(s) {unknown}; known: {sorted(known_tolerance_keys())}")

    # the model: it imports, and runs on the example input(s)
    import_callable(p["model"], "model")
    n_out = count_outputs(p["model"], kw, inputs)
    if out["output_names"] is not None and len(out["output_names"]) > n_out:
        raise ParameterError("output_names", f"gives {len(out['output_names'])} name(s) for the {n_out} output(s) "
                                             f"of model {p['model']}: {out['output_names']!r}")
    out["input_names"] = out["input_names"] or default_names("input", len(inputs))
    out["output_names"] = out["output_names"] or default_names("output", n_out)
    ranks = {n: len(s) for n, (s, _) in zip(out["input_names"], inputs)}
    out["dynamic_axes"] = _dynamic_axes(p.get("dynamic_axes"), out["input_names"] + out["output_names"], ranks)
    return out
