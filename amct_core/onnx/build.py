"""Build the fake-quant model (FORMATS §4) and the deploy model (FORMATS §5) from a traced float graph.

Both builders take the traced graph (quantized layers as Conv/Gemm/MatMul nodes named after their
modules, dequantized float weights) and the records, and rewrite one layer at a time. They never
touch the caller's graph: each works on a copy whose large arrays are shared, not copied.
"""
from __future__ import annotations

import numpy as np
import torch
from onnx import helper

from ..errors import ExportError
from ..formats import (
    ASCEND_DEQUANT,
    ASCEND_QUANT,
    FAKE_QUANT_MIN_OPSET,
    INT8_MAX,
    INT8_MIN,
    LayerNames,
    ascend_dequant_attributes,
    ascend_quant_attributes,
    deq_scale,
    inverse_scale,
    pack_deq_scale,
    quantize_bias,
    quantize_weight,
)
from ..record import LayerRecord
from .passes import splice_nodes
from .store import GridWeight, LazyTensor, OnnxModel, materialize, set_single_opset
from .trace import LayerMeta


def _f32(v) -> np.ndarray:
    return np.asarray(v, dtype=np.float32)


class _LayerView:
    """The nodes and tensors of one quantized layer in a traced graph."""

    def __init__(self, model: OnnxModel, meta: LayerMeta):
        g = model.graph
        self.node = next(n for n in g.node if n.name == meta.name)
        self.bias_add = None
        if meta.op == "MatMul" and meta.has_bias:
            self.bias_add = next(n for n in g.node if n.name == LayerNames(meta.name).bias_add)
        self.last = self.bias_add or self.node  # produces the layer's output
        self.x = self.node.input[0]
        self.w_name = self.node.input[1]
        if meta.op == "MatMul":
            self.b_name = self.bias_add.input[1] if self.bias_add is not None else None
        else:
            self.b_name = self.node.input[2] if len(self.node.input) > 2 and self.node.input[2] else None
        self.y = self.last.output[0]


def _deq_shape(meta: LayerMeta, n: int) -> list[int]:
    if meta.op == "Conv":
        return [1, n, 1, 1]
    return [n]


def _lazy_weight_grid(traced: OnnxModel, w_name: str, scale_w: np.ndarray, axis: int):
    """The weight's integer grid as a function of its dtype, computed only when the file is written."""
    source = traced.tensors.get(w_name)
    if source is None:  # a small initializer inside the proto
        source = traced.get_array(w_name)
    shape = tuple(source.shape)
    if isinstance(source, GridWeight) and np.array_equal(source.scale_w.view(np.uint32),
                                                          np.asarray(scale_w, np.float32).view(np.uint32)):
        # The record holds the model's own factors: take the grid straight from the parameters.
        return lambda dtype: LazyTensor(shape, np.dtype(dtype), lambda: source.grid(dtype))

    def grid(dtype) -> LazyTensor:
        return LazyTensor(shape, np.dtype(dtype),
                          lambda: quantize_weight(torch.from_numpy(np.ascontiguousarray(materialize(source))),
                                                  scale_w, axis).numpy().astype(dtype))

    return grid


def _prepare(traced: OnnxModel, layers: dict[str, LayerMeta], records: dict[str, LayerRecord]):
    """Per layer: (view, record, int weight grid, int bias grid or None, deq_scale float32)."""
    out = []
    for name, meta in layers.items():
        rec = records[name]
        view = _LayerView(traced, meta)
        q_w = _lazy_weight_grid(traced, view.w_name, np.asarray(rec.scale_w, np.float32), meta.channel_axis)
        deq = deq_scale(rec.scale_d, np.asarray(rec.scale_w, np.float32))
        q_b = None
        if view.b_name is not None:
            q_b = quantize_bias(traced.get_array(view.b_name).astype(np.float32), deq, name)
        out.append((view, meta, rec, q_w, q_b, deq))
    return out


class _Flavor:
    """What differs between the two models: the quant and dequant nodes and the stored dtypes."""

    weight_dtype: type
    bias_dtype: type

    def quant(self, model: OnnxModel, x: str, name: str, rec: LayerRecord) -> tuple[list, str]:
        raise NotImplementedError

    def dequant(self, model: OnnxModel, acc: str, y: str, name: str, meta: LayerMeta, deq: np.ndarray):
        raise NotImplementedError


