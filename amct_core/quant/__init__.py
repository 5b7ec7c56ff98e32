"""The training arithmetic of FORMATS.md section 3 and the QAT modules (format facts: amct_core.formats)."""
from .arith import act_factors, dequantize, quantize, quantize_weight_ste, weight_scale
from .modules import QUANT_MODULES, QuantConv2d, QuantLinear, is_quant_module

__all__ = [
    "act_factors",
    "dequantize",
    "quantize",
    "quantize_weight_ste",
    "weight_scale",
    "QuantConv2d",
    "QuantLinear",
    "QUANT_MODULES",
    "is_quant_module",
]
