"""The quantized layers of a float graph (traced, or read back from a traced file), found by name.

A quantized layer is the Conv / Gemm / MatMul node named after its module (the record key, FORMATS
§7); a MatMul layer with a bias also has its ``Add`` node ``<layer>.bias_add``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ..errors import ExportError
from ..formats import LAYER_OPS, LayerNames
from ..record import LayerInfo


@dataclass(frozen=True)
class Layer:
    """One quantized layer: its node and, for a MatMul with bias, the bias Add."""

    node: ir.Node
    bias_add: ir.Node | None = None

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def op(self) -> str:
        return self.node.op_type

    @property
    def weight(self) -> ir.Value:
        return self.node.inputs[1]

    @property
    def bias(self) -> ir.Value | None:
        if self.bias_add is not None:
            return self.bias_add.inputs[1]
        if self.op != "MatMul" and len(self.node.inputs) > 2:
            return self.node.inputs[2]
        return None

    @property
    def last(self) -> ir.Node:
        """The node that produces the layer's output (the bias Add of a MatMul that has one)."""
        return self.bias_add or self.node

    @property
    def channel_axis(self) -> int:
        """The axis of the weight that holds the output channels: 0 for Conv (and Gemm with transB = 1),
        the last for Gemm with transB = 0 and MatMul (weight ``[in, out]``)."""
        if self.op == "Conv" or (self.op == "Gemm" and self.node.attributes.get_int("transB", 0)):
            return 0
        return len(self.weight.const_value.shape) - 1

    @property
    def c_out(self) -> int:
        return int(self.weight.const_value.shape[self.channel_axis])

    def info(self) -> LayerInfo:
        """What record validation needs of the layer: C_out and its float bias (after any BN fold)."""
        b = self.bias
        bias = None if b is None else np.asarray(b.const_value.numpy(), dtype=np.float32).reshape(-1)
        return LayerInfo(c_out=self.c_out, bias=bias)


def find_layers(graph: ir.Graph, names) -> dict[str, Layer]:
    """The layers named ``names`` (in that order); a name with no Conv/Gemm/MatMul node of its own, or
    whose weight or bias is not an initializer, is an :class:`ExportError`."""
    by_name = {n.name: n for n in graph if n.name}
    layers = {}
    for name in names:
        node = by_name.get(name)
        if node is None or node.op_type not in LAYER_OPS or node.domain != "":
            raise ExportError(f"layer {name!r}: no Conv/Gemm/MatMul node of that name in the traced graph")
        bias_add = by_name.get(LayerNames(name).bias_add) if node.op_type == "MatMul" else None
        layer = Layer(node, bias_add)
        for what, v in (("weight", layer.weight), ("bias", layer.bias)):
            if v is not None and v.const_value is None:
                raise ExportError(f"layer {name!r}: its {what} {v.name!r} is not an initializer of the traced graph")
        layers[name] = layer
    return layers


def layer_infos(model: ir.Model, names) -> dict[str, LayerInfo]:
    """What record validation needs of the layers named ``names``: C_out and the float bias of each."""
    return {name: layer.info() for name, layer in find_layers(model.graph, names).items()}
