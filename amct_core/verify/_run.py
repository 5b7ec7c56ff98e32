"""ONNX Runtime sessions and model inputs shared by the checks."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

OPT_LEVELS = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def session(model: onnx.ModelProto, opt: str = "disabled") -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = OPT_LEVELS[opt]
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], opt: str = "disabled",
        outputs: list[str] | None = None) -> dict[str, np.ndarray]:
    s = session(model, opt)
    names = outputs or [o.name for o in s.get_outputs()]
    return dict(zip(names, s.run(names, feeds)))


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def generate_inputs(model: onnx.ModelProto, seed: int = 0, dims: Mapping[str, int] | None = None,
                    default_dim: int = 1) -> dict[str, np.ndarray]:
    """Seeded inputs from the graph's input declarations: float inputs standard normal, integer inputs
    in [0, 2). Symbolic or unknown dimensions take ``dims[name]`` or ``default_dim``."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in graph_inputs(model):
        tt = vi.type.tensor_type
        shape = []
        for d in tt.shape.dim:
            if d.HasField("dim_value") and d.dim_value > 0:
                shape.append(int(d.dim_value))
            else:
                shape.append(int((dims or {}).get(d.dim_param, default_dim)))
        np_type = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if np.issubdtype(np_type, np.floating):
            feeds[vi.name] = rng.standard_normal(shape).astype(np_type)
        elif np_type == np.bool_:
            feeds[vi.name] = rng.integers(0, 2, shape).astype(np.bool_)
        else:
            feeds[vi.name] = rng.integers(0, 2, shape).astype(np_type)
    return feeds


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
    return {n: to_numpy(a) for n, a in zip(names, inputs)}


def remap_feeds(feeds: dict[str, np.ndarray], model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The same inputs for another model with the same inputs, by name if all names match, else by position."""
    names = [i.name for i in graph_inputs(model)]
    if all(n in feeds for n in names):
        return {n: feeds[n] for n in names}
    vals = list(feeds.values())
    if len(vals) != len(names):
        raise ValueError(f"cannot map inputs {list(feeds)} onto graph inputs {names}")
    return dict(zip(names, vals))
