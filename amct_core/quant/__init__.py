"""Quantization arithmetic (FORMATS.md section 3) and the QAT modules."""
from .arith import (
    INT32_MAX,
    INT32_MIN,
    act_factors,
    dequantize,
    pack_deq_scale,
    quantize,
    quantize_bias,
    quantize_weight,
    weight_scale,
)
from .modules import QUANT_MODULES, QuantConv2d, QuantLinear, is_quant_module

__all__ = [
    "act_factors",
    "dequantize",
    "quantize",
    "weight_scale",
    "quantize_weight",
    "quantize_bias",
    "pack_deq_scale",
    "INT32_MIN",
    "INT32_MAX",
    "QuantConv2d",
    "QuantLinear",
    "QUANT_MODULES",
    "is_quant_module",
]
