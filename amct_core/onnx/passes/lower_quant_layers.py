"""Lower the tracer's placeholders into the standard ops of the layers they stand for.

**Matches** every ``amct_trace::QuantLayer`` node: the one node the tracer emits per QAT layer,
carrying only the layer's data input ``x`` and its attributes ``layer`` (the module name, FORMATS §7)
and ``kind`` (``conv``, ``gemm``: a Linear on 2-D input, ``matmul``: a Linear on N-D input).

**Rewrites** it, in place, into (``W``, ``B``: initializers ``<layer>.weight``, ``<layer>.bias``)

* ``conv``: ``Conv(x, W[, B])`` named ``<layer>``, with the module's kernel, strides, pads, dilations
  and groups;
* ``gemm``: ``Gemm(x, W[, B])`` with ``transB = 0`` and ``W`` stored ``[in, out]`` (FORMATS §5); below
  opset 11, where Gemm's ``C`` is required, a bias-free layer gets a zero ``B``;
* ``matmul``: ``MatMul(x, W)`` (``W`` ``[in, out]``), and with a bias ``Add(<layer>.matmul_output, B)``
  named ``<layer>.bias_add``.

``W`` is a :class:`~amct_core.onnx.weights.QuantizedWeight`: ``q_w * scale_w`` with
``q_w = clip(round(w / scale_w), -128, 127)`` of the module's weight ``w`` and scale (FORMATS §3),
computed when written. The layer's output keeps the placeholder's users, type and shape; it is named
``<layer>.output`` unless it is a graph output, which keeps its name (``output_names`` hold); symbolic
dimensions the tracer named after the placeholder get the graph output's name
(``<output>_dim_<axis>``). A layer whose placeholder appears twice (a module called twice in
``forward()``) is an :class:`ExportError`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import torch

from ...errors import ExportError
from ...formats import PLACEHOLDER_OP, TRACE_DOMAIN, LayerNames, output_dim_name
from ..weights import QuantizedWeight


@dataclass(frozen=True)
class LayerSource:
    """What a placeholder stands for: one QAT layer's weight, weight scale, bias and (Conv) attributes."""

    weight: torch.Tensor  # the module's float weight, torch layout ([C_out, C_in / group, kH, kW] or [out, in])
    scale_w: np.ndarray  # its scale, float32: 1 value, or 1 per output channel
    bias: np.ndarray | None  # float32 [C_out]
    conv: dict | None = None  # Conv attributes (kernel_shape, strides, pads, dilations, group); None: a Linear


def _placeholders(graph: ir.Graph) -> list[ir.Node]:
    return [n for n in graph if n.domain == TRACE_DOMAIN and n.op_type == PLACEHOLDER_OP]


def _initializer(graph: ir.Graph, name: str, tensor) -> ir.Value:
    value = ir.val(name, const_value=tensor)
    graph.register_initializer(value)
    return value


class LowerQuantLayersPass(ir.passes.InPlacePass):
    """Placeholders -> Conv / Gemm / MatMul (+ bias Add) with quantized weights (see the module docstring).

    ``layers``: the placeholder's ``layer`` attribute -> :class:`LayerSource`; ``opset``: the model's.
    """

    def __init__(self, layers: dict[str, LayerSource], opset: int):
        super().__init__()
        self.layers = layers
        self.opset = opset

    def requires(self, model: ir.Model) -> None:
        seen: set[str] = set()
        for ph in _placeholders(model.graph):
            name = ph.attributes.get_string("layer")
            if name in seen:
                raise ExportError(f"layer {name!r} is called more than once in forward(); a quantized layer must "
                                  "run once")
            if name not in self.layers:
                raise ExportError(f"layer {name!r}: the traced graph has a placeholder for it, but no QAT module")
            seen.add(name)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        placeholders = _placeholders(graph)
        for ph in placeholders:
            self._lower(graph, ph)
        for out in graph.outputs:  # dimensions the tracer named after the placeholder
            if out.shape is None:
                continue
            dims = list(out.shape)
            if any(isinstance(d, ir.SymbolicDim) and (d.value or "").startswith(PLACEHOLDER_OP) for d in dims):
                out.shape = ir.Shape([ir.SymbolicDim(output_dim_name(out.name, i))
                                      if isinstance(d, ir.SymbolicDim) and (d.value or "").startswith(PLACEHOLDER_OP)
                                      else d for i, d in enumerate(dims)])
        return ir.passes.PassResult(model, modified=bool(placeholders))

    def _lower(self, graph: ir.Graph, ph: ir.Node) -> None:
        name = ph.attributes.get_string("layer")
        kind = ph.attributes.get_string("kind")
        source, names = self.layers[name], LayerNames(name)
        x, y = ph.inputs[0], ph.outputs[0]
        bias = source.bias
        if kind == "gemm" and bias is None and self.opset < 11:
            bias = np.zeros(source.weight.shape[0], np.float32)  # Gemm's C is optional only from opset 11
        w = _initializer(graph, names.weight, QuantizedWeight(source.weight, source.scale_w, transposed=kind != "conv"))
        b = _initializer(graph, names.bias, ir.Tensor(bias.astype(np.float32))) if bias is not None else None
        if kind == "conv":
            nodes = [ir.node("Conv", [x, w] + ([b] if b is not None else []),
                             dict(sorted(source.conv.items())), name=name)]
        elif kind == "gemm":
            nodes = [ir.node("Gemm", [x, w] + ([b] if b is not None else []), {"transB": 0}, name=name)]
        elif b is None:
            nodes = [ir.node("MatMul", [x, w], name=name)]
        else:
            mm = ir.node("MatMul", [x, w], name=name, outputs=[ir.val(names.matmul_output)])
            nodes = [mm, ir.node("Add", [mm.outputs[0], b], name=names.bias_add)]
        out = nodes[-1].outputs[0]
        out.type, out.shape = y.type, y.shape
        out.name = y.name if y.is_graph_output() else names.output
        ir.convenience.replace_all_uses_with(y, out, replace_graph_outputs=True)
        graph.insert_before(ph, nodes)
        graph.remove(ph, safe=True)
