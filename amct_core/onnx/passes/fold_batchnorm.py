"""Fold a BatchNormalization into the quantized Conv it directly follows (FORMATS §3).

**Matches** ``BatchNormalization(y, gamma, beta, mean, var)`` (inference form: one output) whose input
``y`` is the output of a quantized layer's ``Conv`` (a Conv whose weight is a
:class:`~amct_core.onnx.weights.QuantizedWeight`), read by nothing else and not a graph output, and
whose four parameters are initializers (and whose bias, if any, is an initializer only it reads).

**Rewrites** with ``k = gamma / sqrt(var + epsilon)`` (per output channel, float32):

* weight ``w' = w * k``, held as ``q_w' = q_w * sign(k)`` and ``scale_w' = scale_w * |k|`` (the record's
  folded scale, FORMATS §3), so the grid stays the integers the module trained with;
* bias ``b' = (b - mean) * k + beta`` (``b = 0`` for a Conv without bias, which gets one:
  ``<layer>.bias``);
* a non-finite ``k`` or ``b'`` (a NaN or infinite statistic, a negative variance, an overflow) is an
  :class:`~amct_core.errors.ExportError` naming the layer and the BatchNormalization, nothing rewritten;
* the Conv takes over the BatchNormalization's output (its name when it is a graph output, its type
  and shape), the BatchNormalization goes, and so do its parameters when nothing else reads them.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ...errors import ExportError
from ...formats import LayerNames
from ..weights import QuantizedWeight

DEFAULT_EPSILON = 1e-5  # BatchNormalization's default


def _foldable_conv(bn: ir.Node) -> ir.Node | None:
    if bn.op_type != "BatchNormalization" or bn.domain != "" or len(bn.inputs) != 5 or len(bn.outputs) != 1:
        return None
    y = bn.inputs[0]
    conv = y.producer() if y is not None else None
    if conv is None or conv.op_type != "Conv" or conv.domain != "":
        return None
    if not isinstance(conv.inputs[1].const_value, QuantizedWeight):
        return None
    if y.is_graph_output() or len(y.uses()) != 1:
        return None
    if not all(p is not None and p.is_initializer() for p in bn.inputs[1:]):
        return None
    b = conv.inputs[2] if len(conv.inputs) > 2 else None
    if b is not None and not (b.is_initializer() and len(b.uses()) == 1):
        return None
    return conv


def _fold(graph: ir.Graph, conv: ir.Node, bn: ir.Node) -> None:
    gamma, beta, mean, var = (p.const_value.numpy().astype(np.float32) for p in bn.inputs[1:])
    eps = np.float32(bn.attributes.get_float("epsilon", DEFAULT_EPSILON))
    with np.errstate(all="ignore"):  # a non-finite result is refused below, naming the layer
        k = (gamma / np.sqrt(var + eps)).astype(np.float32)
        b = conv.inputs[2] if len(conv.inputs) > 2 else None
        bias = b.const_value.numpy().astype(np.float32) if b is not None else np.zeros_like(k)
        folded_bias = ((bias - mean) * k + beta).astype(np.float32)
    for what, values in (("gamma / sqrt(var + epsilon)", k), ("the folded bias", folded_bias)):
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            raise ExportError(f"layer {conv.name!r}: folding BatchNormalization {bn.name!r} gives a non-finite "
                              f"{what} ({values[bad[0]]} at channel {int(bad[0])}, {bad.size} channel(s)); its "
                              "statistics (running_var, weight, bias, running_mean) must be finite, the variance "
                              "non-negative")
    w = conv.inputs[1]
    w.const_value = w.const_value.folded(k)
    folded = ir.Tensor(folded_bias)
    if b is not None:
        b.const_value = folded
    else:
        b = ir.val(LayerNames(conv.name).bias, const_value=folded)
        graph.register_initializer(b)
        conv.resize_inputs(3)
        conv.replace_input_with(2, b)
    y, out = conv.outputs[0], bn.outputs[0]
    ir.convenience.replace_all_uses_with(out, y, replace_graph_outputs=True)
    y.type, y.shape = out.type, out.shape
    if y.is_graph_output():
        y.name = out.name
    params = bn.inputs[1:]
    graph.remove(bn, safe=True)
    for p in params:
        if not p.uses() and not p.is_graph_output() and not p.is_graph_input():
            graph.initializers.pop(p.name, None)


class FoldBatchNormPass(ir.passes.InPlacePass):
    """BatchNormalization folded into the quantized Conv before it (see the module docstring)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        folded = 0
        for bn in list(graph):
            conv = _foldable_conv(bn)
            if conv is not None:
                _fold(graph, conv, bn)
                folded += 1
        return ir.passes.PassResult(model, modified=folded > 0)
