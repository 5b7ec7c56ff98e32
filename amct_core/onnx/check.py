"""Post-conditions of every model the exporter writes (FORMATS §5), checked before anything is written.

* :func:`check_opset_import` - exactly one ``opset_import`` entry, the default domain;
* :func:`check_graph_order` - nodes topologically sorted: every node input is a graph input, an
  initializer or the output of an earlier node; no tensor is produced twice; every graph output is
  produced;
* :func:`check_no_initializer_identity` - no ``Identity`` node forwarding an initializer (what the
  tracer leaves when it deduplicates equal initializers): weights and BatchNorm parameters are
  initializers;
* :func:`check_with_onnx_checker` - ``onnx.checker.check_model(full_check=True)`` (structure, types
  and strict shape inference), for models of standard ops only (fake-quant, traced);
* :func:`check_before_write` - all of the above for one model.

A violation is an :class:`ExportError` that names the model and the node. These are the exporter's
own invariants: a violation is a bug in amct_core, and nothing is written.

None of them copies or computes a weight. The graph checks read names only; the ONNX checker sees a
copy of the graph in which every large initializer is a stub carrying only its name, type and shape,
marked as external data at a location starting with ``#``, which ``onnx.checker`` accepts without
looking for a file (its convention for data held in memory). Type and shape inference need no more
than that; initializers of less than ``INLINE_MAX_BYTES`` inside the proto (the tracer's shape
operands of Reshape and the like, whose values inference reads) keep their data.
"""
from __future__ import annotations

import numpy as np
import onnx
from google.protobuf.message import Message
from onnx import TensorProto, helper

from ..errors import ExportError
from .store import OnnxModel

INLINE_MAX_BYTES = 1024
STUB_LOCATION = "#amct_core.check stub: data not copied"
DEFAULT_DOMAINS = ("", "ai.onnx")


def _label(node: onnx.NodeProto) -> str:
    return f"{node.op_type} node {node.name!r}" if node.name else f"unnamed {node.op_type} node -> {list(node.output)}"


def _fail(what: str, problem: str, expected: str) -> ExportError:
    return ExportError(f"{what}: {problem}; expected {expected}. This is a bug in amct_core's exporter "
                       "(please report it with the model); nothing was written")


def check_opset_import(proto: onnx.ModelProto, what: str) -> None:
    entries = [(o.domain or "", int(o.version)) for o in proto.opset_import]
    if len(entries) != 1 or entries[0][0] not in DEFAULT_DOMAINS:
        raise _fail(what, f"opset_import is {entries}", "exactly one entry, the default domain '' (FORMATS §5)")


def check_graph_order(model: OnnxModel, what: str) -> None:
    """Sorted, every input defined before it is read, single assignment, every output produced."""
    g = model.graph
    defined = {i.name for i in g.input} | model.initializer_names()
    produced_by = {o: n for n in g.node for o in n.output if o}
    for node in g.node:
        for name in node.input:
            if not name or name in defined:
                continue
            later = produced_by.get(name)
            if later is not None:
                raise _fail(what, f"{_label(node)} reads {name!r} before {_label(later)} produces it",
                            "nodes in topological order (FORMATS §5)")
            raise _fail(what, f"{_label(node)} reads {name!r}, which no node, initializer or graph input defines",
                        "every node input defined (FORMATS §5)")
        for name in node.output:
            if not name:
                continue
            if name in defined:
                raise _fail(what, f"{_label(node)} produces {name!r}, which is already defined",
                            "each tensor defined once")
            defined.add(name)
    for o in g.output:
        if o.name not in defined:
            raise _fail(what, f"graph output {o.name!r} is produced by no node", "every graph output produced")


def check_no_initializer_identity(model: OnnxModel, what: str) -> None:
    inits = model.initializer_names()
    outputs = {o.name for o in model.graph.output}
    for node in model.graph.node:
        if node.op_type == "Identity" and node.input and node.input[0] in inits and node.output[0] not in outputs:
            raise _fail(what, f"{_label(node)} forwards initializer {node.input[0]!r} to {node.output[0]!r}",
                        "its readers reading the initializer itself, every weight and BatchNorm parameter an "
                        "initializer (FORMATS §5)")


def _copy_fields(src: Message, dst: Message, skip: tuple[str, ...]) -> None:
    for fd, value in src.ListFields():
        if fd.name in skip:
            continue
        if hasattr(value, "extend"):
            getattr(dst, fd.name).extend(value)
        elif isinstance(value, Message):
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def _stub(name: str, elem_type: int, dims) -> TensorProto:
    t = TensorProto(name=name, data_type=elem_type, dims=list(dims))
    t.data_location = TensorProto.EXTERNAL
    e = t.external_data.add()
    e.key, e.value = "location", STUB_LOCATION
    return t


def checker_view(model: OnnxModel) -> onnx.ModelProto:
    """The model as ``onnx.checker`` needs to see it, without copying (or computing) a weight: graph
    and metadata copied; initializers inside the proto kept if small, stubs if large; every tensor
    kept beside the proto (weights, lazily computed grids, memory-mapped data) a stub."""
    proto = onnx.ModelProto()
    _copy_fields(model.proto, proto, skip=("graph",))
    _copy_fields(model.graph, proto.graph, skip=("initializer",))
    inits = proto.graph.initializer
    for t in model.graph.initializer:
        big = t.data_location == TensorProto.EXTERNAL or len(t.raw_data) >= INLINE_MAX_BYTES
        inits.append(_stub(t.name, t.data_type, t.dims) if big else t)
    for name, t in model.tensors.items():
        inits.append(_stub(name, helper.np_dtype_to_tensor_dtype(np.dtype(t.dtype)), t.shape))
    return proto


def check_with_onnx_checker(model: OnnxModel, what: str) -> None:
    try:
        onnx.checker.check_model(checker_view(model), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise _fail(what, f"onnx.checker.check_model(full_check=True) rejects it: {e}",
                    "a model the ONNX checker accepts (FORMATS §5)") from None


def check_before_write(model: OnnxModel, what: str, *, standard_ops: bool) -> None:
    """Every post-condition of a model about to be written. ``standard_ops``: the model has only
    standard ONNX ops (fake-quant, traced) and must pass the ONNX checker too; a deploy model gets
    the structural checks (its Ascend ops are not in the ONNX schema)."""
    check_opset_import(model.proto, what)
    check_graph_order(model, what)
    check_no_initializer_identity(model, what)
    if standard_ops:
        check_with_onnx_checker(model, what)
