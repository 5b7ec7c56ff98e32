"""Wrap each quantized layer in its quant and dequant nodes: the fake-quant flavour (FORMATS §4) and
the deploy flavour (FORMATS §5).

**Matches** the quantized layers named in the records (:func:`~amct_core.onnx.layers.find_layers`),
handled in record order.

**Rewrites**, for a layer ``L`` with data input ``x``, output ``y`` (after the bias Add of a MatMul) and
record (``scale_d``, ``offset_d``, ``scale_w``); ``deq_scale = scale_d * scale_w`` (float32):

* quant, inserted right before ``L`` (``L`` now reads its output):

  - fake-quant: ``Mul(x, 1/scale_d) -> Round -> Add(offset_d) -> Clip(-128, 127) -> Sub(offset_d)``,
    nodes and constants ``<layer>.quant.fakequant.<part>``: the integer grid ``q - offset_d``, not
    rescaled;
  - deploy: ``AscendQuant(x)`` named ``<layer>.quant`` with exactly ``scale = 1/scale_d``,
    ``offset = offset_d``, ``dst_type = "INT8"``;

  layers that read the same ``x`` with equal (``scale_d``, ``offset_d``) share one quant, named after
  the first of them in record order (:class:`~onnx_ir.passes.common.TopologicalSortPass`, which runs
  after, moves it before the first of them in graph order);
* dequant, inserted right after ``L``'s last node, which now produces the accumulator
  (``<layer>.fakedequant.input`` / ``<layer>.dequant.input``):

  - fake-quant: ``Mul(acc, <layer>.fakedequant.deq_scale)`` named ``<layer>.fakedequant.mul``,
    ``deq_scale`` shaped ``[1, C, 1, 1]`` for Conv, ``[C]`` otherwise;
  - deploy: ``AscendDequant(acc, <layer>.dequant.param)`` named ``<layer>.dequant``, ``dtype = 0``, the
    param uint64 with the float32 pattern of ``deq_scale`` in its low 32 bits;

  the dequant produces ``y`` itself: its readers, its name (a graph output keeps its name), its type.
"""
from __future__ import annotations

import abc

import numpy as np
import onnx_ir as ir

from ...formats import (
    ASCEND_DEQUANT,
    ASCEND_QUANT,
    FAKE_QUANT_OPS,
    INT8_MAX,
    INT8_MIN,
    LayerNames,
    ascend_dequant_attributes,
    ascend_quant_attributes,
    deq_scale,
    inverse_scale,
    pack_deq_scale,
)
from ...record import LayerRecord
from ..layers import Layer, find_layers


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.val(name, const_value=ir.Tensor(array))
    graph.register_initializer(value)
    return value


class _InsertQuantDequantPass(ir.passes.InPlacePass):
    """The rewrite both flavours share; a flavour gives the quant and the dequant nodes."""

    def __init__(self, records: dict[str, LayerRecord]):
        super().__init__()
        self.records = records

    @abc.abstractmethod
    def quant(self, graph: ir.Graph, x: ir.Value, names: LayerNames, rec: LayerRecord) -> list[ir.Node]:
        """The nodes that quantize ``x`` (in order; the last one's output is what the layer reads)."""

    @abc.abstractmethod
    def dequant(self, graph: ir.Graph, acc: ir.Value, names: LayerNames, layer: Layer, deq: np.ndarray) -> ir.Node:
        """The node that dequantizes the layer's accumulator ``acc`` with ``deq`` = deq_scale."""

    @abc.abstractmethod
    def accumulator(self, names: LayerNames) -> str:
        """The name of the layer's accumulator, the dequant's input."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        shared: dict[tuple, ir.Value] = {}
        for name, layer in find_layers(graph, self.records).items():
            rec, names = self.records[name], LayerNames(name)
            x = layer.node.inputs[0]
            key = (x, np.float32(rec.scale_d).tobytes(), int(rec.offset_d))
            if key not in shared:
                nodes = self.quant(graph, x, names, rec)
                graph.insert_before(layer.node, nodes)
                shared[key] = nodes[-1].outputs[0]
            layer.node.replace_input_with(0, shared[key])
            self._dequantize(graph, layer, names, deq_scale(rec.scale_d, rec.scale_w))
        return ir.passes.PassResult(model, modified=bool(self.records))

    def _dequantize(self, graph: ir.Graph, layer: Layer, names: LayerNames, deq: np.ndarray) -> None:
        acc = layer.last.outputs[0]
        node = self.dequant(graph, acc, names, layer, deq)
        y = node.outputs[0]
        ir.convenience.replace_all_uses_with(acc, y, replace_graph_outputs=True)
        node.replace_input_with(0, acc)  # the line above rewired the dequant's own input too
        y.name, y.type, y.shape = acc.name, acc.type, acc.shape
        acc.name, acc.type, acc.shape = self.accumulator(names), None, None
        graph.insert_after(layer.last, node)


class InsertFakeQuantPass(_InsertQuantDequantPass):
    """The fake-quant flavour (FORMATS §4): standard ops only, integer grids in float32."""

    def quant(self, graph, x, names, rec):
        p = names.fakequant
        scale = _initializer(graph, p("scale"), np.asarray(inverse_scale(rec.scale_d), np.float32))
        offset = _initializer(graph, p("offset"), np.asarray(rec.offset_d, np.float32))
        lo = _initializer(graph, p("min"), np.asarray(INT8_MIN, np.float32))
        hi = _initializer(graph, p("max"), np.asarray(INT8_MAX, np.float32))
        operands = {"Mul": [scale], "Round": [], "Add": [offset], "Clip": [lo, hi], "Sub": [offset]}
        nodes, t = [], x
        for op in FAKE_QUANT_OPS:
            last = op == FAKE_QUANT_OPS[-1]
            out = ir.val(p("output") if last else p(f"{op.lower()}_output"))
            nodes.append(ir.node(op, [t, *operands[op]], name=p(op.lower()), outputs=[out]))
            t = out
        return nodes

    def dequant(self, graph, acc, names, layer, deq):
        shape = [1, deq.size, 1, 1] if layer.op == "Conv" else [deq.size]
        d = _initializer(graph, names.fakedequant("deq_scale"), deq.reshape(shape))
        return ir.node("Mul", [acc, d], name=names.fakedequant("mul"))

    def accumulator(self, names):
        return names.fakedequant("input")


class InsertAscendQuantPass(_InsertQuantDequantPass):
    """The deploy flavour (FORMATS §5): AscendQuant / AscendDequant in the default domain."""

    def quant(self, graph, x, names, rec):
        return [ir.node(ASCEND_QUANT, [x], ascend_quant_attributes(rec.scale_d, rec.offset_d), name=names.quant,
                        outputs=[ir.val(names.quant_output)])]

    def dequant(self, graph, acc, names, layer, deq):
        param = _initializer(graph, names.dequant_param, pack_deq_scale(deq).reshape(-1))
        return ir.node(ASCEND_DEQUANT, [acc, param], ascend_dequant_attributes(), name=names.dequant)

    def accumulator(self, names):
        return names.dequant_input