class _FakeQuant(_Flavor):
    """FORMATS §4: Mul/Round/Add/Clip/Sub onto the integer grid, float weights on the grid, Mul out."""

    weight_dtype = bias_dtype = np.float32

    def quant(self, model, x, name, rec):
        p = LayerNames(name).fakequant
        model.set_array(p("scale"), _f32(inverse_scale(rec.scale_d)))
        model.set_array(p("offset"), _f32(rec.offset_d))
        model.set_array(p("min"), _f32(INT8_MIN))
        model.set_array(p("max"), _f32(INT8_MAX))
        nodes = [
            helper.make_node("Mul", [x, p("scale")], [p("mul_output")], name=p("mul")),
            helper.make_node("Round", [p("mul_output")], [p("round_output")], name=p("round")),
            helper.make_node("Add", [p("round_output"), p("offset")], [p("add_output")], name=p("add")),
            helper.make_node("Clip", [p("add_output"), p("min"), p("max")], [p("clip_output")], name=p("clip")),
            helper.make_node("Sub", [p("clip_output"), p("offset")], [p("output")], name=p("sub")),
        ]
        return nodes, p("output")

    def dequant(self, model, acc, y, name, meta, deq):
        p = LayerNames(name).fakedequant
        model.set_array(p("deq_scale"), deq.reshape(_deq_shape(meta, deq.size)))
        return helper.make_node("Mul", [acc, p("deq_scale")], [y], name=p("mul"))


class _Deploy(_Flavor):
    """FORMATS §5: AscendQuant, int8 weights, int32 bias, AscendDequant with the uint64 deq_scale."""

    weight_dtype, bias_dtype = np.int8, np.int32

    def quant(self, model, x, name, rec):
        names = LayerNames(name)
        node = helper.make_node(ASCEND_QUANT, [x], [names.quant_output], name=names.quant,
                                **ascend_quant_attributes(rec.scale_d, rec.offset_d))
        return [node], names.quant_output

    def dequant(self, model, acc, y, name, meta, deq):
        names = LayerNames(name)
        model.set_array(names.dequant_param, pack_deq_scale(deq).reshape(-1))
        return helper.make_node(ASCEND_DEQUANT, [acc, names.dequant_param], [y], name=names.dequant,
                                **ascend_dequant_attributes())


def _rewrite(traced: OnnxModel, layers: dict[str, LayerMeta], records: dict[str, LayerRecord], opset: int,
             flavor: _Flavor, acc_name) -> OnnxModel:
    """Wrap every quantized layer of a copy of ``traced`` in the flavor's quant and dequant nodes.

    Layers reading the same tensor with equal (scale_d, offset_d) share one quant chain, which stands
    before the first of them in graph order (not in record order: a ResNet block may run its
    downsample branch before its first conv).
    """
    model = traced.copy()
    shared: dict[tuple, str] = {}
    chains: list[list] = []
    tails: dict[str, list] = {}
    for view, meta, rec, q_w, q_b, deq in _prepare(model, layers, records):
        key = (view.x, np.float32(rec.scale_d).tobytes(), int(rec.offset_d))
        if key not in shared:
            nodes, shared[key] = flavor.quant(model, view.x, meta.name, rec)
            chains.append(nodes)
        view.node.input[0] = shared[key]
        model.set_array(view.w_name, q_w(flavor.weight_dtype))
        if q_b is not None:
            model.set_array(view.b_name, q_b.astype(flavor.bias_dtype))
        acc = acc_name(LayerNames(meta.name))
        y = view.y
        view.last.output[0] = acc
        tails[view.last.name] = [flavor.dequant(model, acc, y, meta.name, meta, deq)]
    splice_nodes(model.graph, chains, tails)
    set_single_opset(model.proto, opset)
    return model


def build_fake_quant(traced: OnnxModel, layers: dict[str, LayerMeta], records: dict[str, LayerRecord],
                     opset: int) -> OnnxModel:
    """The fake-quant model (FORMATS §4) from a traced graph and the records."""
    if opset < FAKE_QUANT_MIN_OPSET:
        raise ExportError(
            f"opset_version {opset}: the fake-quant model needs Round, which ONNX has from opset "
            f"{FAKE_QUANT_MIN_OPSET}; pick an opset >= {FAKE_QUANT_MIN_OPSET}"
        )
    return _rewrite(traced, layers, records, opset, _FakeQuant(), lambda n: n.fakedequant("input"))


def build_deploy(traced: OnnxModel, layers: dict[str, LayerMeta], records: dict[str, LayerRecord],
                 opset: int) -> OnnxModel:
    """The deploy model (FORMATS §5) from a traced graph and the records."""
    return _rewrite(traced, layers, records, opset, _Deploy(), lambda n: n.dequant_input)
