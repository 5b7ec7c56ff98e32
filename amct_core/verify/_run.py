"""ONNX Runtime sessions and model inputs shared by the checks."""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from ..onnx.mapped import FOLDER_CONFIG_KEY, runtime_model
from ..onnx.metadata import INPUT_SHAPES, read_input_shapes

OPT_LEVELS = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def session(model: onnx.ModelProto, opt: str = "disabled") -> ort.InferenceSession:
    """An ONNX Runtime session (CPU, one thread) on ``model``.

    External data (a model opened with :func:`amct_core.onnx.mapped.open_model`) is mapped by ONNX
    Runtime from its files; only the graph is serialized, so no in-memory model reaches protobuf's 2 GB
    limit. Weight prepacking is off: it would copy every weight into ONNX Runtime's own layout for a
    speed-up that one batch of checks does not need, where the mapped weights cost no copy at all."""
    so = ort.SessionOptions()
    so.graph_optimization_level = OPT_LEVELS[opt]
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 4  # errors reach the caller as exceptions, not as log lines on stderr
    so.add_session_config_entry("session.disable_prepacking", "1")
    so.enable_cpu_mem_arena = False
    data, folder = runtime_model(model)
    if folder is not None:
        so.add_session_config_entry(FOLDER_CONFIG_KEY, folder)
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], opt: str = "disabled",
        outputs: list[str] | None = None) -> dict[str, np.ndarray]:
    s = session(model, opt)
    names = outputs or [o.name for o in s.get_outputs()]
    return dict(zip(names, s.run(names, feeds), strict=True))  # the session (and its mapped weights) ends here


def run_batches(model: onnx.ModelProto, requests: Sequence[tuple[dict[str, np.ndarray], Sequence[str]]],
                opt: str = "disabled") -> list[dict[str, np.ndarray]]:
    """Run ``model`` on several batches in one session: each request is a batch's feeds and the outputs
    wanted from it (none: the batch is not run, and its result is an empty dict)."""
    s = session(model, opt)
    out = []
    for feeds, names in requests:
        names = list(dict.fromkeys(names))
        out.append(dict(zip(names, s.run(names, feeds), strict=True)) if names else {})
    return out  # the session (and its mapped weights) ends here


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


@dataclass(frozen=True)
class InputDim:
    """A symbolic (or unknown) dimension of a graph input and the size generated inputs give it."""

    input: str
    axis: int
    name: str  # the dim_param; "" for an unnamed dimension
    size: int
    source: str  # "dims" (given by the caller), "export" (the file's amct.input_shapes) or "default"
    export_size: int | None  # the size the export was traced with, when the file records it

    def describe(self) -> str:
        label = self.name or "an unnamed dimension"
        return f"{label} (input {self.input!r}, axis {self.axis})"


def symbolic_dims(model: onnx.ModelProto, dims: Mapping[str, int] | None = None,
                  default_dim: int = 1) -> list[InputDim]:
    """Every symbolic or unknown dimension of the graph inputs, with the size generated inputs give it:
    ``dims[name]`` when given, else the export's size recorded in the file (``amct.input_shapes``,
    :mod:`amct_core.onnx.metadata`), else ``default_dim`` (files without the record, AMCT's).

    Raises ValueError when ``dims`` names no symbolic dimension or gives a size that is not a positive
    int, and when the file's record disagrees with the graph inputs' rank."""
    dims = dict(dims or {})
    for name, n in dims.items():
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"size of symbolic dimension {name!r} must be a positive int, got {n!r}")
    recorded = read_input_shapes(model)
    out = []
    for vi in graph_inputs(model):
        shape = vi.type.tensor_type.shape.dim
        ex = recorded.get(vi.name)
        if ex is not None and len(ex.shape) != len(shape):
            raise ValueError(f"model metadata {INPUT_SHAPES!r} gives input {vi.name!r} the shape {list(ex.shape)}, "
                             f"but the graph input has rank {len(shape)}")
        for axis, d in enumerate(shape):
            if d.HasField("dim_value") and d.dim_value > 0:
                continue
            export = ex.shape[axis] if ex is not None else None
            if d.dim_param and d.dim_param in dims:
                size, source = int(dims[d.dim_param]), "dims"
            elif export is not None:
                size, source = export, "export"
            else:
                size, source = default_dim, "default"
            out.append(InputDim(vi.name, axis, d.dim_param, size, source, export))
    unknown = [n for n in dims if n not in {d.name for d in out if d.name}]
    if unknown:
        have = ", ".join(d.describe() for d in out if d.name) or "none (every input size is fixed)"
        raise ValueError(f"no input dimension is named {unknown[0]!r} (dims / --dim NAME=N set symbolic "
                         f"dimensions by name); the model's symbolic dimensions: {have}")
    return out


