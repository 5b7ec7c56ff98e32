"""The weight of a quantized layer in the traced graph: float values that are exactly ``q_w * scale_w``.

The tracer's placeholder carries no weight; lowering it (:mod:`.passes.lower_quant_layers`) gives the
layer a :class:`QuantizedWeight`: an ``onnx_ir`` lazy tensor whose values are the dequantized weight
``q_w * scale_w`` (exactly representable, so quantizing them again with the same ``scale_w`` gives
``q_w`` back), computed only when a file is written, and which also gives its integer grid ``q_w``
directly (:meth:`QuantizedWeight.grid`), computed from the module's parameter, for the weight
quantization of the builders (:mod:`.passes.quantize_weights`).
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
import torch

from ..formats import quantize_weight


class QuantizedWeight(ir.LazyTensor):
    """A float32 weight ``q_w * scale_w`` with ``q_w = clip(round(w / grid_scale), -128, 127)``.

    ``weight``: the module's float weight ``w`` (output channels on axis 0), never modified;
    ``grid_scale``: the scale ``q_w`` is computed with (the module's own ``scale_w``; a folded
    BatchNorm gives it the sign of its ``k``, see :meth:`folded`); ``scale_w``: the exported scale (1
    value or 1 per output channel). The tensor is stored in the module's layout, or transposed
    (``transposed``: a Linear's ``[in, out]``, FORMATS §5).
    """

    __slots__ = ("grid_scale", "scale_w", "transposed", "weight")

    def __init__(self, weight: torch.Tensor, grid_scale, scale_w=None, transposed: bool = False):
        shape = tuple(weight.shape)[::-1] if transposed else tuple(weight.shape)
        super().__init__(self._dequantized, dtype=ir.DataType.FLOAT, shape=ir.Shape(shape))
        self.weight = weight
        self.grid_scale = np.asarray(grid_scale, dtype=np.float32).reshape(-1)
        self.scale_w = self.grid_scale if scale_w is None else np.asarray(scale_w, dtype=np.float32).reshape(-1)
        self.transposed = transposed

    @property
    def axis(self) -> int:
        """The output-channel axis of the stored tensor."""
        return 1 if self.transposed else 0

    def grid(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``q_w`` in the stored layout, computed now (a new tensor), as ``dtype``."""
        with torch.no_grad():
            q = quantize_weight(self.weight.detach(), self.grid_scale, axis=0)
        if dtype != q.dtype:
            q = q.to(dtype)  # before the transposition: an int8 copy is a quarter of a float32 one
        return q.t().contiguous() if self.transposed else q

    def folded(self, k) -> QuantizedWeight:
        """This weight times ``k`` per output channel (a BatchNorm folded in, FORMATS §3): ``scale_w * |k|``,
        and the grid ``round(w * k / (scale_w * |k|)) = round(w / (scale_w * sign(k)))``: the module's grid
        with the sign of ``k``."""
        k = np.asarray(k, dtype=np.float32)
        sign = np.where(k < 0, np.float32(-1), np.float32(1))
        return QuantizedWeight(self.weight, self.grid_scale * sign, (self.scale_w * np.abs(k)).astype(np.float32),
                               self.transposed)

    def _dequantized(self) -> ir.Tensor:
        q = self.grid()
        s = torch.from_numpy(self.scale_w)
        if s.numel() > 1:
            shape = [1] * q.dim()
            shape[self.axis] = -1
            s = s.reshape(shape)
        return ir.Tensor(q.mul_(s).numpy())
