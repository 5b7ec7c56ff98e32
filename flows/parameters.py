"""The distill-export flow's parameters: as the flow declares them, and as checked into an export plan.

Declared: the flow's signature and the Args of its docstring (flows/distill_export.py) are the one list
of parameters, with their types, defaults and help. :func:`flow_parameters` reads them from the file's
source without importing it (that would import Prefect): ``amct-export run`` builds its options from
them, and the defaults of a partial set of parameters come from them.

Checked: :meth:`ExportPlan.check` applies every parameter rule once and gives the plan the stages run.
The flow calls it first; ``amct-export run`` calls it before it starts any flow, so a bad parameter
costs about a second and one line naming it. Rules that are the library's are the library's
(``amct_core.targets``, ``amct_core.arguments``, ``amct_core.save.normalize_dynamic_axes``,
``amct_core.verify.Tolerances``, ``amct_core.distill.load_distill_config``); the rules here are the
pipeline's own (paths, MLflow names, numbers). The cheap rules run first, without torch; then the
library's; then the model: its reference must import and the float model must run on the example input
(on the CPU when it is small, else on PyTorch's ``meta`` device, which allocates no weights). That run
gives the number of outputs, from which the default graph names come (:func:`default_names`).
"""
from __future__ import annotations

import ast
import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from tasks.specs import (
    GraphSpec,
    ModelSpec,
    ParameterError,
    TrackingSpec,
    import_callable,
    input_list,
    is_mlflow_uri,
    make_float_model,
)

FLOW_FILE = Path(__file__).with_name("distill_export.py")
FLOW_FUNCTION = "distill_export"
SMALL_MODEL_BYTES = 64 << 20  # parameters + buffers up to this are checked on the CPU
REQUIRED = object()  # the default of a parameter that has none
UNRECORDED = ("mlflow_retries", "mlflow_retry_delay_seconds")  # how to log, not what was exported
WORK_DIR = ".amct_work"  # intermediates under output_dir: the traced graph, the model's record, downloads


# ---- as declared --------------------------------------------------------------------------------

@dataclass(frozen=True)
class FlowParameter:
    """One parameter of the flow, as its signature and docstring declare it."""

    name: str
    annotation: str  # as written in the signature, e.g. "Optional[list[str]]"
    default: Any  # REQUIRED when the signature gives none
    help: str  # the docstring's Args entry

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


def _docstring_args(doc: str) -> dict[str, str]:
    """The entries of a Google-style ``Args:`` section: name -> text (continuation lines joined)."""
    args: dict[str, str] = {}
    lines = iter(doc.splitlines())
    for line in lines:
        if line.strip() == "Args:":
            break
    current = None
    for line in lines:
        if not line.strip() or not line.startswith("    "):
            break
        if not line.startswith("        "):  # a new entry
            current, _, text = line.strip().partition(":")
            args[current] = text.strip()
        elif current is not None:
            args[current] += " " + line.strip()
    return args


@lru_cache(maxsize=1)
def flow_parameters() -> tuple[FlowParameter, ...]:
    """The flow's parameters in signature order, read from flows/distill_export.py's source (not imported)."""
    tree = ast.parse(FLOW_FILE.read_text())
    fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == FLOW_FUNCTION)
    args = fn.args.args
    defaults = [REQUIRED] * (len(args) - len(fn.args.defaults)) + [ast.literal_eval(d) for d in fn.args.defaults]
    docs = _docstring_args(ast.get_docstring(fn) or "")
    return tuple(FlowParameter(a.arg, ast.unparse(a.annotation) if a.annotation else "Any", d, docs.get(a.arg, ""))
                 for a, d in zip(args, defaults, strict=True))


def flow_defaults() -> dict[str, Any]:
    """The flow's parameter defaults (the parameters that have one)."""
    return {p.name: p.default for p in flow_parameters() if not p.required}