def generate_inputs(model: onnx.ModelProto, seed: int = 0, dims: Mapping[str, int] | None = None,
                    default_dim: int = 1) -> dict[str, np.ndarray]:
    """Seeded inputs from the graph's input declarations: float inputs standard normal, integer inputs
    in [0, 2). Symbolic or unknown dimensions are sized by :func:`symbolic_dims`: ``dims[name]``, else
    the export's size the file records, else ``default_dim``."""
    rng = np.random.default_rng(seed)
    sizes = {(d.input, d.axis): d.size for d in symbolic_dims(model, dims, default_dim)}
    feeds = {}
    for vi in graph_inputs(model):
        tt = vi.type.tensor_type
        shape = [sizes.get((vi.name, axis), int(d.dim_value)) for axis, d in enumerate(tt.shape.dim)]
        np_type = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if np.issubdtype(np_type, np.floating):
            feeds[vi.name] = rng.standard_normal(shape).astype(np_type)
        elif np_type == np.bool_:
            feeds[vi.name] = rng.integers(0, 2, shape).astype(np.bool_)
        else:
            feeds[vi.name] = rng.integers(0, 2, shape).astype(np_type)
    return feeds


# What a run raises when inputs do not fit the graph: ONNX Runtime's errors, torch's RuntimeError.
_RUN_ERRORS = (RuntimeError, ort_state.Fail, ort_state.RuntimeException, ort_state.InvalidArgument)
_ORT_NODE = re.compile(r"running (\w+) node\. Name:'([^']*)'")


class InputSizeError(ValueError):
    """Inputs generated from the graph cannot run at the sizes their symbolic dimensions were given."""


def _failure_site(error: BaseException) -> str:
    m = _ORT_NODE.search(str(error))
    if m:
        return f"ONNX Runtime failed in {m.group(1)} node {m.group(2)!r}"
    if isinstance(error, RuntimeError):  # torch's (ONNX Runtime's errors are not RuntimeErrors)
        first = str(error).strip().split(". ")[0].splitlines()[0] if str(error).strip() else ""
        return f"the torch model raised {type(error).__name__}: {first[:120]}"
    return "ONNX Runtime failed"


def size_failure_message(model: onnx.ModelProto, dims: Mapping[str, int] | None, error: BaseException) -> str | None:
    """One line naming the symbolic dimensions whose sizes are not known to work (the default 1 of
    files without the export's sizes, or a ``dims`` size other than the export's) and the
    ``--dim NAME=N`` / ``dims=`` to pass; None when every size is the export's (the sizes the model was
    traced at are not what failed)."""
    suspects = [d for d in symbolic_dims(model, dims) if d.export_size is None or d.size != d.export_size]
    if not suspects:
        return None
    given = [d for d in suspects if d.source == "dims"]
    defaulted = [d for d in suspects if d.source == "default"]
    sizes = [f"{d.describe()} = {d.size} as given" + (f" (exported at {d.export_size})" if d.export_size is not None else "")
             for d in given]
    if defaulted:
        sizes.append(", ".join(d.describe() for d in defaulted) + f" = {defaulted[0].size}, the default "
                     "(the file does not record the sizes it was exported at)")
    by_name = {d.name: d for d in suspects if d.name}
    fix = " ".join(f"--dim {n}={d.export_size or 'N'}" for n, d in by_name.items())
    py = ", ".join(f"{n!r}: {d.export_size or 'N'}" for n, d in by_name.items())
    line = f"generated inputs cannot run ({_failure_site(error)}) at these sizes: " + "; ".join(sizes)
    if by_name:
        line += f"; set sizes the model accepts: {fix} (Python: dims={{{py}}})"
    if len(by_name) < len(suspects):
        line += "; an unnamed dimension cannot be set by name: pass the inputs (--inputs file.npz, inputs=)"
    return line


@contextmanager
def explain_size_failure(model: onnx.ModelProto, dims: Mapping[str, int] | None, generated: bool):
    """Around runs on ``generate_inputs(model, dims=dims)``: a failure that the sizes of symbolic
    dimensions can explain becomes an :class:`InputSizeError` with :func:`size_failure_message` (the
    runtime's own error is its ``__cause__``). Runs on given inputs fail as they are."""
    try:
        yield
    except _RUN_ERRORS as e:
        msg = size_failure_message(model, dims, e) if generated else None
        if msg is None:
            raise
        raise InputSizeError(msg) from e


def to_numpy(x) -> np.ndarray:
    try:
        import torch
        if isinstance(x, torch.Tensor):
            return x.detach().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    return np.asarray(x)


def feeds_for(model: onnx.ModelProto, inputs) -> dict[str, np.ndarray]:
    """Map user inputs onto the graph inputs: a dict by name, or a sequence (or one array) by position."""
    names = [i.name for i in graph_inputs(model)]
    if isinstance(inputs, Mapping):
        missing = [n for n in names if n not in inputs]
        if missing:
            raise ValueError(f"inputs lack graph input(s) {missing}; the model's inputs are {names}")
        return {n: to_numpy(inputs[n]) for n in names}
    if not isinstance(inputs, Sequence) or isinstance(inputs, (str, bytes)):
        inputs = (inputs,)
    if len(inputs) != len(names):
        raise ValueError(f"{len(inputs)} input(s) given; the model has {len(names)} graph input(s) {names}")
    return {n: to_numpy(a) for n, a in zip(names, inputs, strict=True)}


def remap_feeds(feeds: dict[str, np.ndarray], model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The same inputs for another model with the same inputs, by name if all names match, else by position."""
    names = [i.name for i in graph_inputs(model)]
    if all(n in feeds for n in names):
        return {n: feeds[n] for n in names}
    vals = list(feeds.values())
    if len(vals) != len(names):
        raise ValueError(f"cannot map inputs {list(feeds)} onto graph inputs {names}")
    return dict(zip(names, vals, strict=True))
