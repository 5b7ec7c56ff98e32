"""Quantization arithmetic (FORMATS.md section 3) and the QAT modules."""
from .arith import (
    act_factors,
    dequantize,
    quantize,
    weight_scale,
    quantize_weight,
    quantize_bias,
    pack_deq_scale,
    INT32_MIN,
    INT32_MAX,
)
from .modules import QuantConv2d, QuantLinear, QUANT_MODULES, is_quant_module

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
