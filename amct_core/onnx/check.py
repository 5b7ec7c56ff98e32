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

None of them copies or computes a weight. The graph checks read names only; the ONNX checker sees
the model as protobuf without its tensors (:func:`amct_core.onnx.adapter.graph_proto`) plus, for each
initializer, a stub carrying only its name, type and shape, marked as external data at a location
starting with ``#``, which ``onnx.checker`` accepts without looking for a file (its convention for
data held in memory). Type and shape inference need no more than that; initializers of less than
``INLINE_MAX_BYTES`` held in memory (the tracer's shape operands of Reshape and the like, whose values
inference reads) are given with their data.
"""
from __future__ import annotations

import onnx
import onnx_ir as ir
from onnx import TensorProto

from ..errors import ExportError
from .adapter import graph_proto, initializers

INLINE_MAX_BYTES = 1024
STUB_LOCATION = "#amct_core.check stub: data not copied"
DEFAULT_DOMAINS = ("", "ai.onnx")


def _label(node: ir.Node) -> str:
    if node.name:
        return f"{node.op_type} node {node.name!r}"
    return f"unnamed {node.op_type} node -> {[o.name for o in node.outputs]}"


def _fail(what: str, problem: str, expected: str) -> ExportError:
    return ExportError(f"{what}: {problem}; expected {expected}. This is a bug in amct_core's exporter "
                       "(please report it with the model); nothing was written")


def check_opset_import(model: ir.Model, what: str) -> None:
    entries = sorted(model.opset_imports.items())
    if len(entries) != 1 or entries[0][0] not in DEFAULT_DOMAINS:
        raise _fail(what, f"opset_import is {entries}", "exactly one entry, the default domain '' (FORMATS §5)")


def check_graph_order(model: ir.Model, what: str) -> None:
    """Sorted, every input defined before it is read, single assignment, every output produced."""
    g = model.graph
    defined = {i.name for i in g.inputs} | set(g.initializers)
    for node in g:
        for value in node.inputs:
            if value is None or value.name in defined:
                continue
            producer = value.producer()
            if producer is not None and producer.graph is g:
                raise _fail(what, f"{_label(node)} reads {value.name!r} before {_label(producer)} produces it",
                            "nodes in topological order (FORMATS §5)")
            raise _fail(what, f"{_label(node)} reads {value.name!r}, which no node, initializer or graph input "
                        "defines", "every node input defined (FORMATS §5)")
        for value in node.outputs:
            if not value.name:
                continue
            if value.name in defined:
                raise _fail(what, f"{_label(node)} produces {value.name!r}, which is already defined",
                            "each tensor defined once")
            defined.add(value.name)
    for o in g.outputs:
        if o.name not in defined:
            raise _fail(what, f"graph output {o.name!r} is produced by no node", "every graph output produced")


def check_no_initializer_identity(model: ir.Model, what: str) -> None:
    for node in model.graph:
        if node.op_type != "Identity" or not node.inputs or node.inputs[0] is None:
            continue
        x, y = node.inputs[0], node.outputs[0]
        if x.is_initializer() and not y.is_graph_output():
            raise _fail(what, f"{_label(node)} forwards initializer {x.name!r} to {y.name!r}",
                        "its readers reading the initializer itself, every weight and BatchNorm parameter an "
                        "initializer (FORMATS §5)")


def _stub(name: str, tensor: ir.TensorProtocol) -> TensorProto:
    t = TensorProto(name=name, data_type=tensor.dtype.value, dims=list(tensor.shape.numpy()))
    t.data_location = TensorProto.EXTERNAL
    e = t.external_data.add()
    e.key, e.value = "location", STUB_LOCATION
    return t


def checker_view(model: ir.Model) -> onnx.ModelProto:
    """The model as ``onnx.checker`` needs to see it, without copying (or computing) a weight: the graph,
    every initializer a stub but the small ones held in memory (not lazy, not in a file)."""
    proto = graph_proto(model)
    inits = proto.graph.initializer
    for name, t in initializers(model):
        small = t.nbytes < INLINE_MAX_BYTES and not isinstance(t, (ir.LazyTensor, ir.ExternalTensor))
        inits.append(ir.serde.serialize_tensor(t) if small else _stub(name, t))
        inits[-1].name = name
    return proto


def check_with_onnx_checker(model: ir.Model, what: str) -> None:
    try:
        onnx.checker.check_model(checker_view(model), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise _fail(what, f"onnx.checker.check_model(full_check=True) rejects it: {e}",
                    "a model the ONNX checker accepts (FORMATS §5)") from None


def check_before_write(model: ir.Model, what: str, *, standard_ops: bool) -> None:
    """Every post-condition of a model about to be written. ``standard_ops``: the model has only
    standard ONNX ops (fake-quant, traced) and must pass the ONNX checker too; a deploy model gets
    the structural checks (its Ascend ops are not in the ONNX schema)."""
    check_opset_import(model, what)
    check_graph_order(model, what)
    check_no_initializer_identity(model, what)
    if standard_ops:
        check_with_onnx_checker(model, what)
