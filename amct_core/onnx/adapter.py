"""An onnx-ir model seen as protobuf without its tensors: what the writer and the post-condition read.

:func:`graph_proto` serializes everything of the model but its initializers (onnx-ir's own
serializer, on a view of the graph that has none), so no weight is copied into protobuf; the
initializers are listed apart, as onnx-ir tensors (:func:`initializers`), and read one at a time as
arrays in the byte order of the format (:func:`tensor_array`), without copying what is already in
memory or mapped from a file.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir


def graph_proto(model: ir.Model) -> onnx.ModelProto:
    """``model`` as a ModelProto with no initializer (and no value info for one)."""
    g = model.graph
    view = ir.GraphView(g.inputs, g.outputs, nodes=g, doc_string=g.doc_string, opset_imports=g.opset_imports,
                        name=g.name, metadata_props=g.metadata_props)
    shell = ir.Model(view, ir_version=model.ir_version, producer_name=model.producer_name,
                     producer_version=model.producer_version, domain=model.domain,
                     model_version=model.model_version, doc_string=model.doc_string,
                     functions=list(model.functions.values()), metadata_props=model.metadata_props)
    return ir.serde.serialize_model(shell)


def initializers(model: ir.Model) -> list[tuple[str, ir.TensorProtocol]]:
    """(name, tensor) of every initializer, in the graph's order."""
    return [(name, v.const_value) for name, v in model.graph.initializers.items()]


def tensor_array(tensor: ir.TensorProtocol) -> np.ndarray:
    """The tensor's values, C-contiguous and little-endian: the array itself when it already is one (an
    ``ir.Tensor`` of an array, a memory-mapped external tensor), computed for a lazy tensor."""
    a = np.ascontiguousarray(tensor.numpy())
    return a.astype(a.dtype.newbyteorder("<")) if a.dtype.byteorder == ">" else a
