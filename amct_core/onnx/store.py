"""A model in memory: the ONNX graph plus its large tensors kept as numpy arrays beside it.

Large weights live in ``tensors`` (name -> array) instead of inside the protobuf, so a model of any
size can be rewritten without copying its weights into protobuf fields (and past protobuf's 2 GB
limit); the writer decides whether they are embedded or go to an external data file.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper


@dataclass
class OnnxModel:
    proto: onnx.ModelProto
    # Initializers that are not (yet) in proto.graph.initializer, by name.
    tensors: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def graph(self) -> onnx.GraphProto:
        return self.proto.graph

    def initializer_names(self) -> set[str]:
        return {t.name for t in self.graph.initializer} | set(self.tensors)

    def get_array(self, name: str) -> np.ndarray:
        if name in self.tensors:
            return self.tensors[name]
        for t in self.graph.initializer:
            if t.name == name:
                return numpy_helper.to_array(t)
        raise KeyError(name)

    def set_array(self, name: str, value: np.ndarray) -> None:
        """Add or replace an initializer (kept beside the proto until written)."""
        self.remove_initializer(name)
        self.tensors[name] = value

    def remove_initializer(self, name: str) -> None:
        self.tensors.pop(name, None)
        inits = self.graph.initializer
        for i in range(len(inits) - 1, -1, -1):
            if inits[i].name == name:
                del inits[i]

    def tensor_bytes(self) -> int:
        return sum(a.nbytes for a in self.tensors.values())

    def copy(self) -> "OnnxModel":
        p = onnx.ModelProto()
        p.CopyFrom(self.proto)
        return OnnxModel(p, dict(self.tensors))  # arrays are shared, never mutated in place


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in graph.node for o in n.output if o}


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            if i:
                out.setdefault(i, []).append(n)
    return out


def rename_tensor_uses(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Every node input and graph output named ``old`` now reads ``new``."""
    for n in graph.node:
        for i, name in enumerate(n.input):
            if name == old:
                n.input[i] = new
    for o in graph.output:
        if o.name == old:
            o.name = new


def drop_value_info(graph: onnx.GraphProto, names: set[str]) -> None:
    vi = graph.value_info
    for i in range(len(vi) - 1, -1, -1):
        if vi[i].name in names:
            del vi[i]


def set_single_opset(proto: onnx.ModelProto, opset: int) -> None:
    """Exactly one opset_import: the default domain (FORMATS §5)."""
    del proto.opset_import[:]
    proto.opset_import.add(domain="", version=opset)