def default_names(prefix: str, count: int) -> list[str]:
    """Graph input/output names when none are given: ``input`` / ``output`` for one, ``input_0``,
    ``input_1``, ... for several."""
    return [prefix] if count == 1 else [f"{prefix}_{i}" for i in range(count)]


# ---- as checked ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class ExportFiles:
    """Where the files of one export go: ``<output_dir>/<name>_*`` (the library's file names, FORMATS §1),
    ``manifest.json``, the parity report in ``parity/``, intermediates in ``.amct_work/``."""

    output_dir: str
    name: str

    def _named(self, file_name: str, directory: str | None = None) -> str:
        from amct_core.formats import prefixed_file

        return str(prefixed_file(directory or self.output_dir, self.name, file_name))

    @property
    def fake_quant(self) -> str:
        from amct_core.formats import FAKE_QUANT_MODEL

        return self._named(FAKE_QUANT_MODEL)

    @property
    def deploy(self) -> str:
        from amct_core.formats import DEPLOY_MODEL

        return self._named(DEPLOY_MODEL)

    @property
    def record(self) -> str:
        from amct_core.formats import RECORD_FILE

        return self._named(RECORD_FILE)

    @property
    def manifest(self) -> str:
        from amct_core.manifest import MANIFEST_FILE

        return str(Path(self.output_dir) / MANIFEST_FILE)

    @property
    def parity(self) -> str:
        return str(Path(self.output_dir) / "parity")

    @property
    def work(self) -> str:
        return str(Path(self.output_dir) / WORK_DIR)

    @property
    def traced(self) -> str:
        return self._named("traced.onnx", self.work)

    @property
    def model_record(self) -> str:
        return self._named("model_record.txt", self.work)

    @property
    def downloads(self) -> str:
        return str(Path(self.work) / "checkpoint")


