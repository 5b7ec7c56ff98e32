"""Trace a QAT model to a float ONNX graph whose quantized layers are named after their modules.

The tracer (torch.onnx's TorchScript exporter, which can emit the low opsets ATC needs) sees each
QAT layer as one placeholder node carrying only its data input and its name; the layer's weights are
not serialized by torch at all. The passes here then

0. rewire the tracer's ``Identity`` nodes of deduplicated initializers to the initializers;
1. fold a BatchNormalization that directly and solely consumes a quantized Conv into it (FORMATS §3);
2. lower each placeholder into the standard op(s) it stands for (Conv; Gemm with transB=0 and weight
   ``[in, out]``; MatMul + Add) named after the module, with the *dequantized* weights
   ``q_w * scale_w`` (exactly representable, so rebuilding ``q_w`` from them and the record is exact);
3. return the record entries (the factors actually exported) beside the graph.
"""
from __future__ import annotations

import io
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import onnx
import torch
import torch.nn as nn
from onnx import helper, numpy_helper

from .._modes import eval_mode
from ..errors import ExportError
from ..formats import PLACEHOLDER_OP, TRACE_DOMAIN, LayerNames, output_dim_name, quantize_weight
from ..quant.modules import LayerFactors, QuantConv2d, QuantLinear, is_quant_module
from ..record import LayerInfo, LayerRecord
from .passes import eliminate_initializer_identities
from .store import GridWeight, OnnxModel, drop_value_info, rename_tensor_uses, set_single_opset

MAX_TRACER_OPSET = 20  # the TorchScript exporter's highest opset


@dataclass
class LayerMeta:
    """What the builders need to know of one quantized layer of a traced graph."""

    name: str
    op: str  # "Conv" | "Gemm" | "MatMul"
    c_out: int
    channel_axis: int  # axis of the weight initializer that holds output channels
    has_bias: bool


@dataclass
class TracedModel:
    model: OnnxModel
    records: dict[str, LayerRecord]
    layers: dict[str, LayerMeta]


def layer_meta(graph: onnx.GraphProto, tensors: OnnxModel, name: str) -> LayerMeta:
    """Find quantized layer ``name`` in a traced/float graph by node name (the record key)."""
    node = next((n for n in graph.node if n.name == name), None)
    if node is None or node.op_type not in ("Conv", "Gemm", "MatMul"):
        raise ExportError(f"layer {name!r}: no Conv/Gemm/MatMul node of that name in the traced graph")
    w = tensors.get_array(node.input[1])
    axis = 0 if node.op_type == "Conv" else 1
    if node.op_type == "Gemm":
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transB", 0):
            axis = 0
    has_bias = len(node.input) > 2 and bool(node.input[2])
    if node.op_type == "MatMul":
        has_bias = any(n.name == LayerNames(name).bias_add for n in graph.node)
    return LayerMeta(name, node.op_type, int(w.shape[axis]), axis, has_bias)


def layer_infos(model: OnnxModel, layers: dict[str, LayerMeta]) -> dict[str, LayerInfo]:
    """What record validation needs of each quantized layer: C_out and the (folded) float bias."""
    infos = {}
    for name, meta in layers.items():
        bias = None
        if meta.has_bias:
            if meta.op == "MatMul":
                node = next(n for n in model.graph.node if n.name == LayerNames(name).bias_add)
                bias = model.get_array(node.input[1])
            else:
                node = next(n for n in model.graph.node if n.name == name)
                bias = model.get_array(node.input[2])
        infos[name] = LayerInfo(c_out=meta.c_out, bias=bias)
    return infos


@contextmanager
def _export_mode(model: nn.Module):
    """Eval mode, and each QAT layer named for the tracer (its record key); everything restored after."""
    named = []
    try:
        for name, m in model.named_modules():
            if is_quant_module(m):
                m._export_name = name
                named.append(m)
        with eval_mode(model):
            yield
    finally:
        for m in named:
            m._export_name = None


def _run_tracer(model: nn.Module, inputs: tuple, input_names, output_names, dynamic_axes, opset: int) -> onnx.ModelProto:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, inputs, buf, dynamo=False, opset_version=opset, input_names=input_names,
            output_names=output_names, dynamic_axes=dynamic_axes, do_constant_folding=True,
            custom_opsets={TRACE_DOMAIN: 1},
        )
    return onnx.load_from_string(buf.getvalue())


