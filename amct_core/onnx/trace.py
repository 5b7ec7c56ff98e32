"""Trace a QAT model to a float ONNX graph (onnx-ir) whose quantized layers are named after their modules.

The tracer (torch.onnx's TorchScript exporter, which can emit the low opsets ATC needs) sees each
QAT layer as one placeholder node carrying only its data input and its name; the layer's weights are
not serialized by torch at all. The trace passes (:func:`amct_core.onnx.passes.trace_passes`) then
make it the float graph both models are built from: Identity-forwarded initializers read directly,
each placeholder lowered into the standard op(s) it stands for with its quantized weight
``q_w * scale_w``, BatchNorms after quantized Convs folded, the tracer's helper domain removed. The
records (the factors actually exported) are read off the result.
"""
from __future__ import annotations

import io
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from .._modes import eval_mode
from ..errors import ExportError
from ..formats import TRACE_DOMAIN
from ..quant.modules import LayerFactors, QuantConv2d, describe_nonfinite, is_quant_module
from ..record import LayerRecord
from . import metadata
from .layers import find_layers
from .passes import LayerSource, run, trace_passes

MAX_TRACER_OPSET = 20  # the TorchScript exporter's highest opset


@dataclass
class TracedModel:
    """The float graph both models are built from, and the records of its quantized layers (module order)."""

    model: ir.Model
    records: dict[str, LayerRecord]


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


def _source(module, f: LayerFactors) -> LayerSource:
    conv = None
    if isinstance(module, QuantConv2d):
        conv = {"kernel_shape": list(module.kernel_size), "strides": list(module.stride),
                "pads": list(module.padding) * 2, "dilations": list(module.dilation), "group": module.groups}
    return LayerSource(module.weight, np.asarray(f.scale_w, np.float32), f.bias, conv)


def check_finite_parameters(model: nn.Module, weight_scales: dict[str, torch.Tensor] | None = None) -> None:
    """Raise ExportError listing every layer, and which of its tensors, that is not finite: a quantized layer's
    weight, bias or activation range (``clip_min`` / ``clip_max``), a BatchNorm's weight, bias, running mean or
    running variance (and a negative running variance). A NaN or an infinity there makes both models wrong
    in different ways (no int8 grid holds it), so nothing may be exported from them. ``weight_scales``: the
    layers' weight scales by module name, when already computed."""
    problems = []
    for name, m in model.named_modules():
        if is_quant_module(m):
            problems += [f"layer {name!r}: {b}" for b in m.nonfinite_parameters((weight_scales or {}).get(name))]
        elif isinstance(m, _BatchNorm):
            for t in ("weight", "bias", "running_mean", "running_var"):
                value = getattr(m, t, None)
                d = describe_nonfinite(value) if isinstance(value, torch.Tensor) else None
                if d is not None:
                    problems.append(f"layer {name!r} ({type(m).__name__}): {t}: {d}")
            var = getattr(m, "running_var", None)
            if isinstance(var, torch.Tensor) and bool((var < 0).any()):
                first = [int(i) for i in torch.nonzero(var < 0)[0]]
                problems.append(f"layer {name!r} ({type(m).__name__}): running_var is negative "
                                f"({float(var[tuple(first)])} at {first})")
    if problems:
        raise ExportError("the model has non-finite parameters (NaN or infinity), which no int8 model can hold; "
                          "nothing was written:\n  " + "\n  ".join(problems))


def trace_quant_model(model: nn.Module, inputs: tuple, input_names=None, output_names=None,
                      dynamic_axes=None, opset: int = 11) -> TracedModel:
    """Trace ``model`` (with QAT layers) into a float ONNX graph plus the records of its quantized layers.

    The graph records the example inputs' shapes and dtypes in its metadata (``amct.input_shapes``,
    :mod:`amct_core.onnx.metadata`). The model's parameters and train/eval flags are left as they were.
    """
    if opset > MAX_TRACER_OPSET:
        raise ExportError(
            f"opset_version {opset}: the tracer (torch.onnx TorchScript exporter) emits opsets up to "
            f"{MAX_TRACER_OPSET}; pick an opset <= {MAX_TRACER_OPSET}"
        )
    modules = {n: m for n, m in model.named_modules() if is_quant_module(m)}
    for n, m in modules.items():
        if not bool(m.act_initialized):
            raise ExportError(f"layer {n!r}: activation range is not initialised: calibrate the model (distill(), "
                              "or one forward pass in train or eval mode) before exporting")
    scales = {n: m.weight_scale() for n, m in modules.items()}  # one pass over each weight serves both
    check_finite_parameters(model, scales)
    factors = {n: m.quant_factors(scales[n]) for n, m in modules.items()}
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
    examples = [metadata.ExampleInput(tuple(t.shape), str(t.dtype).removeprefix("torch.")) for t in inputs]
    metadata.record_input_shapes(proto, examples, input_names)
    traced = ir.serde.deserialize_model(proto)
    del proto  # the tracer's own initializers stay referenced by the IR model, not copied
    called = {n.attributes.get_string("layer") for n in traced.graph if n.domain == TRACE_DOMAIN}
    run(trace_passes({n: _source(m, factors[n]) for n, m in modules.items()}, opset), traced)
    layers = find_layers(traced.graph, [n for n in modules if n in called])
    records = {name: LayerRecord(scale_d=factors[name].scale_d, offset_d=factors[name].offset_d,
                                 scale_w=[float(s) for s in layer.weight.const_value.scale_w])
               for name, layer in layers.items()}
    return TracedModel(traced, records)
