"""Build the fake-quant model (FORMATS §4) and the deploy model (FORMATS §5) from a traced float graph.

Both builders take the traced graph (quantized layers as Conv/Gemm/MatMul nodes named after their
modules, dequantized float weights) and the records, and rewrite one layer at a time. They never
touch the caller's graph: each works on a copy whose large arrays are shared, not copied.
"""
from __future__ import annotations

import numpy as np
from onnx import helper

from ..errors import ExportError
from ..quant.arith import INT32_MAX, INT32_MIN, QMAX, QMIN, deq_scale, pack_deq_scale, quantize_bias
from ..record import LayerRecord
from .passes import splice_nodes
from .store import GridWeight, LazyTensor, OnnxModel, materialize, set_single_opset
from .trace import BIAS_ADD_SUFFIX, LayerMeta

FAKE_QUANT_MIN_OPSET = 11  # Round exists from opset 11


def _f32(v) -> np.ndarray:
    return np.asarray(v, dtype=np.float32)


def quantized_weight(w_float: np.ndarray, scale_w: np.ndarray, axis: int) -> np.ndarray:
    """``clip(round(w / scale_w), -128, 127)`` with scale_w along ``axis`` (1 value broadcasts)."""
    s = _f32(scale_w)
    if s.size > 1:
        shape = [1] * w_float.ndim
        shape[axis] = s.size
        s = s.reshape(shape)
    return np.clip(np.round(w_float / s), QMIN, QMAX)


def quantized_bias(bias: np.ndarray, deq: np.ndarray, layer: str) -> np.ndarray:
    bq = quantize_bias(bias, deq)
    bad = np.flatnonzero((bq < INT32_MIN) | (bq > INT32_MAX) | ~np.isfinite(bq))
    if bad.size:
        c = int(bad[0])
        raise ExportError(
            f"layer {layer!r}: bias overflows int32 after quantization (channel {c}: {float(bias.flat[c]):.6g} / "
            f"deq_scale {float(np.broadcast_to(deq, bias.shape)[c]):.6g}); exclude this layer from quantization"
        )
    return bq


class _LayerView:
    """The nodes and tensors of one quantized layer in a traced graph."""

    def __init__(self, model: OnnxModel, meta: LayerMeta):
        g = model.graph
        self.node = next(n for n in g.node if n.name == meta.name)
        self.bias_add = None
        if meta.op == "MatMul" and meta.has_bias:
            self.bias_add = next(n for n in g.node if n.name == meta.name + BIAS_ADD_SUFFIX)
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
                          lambda: quantized_weight(materialize(source), scale_w, axis).astype(dtype))

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
            q_b = quantized_bias(traced.get_array(view.b_name).astype(np.float32), deq, name)
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
        p = f"{name}.quant.fakequant"
        model.set_array(f"{p}.scale", _f32(np.float32(1.0) / np.float32(rec.scale_d)))
        model.set_array(f"{p}.offset", _f32(rec.offset_d))
        model.set_array(f"{p}.min", _f32(QMIN))
        model.set_array(f"{p}.max", _f32(QMAX))
        nodes = [
            helper.make_node("Mul", [x, f"{p}.scale"], [f"{p}.mul_output"], name=f"{p}.mul"),
            helper.make_node("Round", [f"{p}.mul_output"], [f"{p}.round_output"], name=f"{p}.round"),
            helper.make_node("Add", [f"{p}.round_output", f"{p}.offset"], [f"{p}.add_output"], name=f"{p}.add"),
            helper.make_node("Clip", [f"{p}.add_output", f"{p}.min", f"{p}.max"], [f"{p}.clip_output"], name=f"{p}.clip"),
            helper.make_node("Sub", [f"{p}.clip_output", f"{p}.offset"], [f"{p}.output"], name=f"{p}.sub"),
        ]
        return nodes, f"{p}.output"

    def dequant(self, model, acc, y, name, meta, deq):
        p = f"{name}.fakedequant"
        model.set_array(f"{p}.deq_scale", deq.reshape(_deq_shape(meta, deq.size)))
        return helper.make_node("Mul", [acc, f"{p}.deq_scale"], [y], name=f"{p}.mul")


class _Deploy(_Flavor):
    """FORMATS §5: AscendQuant, int8 weights, int32 bias, AscendDequant with the uint64 deq_scale."""

    weight_dtype, bias_dtype = np.int8, np.int32

    def quant(self, model, x, name, rec):
        out = f"{name}.quant.output"
        node = helper.make_node(
            "AscendQuant", [x], [out], name=f"{name}.quant",
            scale=float(np.float32(1.0) / np.float32(rec.scale_d)), offset=float(rec.offset_d),
            dst_type="INT8",  # AMCT's form: exactly scale, offset, dst_type (sqrt_mode 0 and round_mode "Round" are ATC's defaults)
        )
        return [node], out

    def dequant(self, model, acc, y, name, meta, deq):
        param = f"{name}.dequant.param"
        model.set_array(param, pack_deq_scale(deq).reshape(-1))
        return helper.make_node("AscendDequant", [acc, param], [y], name=f"{name}.dequant", dtype=0)


def _rewrite(traced: OnnxModel, layers: dict[str, LayerMeta], records: dict[str, LayerRecord], opset: int,
             flavor: _Flavor, acc_suffix: str) -> OnnxModel:
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
        acc = f"{meta.name}{acc_suffix}"
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
    return _rewrite(traced, layers, records, opset, _FakeQuant(), ".fakedequant.input")


def build_deploy(traced: OnnxModel, layers: dict[str, LayerMeta], records: dict[str, LayerRecord],
                 opset: int) -> OnnxModel:
    """The deploy model (FORMATS §5) from a traced graph and the records."""
    return _rewrite(traced, layers, records, opset, _Deploy(), ".dequant.input")