def _fold_bn(graph, model: OnnxModel, placeholder, f: LayerFactors, eps_of):
    """If a BatchNormalization solely consumes the conv ``placeholder``, fold it into ``f`` in place.

    Returns (the BN node's output name, the per-channel sign of its factor k) or None when nothing
    was folded. The weight grid is multiplied by the sign; the record's scale_w by |k|.
    """
    y = placeholder.output[0]
    users = [n for n in graph.node if y in n.input]
    if len(users) != 1 or users[0].op_type != "BatchNormalization" or y in {o.name for o in graph.output}:
        return None
    bn = users[0]
    if bn.input[0] != y or len(bn.output) != 1:
        return None
    inits = model.initializer_names()
    if not all(i in inits for i in bn.input[1:5]):
        return None
    gamma, beta, mean, var = (model.get_array(i).astype(np.float32) for i in bn.input[1:5])
    eps = np.float32(eps_of(bn))
    k = (gamma / np.sqrt(var + eps)).astype(np.float32)
    sign = np.where(k < 0, np.float32(-1), np.float32(1))
    f.scale_w = (f.scale_w * np.abs(k)).astype(np.float32)
    b = f.bias if f.bias is not None else np.zeros_like(k)
    f.bias = ((b - mean) * k + beta).astype(np.float32)
    out = bn.output[0]
    graph.node.remove(bn)
    used = {i for n in graph.node for i in n.input}
    for i in bn.input[1:5]:
        if i not in used:
            model.remove_initializer(i)
    return out, sign


def _bn_eps(node) -> float:
    for a in node.attribute:
        if a.name == "epsilon":
            return a.f
    return 1e-5


def _dequantized_weight(module, scale_w: np.ndarray, unfolded_scale: np.ndarray, sign: np.ndarray | None,
                        transpose: bool) -> GridWeight:
    """``q_w * scale_w`` (BN sign folded in), computed from the module's parameters when written.

    ``scale_w`` is the exported (folded) scale; ``unfolded_scale`` the module's own weight scale,
    from which the integer grid is computed in place, in torch, when a builder asks for it.
    """
    shape = tuple(module.weight.shape)
    out_shape = shape[::-1] if transpose else shape
    bshape = (-1,) + (1,) * (len(shape) - 1)

    def compute() -> np.ndarray:
        q = grid(np.float32)
        s = scale_w.reshape((1, -1) if transpose else bshape)
        return (q * s).astype(np.float32)

    def grid(dtype) -> np.ndarray:
        with torch.no_grad():
            w = module.weight.detach()
            q = quantize_weight(w, unfolded_scale, axis=0)
            if sign is not None:
                q.mul_(torch.from_numpy(sign).reshape(bshape))
            q.add_(0.0)  # -0.0 of a negative sign -> +0.0
            if np.dtype(dtype) == np.int8:
                q = q.to(torch.int8)
            if transpose:
                q = q.t()
            return q.contiguous().numpy()

    return GridWeight(out_shape, np.dtype(np.float32), compute, scale_w=scale_w.astype(np.float32), grid=grid)


def _lower(graph, model: OnnxModel, ph, name: str, module, f: LayerFactors, unfolded_scale, sign, out_name: str,
           opset: int) -> LayerMeta:
    """Replace placeholder ``ph`` by the standard op(s) of the layer, with dequantized weights."""
    x = ph.input[0]
    kind = next(helper.get_attribute_value(a) for a in ph.attribute if a.name == "kind")
    kind = kind.decode() if isinstance(kind, bytes) else kind
    names = LayerNames(name)
    w_name, b_name = names.weight, names.bias
    idx = list(graph.node).index(ph)
    graph.node.remove(ph)
    new_nodes = []
    if isinstance(module, QuantConv2d):
        model.set_array(w_name, _dequantized_weight(module, f.scale_w, unfolded_scale, sign, transpose=False))
        inputs = [x, w_name]
        if f.bias is not None:
            model.set_array(b_name, f.bias.astype(np.float32))
            inputs.append(b_name)
        kh, kw = module.kernel_size
        new_nodes.append(helper.make_node(
            "Conv", inputs, [out_name], name=name, kernel_shape=[kh, kw], strides=list(module.stride),
            pads=list(module.padding) * 2, dilations=list(module.dilation), group=module.groups,
        ))
        meta = LayerMeta(name, "Conv", module.out_channels, 0, f.bias is not None)
    elif isinstance(module, QuantLinear):
        model.set_array(w_name, _dequantized_weight(module, f.scale_w, unfolded_scale, None, transpose=True))
        bias = f.bias
        if kind == "gemm":
            if bias is None and opset < 11:
                bias = np.zeros(module.out_features, np.float32)  # Gemm's C is optional only from opset 11
            inputs = [x, w_name] + ([b_name] if bias is not None else [])
            if bias is not None:
                model.set_array(b_name, bias.astype(np.float32))
            new_nodes.append(helper.make_node("Gemm", inputs, [out_name], name=name, transB=0))
            meta = LayerMeta(name, "Gemm", module.out_features, 1, bias is not None)
        else:
            if bias is None:
                new_nodes.append(helper.make_node("MatMul", [x, w_name], [out_name], name=name))
            else:
                mm_out = names.matmul_output
                model.set_array(b_name, bias.astype(np.float32))
                new_nodes.append(helper.make_node("MatMul", [x, w_name], [mm_out], name=name))
                new_nodes.append(helper.make_node("Add", [mm_out, b_name], [out_name], name=names.bias_add))
            meta = LayerMeta(name, "MatMul", module.out_features, 1, bias is not None)
    else:  # pragma: no cover - only QAT modules emit placeholders
        raise ExportError(f"layer {name!r}: unsupported module type {type(module).__name__}")
    for k, n in enumerate(new_nodes):
        graph.node.insert(idx + k, n)
    return meta


