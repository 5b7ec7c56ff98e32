"""Store each quantized layer's weight and bias as the integers the format prescribes (FORMATS §3-§5).

**Matches** the quantized layers named in the records (:func:`~amct_core.onnx.layers.find_layers`).

**Rewrites**, for the layer's record (``scale_d``, ``scale_w``):

* the weight initializer (same name) becomes its grid ``q_w = clip(round(w / scale_w), -128, 127)``,
  ``scale_w`` along the weight's output-channel axis: stored as float32 (fake-quant model, §4) or int8
  (deploy model, §5). When the weight is a :class:`~amct_core.onnx.weights.QuantizedWeight` with this
  very ``scale_w`` (the record is the model's own), its grid is taken from it; otherwise the stored
  float values are quantized again;
* the bias initializer (same name) becomes ``bias_q = round(bias / (scale_w * scale_d))``, float32 or
  int32; a value outside int32 is a :class:`RecordError` naming the layer (§2).

Tensors are computed when the file is written (``onnx_ir.LazyTensor``), one at a time.
"""
from __future__ import annotations

import warnings

import numpy as np
import onnx_ir as ir
import torch

from ...formats import deq_scale, quantize_bias, quantize_weight
from ...record import LayerRecord
from ..layers import Layer, find_layers
from ..weights import QuantizedWeight


def _torch_view(tensor: ir.TensorProtocol) -> torch.Tensor:
    """The tensor's values as a torch tensor without a copy (a memory-mapped weight is only read)."""
    a = np.ascontiguousarray(tensor.numpy())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(a)


_TORCH_DTYPES = {ir.DataType.FLOAT: torch.float32, ir.DataType.INT8: torch.int8}


def _grid_tensor(weight: ir.TensorProtocol, scale_w: np.ndarray, axis: int, dtype: ir.DataType) -> ir.LazyTensor:
    torch_dtype = _TORCH_DTYPES[dtype]
    if isinstance(weight, QuantizedWeight) and np.array_equal(weight.scale_w.view(np.uint32), scale_w.view(np.uint32)):
        def compute() -> ir.Tensor:  # the record is the model's own: the grid straight from the parameter
            return ir.Tensor(weight.grid(torch_dtype).numpy())
    else:
        def compute() -> ir.Tensor:
            return ir.Tensor(quantize_weight(_torch_view(weight), scale_w, axis).to(torch_dtype).numpy())

    return ir.LazyTensor(compute, dtype=dtype, shape=weight.shape)


class QuantizeWeightsPass(ir.passes.InPlacePass):
    """Weights to their int8 grid, biases to int32 values, stored as ``weight_dtype`` / ``bias_dtype``
    (see the module docstring)."""

    def __init__(self, records: dict[str, LayerRecord], weight_dtype: ir.DataType, bias_dtype: ir.DataType):
        super().__init__()
        self.records = records
        self.weight_dtype = weight_dtype
        self.bias_dtype = bias_dtype

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        for name, layer in find_layers(model.graph, self.records).items():
            self._quantize(layer, self.records[name])
        return ir.passes.PassResult(model, modified=bool(self.records))

    def _quantize(self, layer: Layer, rec: LayerRecord) -> None:
        scale_w = np.asarray(rec.scale_w, dtype=np.float32).reshape(-1)
        w = layer.weight
        w.const_value = _grid_tensor(w.const_value, scale_w, layer.channel_axis, self.weight_dtype)
        w.dtype = self.weight_dtype
        b = layer.bias
        if b is not None:
            bias = np.asarray(b.const_value.numpy(), dtype=np.float32)
            bq = quantize_bias(bias, deq_scale(rec.scale_d, scale_w), layer.name)
            b.const_value = ir.Tensor(bq.astype(self.bias_dtype.numpy()))
            b.dtype = self.bias_dtype