@dataclass(frozen=True)
class ExportPlan:
    """One export, checked: what the stages are given (``flows.distill_export.export`` runs them)."""

    model: ModelSpec
    graph: GraphSpec
    files: ExportFiles
    record_file: str | None  # a given record file (absolute), instead of the model's own factors
    tolerances: dict | None  # overrides of amct_core.verify.Tolerances
    tracking: TrackingSpec
    force: bool
    parameters: dict  # the flow's parameters as checked (absolute paths, default names): recorded with the export

    @classmethod
    def check(cls, given: Mapping[str, Any]) -> "ExportPlan":
        """Check the flow's parameters (``given``: some or all of them; the others take the flow's defaults)
        and return the plan; raise ParameterError naming the first bad one. Cheap rules first; the model
        is imported and run last."""
        declared = [p.name for p in flow_parameters()]
        unknown = sorted(set(given) - set(declared))
        if unknown:
            raise ParameterError(unknown[0], f"is not a parameter of the flow; its parameters are {declared}")
        p = {**flow_defaults(), **given}
        for name in declared:
            if name not in p:
                raise ParameterError(name, "is required")
        out = dict(p)

        # ---- cheap rules: no torch
        out["checkpoint"] = _checkpoint(p["checkpoint"])
        out["name"] = _file_prefix(p["name"])
        out["output_dir"] = _output_dir(p["output_dir"])
        inputs = input_list(p["input_shape"], p["input_dtype"])
        out["input_names"] = _library("input_names", _check_names, p["input_names"], "input_names", len(inputs),
                                      "inputs")
        if out["input_names"] is not None and len(out["input_names"]) != len(inputs):  # the pipeline names every input
            raise ParameterError("input_names", f"gives {len(out['input_names'])} name(s) for {len(inputs)} input(s) "
                                                f"(input_shape {p['input_shape']!r}): {out['input_names']!r}")
        out["output_names"] = _library("output_names", _check_names, p["output_names"], "output_names")
        out["model_kwargs"] = _model_kwargs(p["model_kwargs"])
        out["distill_config"] = _existing_file("distill_config", p["distill_config"], "")
        out["record_file"] = _existing_file("record_file", p["record_file"], " (omit it to write the record from "
                                                                          "the model)")
        if not isinstance(p["mlflow_experiment"], str) or not p["mlflow_experiment"].strip():
            raise ParameterError("mlflow_experiment", "must be a non-empty experiment name")
        out["mlflow_artifact_location"] = _artifact_location(p["mlflow_artifact_location"])
        _metrics(p["metrics"])
        _number("mlflow_retries", p["mlflow_retries"], 0, integer=True)
        _number("mlflow_retry_delay_seconds", p["mlflow_retry_delay_seconds"], 0)
        _number("seed", p["seed"], 0, integer=True)
        if not isinstance(p["force"], bool):
            raise ParameterError("force", f"must be true or false, got {p['force']!r}")

        # ---- the library's rules
        from amct_core.errors import TargetError
        from amct_core.targets import check_opset, get_target

        try:
            tgt = get_target(p["target"])
        except TargetError as e:
            raise ParameterError("target", str(e)) from None
        out["target"] = tgt.name
        try:
            check_opset(tgt, p["opset"])
        except TargetError as e:
            raise ParameterError("opset", str(e)) from None
        _tolerances(p["parity_tolerances"])
        if out["distill_config"]:
            _distill_config(out["distill_config"])
        if out["record_file"]:
            _record_file(out["record_file"])

        # ---- the model: it imports, and runs on the example input(s)
        import_callable(p["model"], "model")
        n_out = count_outputs(p["model"], out["model_kwargs"], inputs)
        _library("output_names", _check_names, out["output_names"], "output_names", n_out, "outputs")
        out["input_names"] = out["input_names"] or default_names("input", len(inputs))
        out["output_names"] = out["output_names"] or default_names("output", n_out)
        ranks = {n: len(s) for n, (s, _) in zip(out["input_names"], inputs, strict=True)}
        axes = _library("dynamic_axes", _normalize_dynamic_axes, _int_axes(p["dynamic_axes"]),
                        out["input_names"] + out["output_names"], ranks)

        from tasks.model import model_source_sha256

        return cls(
            model=ModelSpec(checkpoint=out["checkpoint"], model=p["model"], model_kwargs=out["model_kwargs"],
                            distill_config=out["distill_config"], input_shape=p["input_shape"],
                            input_dtype=p["input_dtype"], seed=p["seed"],
                            model_source_sha256=model_source_sha256(p["model"])),
            graph=GraphSpec(target=tgt.name, opset=p["opset"], input_names=out["input_names"],
                            output_names=out["output_names"], dynamic_axes=axes),
            files=ExportFiles(out["output_dir"], out["name"]),
            record_file=out["record_file"],
            tolerances=p["parity_tolerances"] or None,
            tracking=TrackingSpec(experiment=p["mlflow_experiment"], tracking_uri=p["mlflow_tracking_uri"],
                                  artifact_location=out["mlflow_artifact_location"],
                                  registered_model_name=p["registered_model_name"], metrics=dict(p["metrics"] or {}),
                                  retries=p["mlflow_retries"], retry_delay_seconds=p["mlflow_retry_delay_seconds"]),
            force=p["force"],
            parameters={k: v for k, v in out.items() if k not in UNRECORDED},
        )


# ---- the rules -----------------------------------------------------------------------------------

def _library(parameter: str, rule, *args):
    """A library rule applied to a parameter: its error (ExportError, ValueError) names the parameter."""
    from amct_core.errors import AmctError

    try:
        return rule(*args)
    except (AmctError, ValueError) as e:
        raise ParameterError.of(parameter, e) from None


def _check_names(*args):
    from amct_core.arguments import check_names

    return check_names(*args)


def _normalize_dynamic_axes(axes, *args):
    if axes is None:
        return None
    from amct_core.save import normalize_dynamic_axes  # imports the exporter: only when there are some

    return normalize_dynamic_axes(axes, *args)


