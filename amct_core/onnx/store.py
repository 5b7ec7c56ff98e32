"""A model in memory: the ONNX graph plus its large tensors kept beside it.

Large weights live in ``tensors`` (name -> array, or a :class:`LazyTensor` that computes the array
when asked) instead of inside the protobuf, so a model of any size can be rewritten without copying
its weights into protobuf fields (and past protobuf's 2 GB limit). The writer decides whether they
are embedded or go to an external data file, and materializes lazy tensors one at a time while it
writes, so a quantized copy of every weight never has to exist in memory at once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Union

import numpy as np
import onnx
from onnx import numpy_helper


@dataclass(frozen=True)
class LazyTensor:
    """An initializer computed on demand (shape and dtype known up front)."""

    shape: tuple[int, ...]
    dtype: np.dtype
    compute: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    def materialize(self) -> np.ndarray:
        a = np.ascontiguousarray(self.compute(), dtype=self.dtype)
        if a.shape != tuple(self.shape):
            raise AssertionError(f"lazy tensor computed shape {a.shape}, declared {self.shape}")
        return a


@dataclass(frozen=True)
class GridWeight(LazyTensor):
    """A dequantized weight ``q_w * scale_w`` that can also give its integer grid ``q_w`` directly.

    ``grid(dtype)`` returns q_w (in this tensor's layout) computed from the source parameters,
    valid for exactly this ``scale_w``; builders use it instead of re-quantizing the dequantized
    values, which saves about ten full-size passes per weight.
    """

    scale_w: np.ndarray | None = None
    grid: Callable[[np.dtype], np.ndarray] | None = None


Tensor = Union[np.ndarray, LazyTensor]


def materialize(t: Tensor) -> np.ndarray:
    return t.materialize() if isinstance(t, LazyTensor) else t


@dataclass
class OnnxModel:
    proto: onnx.ModelProto
    # Initializers that are not (yet) in proto.graph.initializer, by name.
    tensors: dict[str, Tensor] = field(default_factory=dict)

    @property
    def graph(self) -> onnx.GraphProto:
        return self.proto.graph

    def initializer_names(self) -> set[str]:
        return {t.name for t in self.graph.initializer} | set(self.tensors)

    def get_array(self, name: str) -> np.ndarray:
        if name in self.tensors:
            return materialize(self.tensors[name])
        for t in self.graph.initializer:
            if t.name == name:
                return numpy_helper.to_array(t)
        raise KeyError(name)

    def get_shape(self, name: str) -> tuple[int, ...]:
        if name in self.tensors:
            return tuple(self.tensors[name].shape)
        for t in self.graph.initializer:
            if t.name == name:
                return tuple(t.dims)
        raise KeyError(name)

    def set_array(self, name: str, value: Tensor) -> None:
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
