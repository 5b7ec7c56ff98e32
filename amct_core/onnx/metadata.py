"""The ``amct.*`` entries of an ONNX model's ``metadata_props``: which keys exist, who writes them, and
how they are read back. Every reader and writer of these keys goes through this module.

``metadata_props`` are free key/value strings of the ModelProto; ONNX Runtime and ATC-style parsers
ignore them, so the graph, the initializers and the opset entry keep AMCT's structure exactly.

Keys carried by the written models (:data:`OUTPUT_KEYS`, kept from the traced file to the outputs):

* ``amct.input_shapes``: the example inputs the export was traced with, as a JSON object
  ``graph input name -> {"shape": [ints], "dtype": "float32"}``.
* ``amct.export_id``: the id of the export that wrote the file (32 hex digits, a uuid4), the same in
  both models and in the record file's header (:mod:`amct_core.export_id`); the traced file carries it
  to the built models.
* ``amct.record_sha256``: the SHA-256 of the content of the record file the model was built from (the
  record file without its ``# amct.`` header lines, :func:`amct_core.export_id.record_content_sha256`).

Keys of the traced file only (the file-to-file stages, dropped before the models are built):
``amct.quant_layers`` (JSON list of layer names), ``amct.target``, ``amct.opset``.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import onnx
import onnx_ir as ir
from onnx import helper

PREFIX = "amct."
INPUT_SHAPES = "amct.input_shapes"
QUANT_LAYERS = "amct.quant_layers"
TARGET = "amct.target"
OPSET = "amct.opset"
EXPORT_ID = "amct.export_id"
RECORD_SHA256 = "amct.record_sha256"

OUTPUT_KEYS = (INPUT_SHAPES, EXPORT_ID, RECORD_SHA256)


def read_prop(model: onnx.ModelProto | ir.Model, key: str) -> str | None:
    """The value of ``key``, or None when the model has no such entry."""
    if isinstance(model, ir.Model):
        return model.metadata_props.get(key)
    for p in model.metadata_props:
        if p.key == key:
            return p.value
    return None


def write_prop(model: onnx.ModelProto | ir.Model, key: str, value: str) -> None:
    """Set ``key`` to ``value`` (one entry per key)."""
    if isinstance(model, ir.Model):
        model.metadata_props[key] = value
        return
    for p in model.metadata_props:
        if p.key == key:
            p.value = value
            return
    model.metadata_props.add(key=key, value=value)


def _stage_only(key: str) -> bool:
    return key.startswith(PREFIX) and key not in OUTPUT_KEYS


def drop_stage_props(model: onnx.ModelProto | ir.Model) -> None:
    """Remove every ``amct.*`` entry except the ones the written models carry (:data:`OUTPUT_KEYS`)."""
    if isinstance(model, ir.Model):
        for key in [k for k in model.metadata_props if _stage_only(k)]:
            del model.metadata_props[key]
        return
    props = model.metadata_props
    for i in range(len(props) - 1, -1, -1):
        if _stage_only(props[i].key):
            del props[i]


@dataclass(frozen=True)
class ExampleInput:
    """Shape and dtype of one example input of the export."""

    shape: tuple[int, ...]
    dtype: str  # numpy / torch name without prefix: "float32", "int64", "bool"


def _graph_inputs(proto: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {t.name for t in proto.graph.initializer}
    return [i for i in proto.graph.input if i.name not in inits]


def _fits(vi: onnx.ValueInfoProto, ex: ExampleInput) -> bool:
    """The example agrees with the graph input's declaration: rank, fixed sizes and element type."""
    tt = vi.type.tensor_type
    if not tt.HasField("shape") or len(tt.shape.dim) != len(ex.shape):
        return False
    if any(d.HasField("dim_value") and d.dim_value != s for d, s in zip(tt.shape.dim, ex.shape, strict=True)):
        return False
    try:
        return helper.tensor_dtype_to_np_dtype(tt.elem_type).name == ex.dtype
    except (KeyError, TypeError, ValueError):  # element types numpy has no name for (bfloat16, ...)
        return True


def record_input_shapes(proto: onnx.ModelProto, examples: Sequence[ExampleInput],
                        input_names: Sequence[str] | None = None) -> dict[str, ExampleInput]:
    """Write :data:`INPUT_SHAPES` for the traced model ``proto`` from the example inputs of its export.

    Examples are paired with graph inputs by ``input_names`` (the export's names, in argument order);
    the rest by position when as many remain on both sides (the tracer drops inputs forward() does not
    use). A pair whose rank, fixed sizes or element type disagree with the graph is left out, so the
    entry never states a shape the graph does not accept. Returns what was recorded.
    """
    graph = {vi.name: vi for vi in _graph_inputs(proto)}
    names = list(input_names or [])
    recorded: dict[str, ExampleInput] = {}
    rest = []
    for i, ex in enumerate(examples):
        if i < len(names) and names[i] in graph:
            recorded[names[i]] = ex
        elif i >= len(names):
            rest.append(ex)
    free = [n for n in graph if n not in recorded and n not in names]
    if len(free) == len(rest):
        recorded.update(zip(free, rest, strict=True))
    recorded = {n: ex for n, ex in recorded.items() if _fits(graph[n], ex)}
    if recorded:
        value = {n: {"shape": list(ex.shape), "dtype": ex.dtype} for n, ex in recorded.items()}
        write_prop(proto, INPUT_SHAPES, json.dumps(value, separators=(",", ":")))
    return recorded


def read_input_shapes(proto: onnx.ModelProto) -> dict[str, ExampleInput]:
    """The export's example inputs by graph input name; empty for files without :data:`INPUT_SHAPES`
    (AMCT's). Raises ValueError naming the key when its value is not what this module writes."""
    raw = read_prop(proto, INPUT_SHAPES)
    if raw is None:
        return {}
    expected = 'a JSON object input name -> {"shape": [non-negative ints], "dtype": "float32"}'
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"model metadata {INPUT_SHAPES!r} is not JSON ({e}); expected {expected}") from None
    if not isinstance(data, dict):
        raise ValueError(f"model metadata {INPUT_SHAPES!r} is {type(data).__name__}; expected {expected}")
    out = {}
    for name, entry in data.items():
        shape = entry.get("shape") if isinstance(entry, dict) else None
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        if not (isinstance(shape, list) and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
                and isinstance(dtype, str)):
            raise ValueError(f"model metadata {INPUT_SHAPES!r}: entry {name!r} is {entry!r}; expected {expected}")
        out[name] = ExampleInput(tuple(shape), dtype)
    return out