def _move_large_initializers(om: OnnxModel, min_bytes: int = 1024) -> None:
    """Move the tracer's large initializers (embeddings, unquantized layers) out of the protobuf into
    ``om.tensors``, so copying the graph for each builder and for writing stays cheap."""
    inits = om.graph.initializer
    for i in range(len(inits) - 1, -1, -1):
        t = inits[i]
        if t.HasField("raw_data") and len(t.raw_data) >= min_bytes:
            om.tensors[t.name] = numpy_helper.to_array(t)
            del inits[i]


def trace_quant_model(model: nn.Module, inputs: tuple, input_names=None, output_names=None,
                      dynamic_axes=None, opset: int = 11) -> TracedModel:
    """Trace ``model`` (with QAT layers) into a float ONNX graph plus the records of its quantized layers.

    The model's parameters and train/eval flags are left as they were.
    """
    if opset > MAX_TRACER_OPSET:
        raise ExportError(
            f"opset_version {opset}: the tracer (torch.onnx TorchScript exporter) emits opsets up to "
            f"{MAX_TRACER_OPSET}; pick an opset <= {MAX_TRACER_OPSET}"
        )
    modules = {n: m for n, m in model.named_modules() if is_quant_module(m)}
    factors: dict[str, LayerFactors] = {}
    for n, m in modules.items():
        try:
            factors[n] = m.quant_factors(with_weights=False)
        except RuntimeError as e:
            raise ExportError(f"layer {n!r}: {e}") from None
    with _export_mode(model), torch.no_grad():
        try:
            proto = _run_tracer(model, inputs, input_names, output_names, dynamic_axes, opset)
        except Exception as e:  # noqa: BLE001
            shapes = [(tuple(t.shape), str(t.dtype)) for t in inputs]
            if "output names" in str(e):
                raise ExportError(f"output_names {output_names!r} do not fit the model: {e}") from e
            raise ExportError(
                f"input_data {shapes} does not fit the model, or the model cannot be traced: forward() raised "
                f"{type(e).__name__}: {e}"
            ) from e
    om = OnnxModel(proto)
    graph = proto.graph
    eliminate_initializer_identities(graph, om.initializer_names())
    placeholders = [n for n in graph.node if n.domain == TRACE_DOMAIN]
    layers: dict[str, LayerMeta] = {}
    records: dict[str, LayerRecord] = {}
    dropped: set[str] = set()
    for ph in placeholders:
        name = next(helper.get_attribute_value(a) for a in ph.attribute if a.name == "layer")
        name = name.decode() if isinstance(name, bytes) else name
        if name in layers:
            raise ExportError(f"layer {name!r} is called more than once in forward(); a quantized layer must run once")
        module, f = modules[name], factors[name]
        out_name = ph.output[0]
        sign = None
        unfolded_scale = np.array(f.scale_w, dtype=np.float32)  # before any BN fold
        if isinstance(module, QuantConv2d):
            folded = _fold_bn(graph, om, ph, f, _bn_eps)
            if folded is not None:
                dropped.add(out_name)
                out_name, sign = folded
        graph_outputs = {o.name for o in graph.output}
        if out_name not in graph_outputs:
            # Give the layer's output a readable name; graph outputs keep theirs (output_names hold).
            new_name = LayerNames(name).output
            rename_tensor_uses(graph, out_name, new_name)
            for vi in graph.value_info:
                if vi.name == out_name:
                    vi.name = new_name
            for n in graph.node:
                for i, o in enumerate(n.output):
                    if o == out_name:
                        n.output[i] = new_name
            out_name = new_name
        layers[name] = _lower(graph, om, ph, name, module, f, unfolded_scale, sign, out_name, opset)
        records[name] = LayerRecord(scale_d=f.scale_d, offset_d=f.offset_d, scale_w=[float(s) for s in f.scale_w])
    # A graph output produced by a placeholder got the tracer's made-up dim names; name them after the output.
    for o in graph.output:
        for i, d in enumerate(o.type.tensor_type.shape.dim):
            if d.HasField("dim_param") and d.dim_param.startswith(PLACEHOLDER_OP):
                d.dim_param = output_dim_name(o.name, i)
    # Keep module order in the record (stable, readable).
    order = [n for n in modules if n in layers]
    drop_value_info(graph, dropped)
    set_single_opset(proto, opset)
    _move_large_initializers(om)
    return TracedModel(om, {n: records[n] for n in order}, {n: layers[n] for n in order})