def _checkpoint(ck) -> str:
    if not isinstance(ck, str) or not ck.strip():
        raise ParameterError("checkpoint", "is required: a file path or an MLflow URI ('runs:/<id>/<path>', "
                                           "'models:/<name>/<version>')")
    if is_mlflow_uri(ck):
        return ck
    return _existing_file("checkpoint", ck, " (give a file path, or an MLflow URI such as 'runs:/<run_id>/<path>' "
                                            "or 'models:/<name>/<version>')")


def _file_prefix(name) -> str:
    from amct_core.arguments import check_output_file, check_path

    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
        raise ParameterError("name", f"must be a file-name prefix without '/', got {name!r}")
    _library("name", check_path, name, "name")
    files = ExportFiles("", name)
    for f in (files.fake_quant, files.deploy, files.record, files.traced, files.model_record):  # the longest counts
        _library("name", check_output_file, Path(f).name, "name")
    return name


def _output_dir(directory) -> str:
    from amct_core.arguments import check_output_dir, check_path

    if not isinstance(directory, str) or not directory:
        raise ParameterError("output_dir", f"must be a directory path, got {directory!r}")
    _library("output_dir", check_path, directory, "output_dir")
    _library("output_dir", check_output_dir, directory, "output_dir")
    return str(Path(directory).resolve())


def _existing_file(parameter: str, value, hint: str) -> str | None:
    from amct_core.arguments import check_path

    if not value:
        return None
    if not isinstance(value, str):
        raise ParameterError(parameter, f"must be a file path, got {value!r}")
    _library(parameter, check_path, value, parameter)
    f = Path(value)
    if f.is_dir():
        raise ParameterError(parameter, f"{str(f)!r} is a directory; give the path of a file")
    if not f.is_file():
        raise ParameterError(parameter, f"{str(f)!r} does not exist{hint}")
    return str(f.resolve())


def _model_kwargs(kw) -> dict:
    kw = kw or {}
    if not isinstance(kw, dict) or not all(isinstance(k, str) for k in kw):
        raise ParameterError("model_kwargs", f"must be a JSON object of keyword arguments, got {kw!r}")
    return kw


def _artifact_location(loc) -> str | None:
    if loc is None:
        return None
    if not isinstance(loc, str) or not loc.strip():
        raise ParameterError("mlflow_artifact_location", f"must be a directory or an artifact URI, got {loc!r}")
    return loc if "://" in loc or loc.startswith("file:") else str(Path(loc).resolve())


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


def _number(parameter: str, v, minimum: float, integer: bool = False) -> None:
    kind = (int,) if integer else (int, float)
    if isinstance(v, bool) or not isinstance(v, kind) or v < minimum:
        raise ParameterError(parameter, f"must be {'an integer' if integer else 'a number'} >= {minimum}, got {v!r}")


def _tolerances(tol) -> None:
    if tol is None:
        return
    if not isinstance(tol, dict):
        raise ParameterError("parity_tolerances", f"must be an object of tolerance name -> number, got {tol!r}")
    from amct_core.verify.tolerances import Tolerances  # imports the verify package: only when there are some

    _library("parity_tolerances", Tolerances.from_dict, tol)


def _distill_config(path: str) -> None:
    from amct_core.distill import load_distill_config

    _library("distill_config", load_distill_config, path)


def _record_file(path: str) -> None:
    """A given record file must read as records (UTF-8, the text format, at least one layer record); whether
    they fit the model is the record stage's check, against the traced graph."""
    from amct_core.record import read_record

    _library("record_file", read_record, path)


def _int_axes(axes):
    """JSON object keys are strings: ``{"output": {"0": "batch"}}`` -> ``{"output": {0: "batch"}}`` (keys that
    are not integers are left for the library's rule to name)."""
    if not isinstance(axes, dict):
        return axes
    out = {}
    for name, ax in axes.items():
        if isinstance(ax, dict):
            ax = {int(k) if isinstance(k, str) and k.lstrip("-").isdigit() else k: v for k, v in ax.items()}
        out[name] = ax
    return out


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
