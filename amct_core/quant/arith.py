"""The training side of FORMATS.md section 3: activation factors from a learnable range, fake
quantization with a straight-through rounding, weight scales.

The QAT modules train with these functions and the exporter computes a layer's factors with the same
ones, so the factors a model trains with are bit-for-bit the factors it is exported with. The ranges,
weight and bias quantization and deq_scale are format facts: :mod:`amct_core.formats`. Rounding is
round-half-to-even everywhere (``torch.round`` and ``numpy.round`` both are).
"""
from __future__ import annotations

import torch

from ..formats import INT8_LEVELS, INT8_MAX, INT8_MIN, quantize_weight

# Smallest activation range span we allow; keeps scale_d well above DBL_EPSILON (record rule, §2).
MIN_ACT_SPAN = 1e-6


def round_ste(t: torch.Tensor) -> torch.Tensor:
    """Round half to even in the forward pass, identity gradient (straight-through) in the backward."""
    return t + (torch.round(t) - t).detach()


def act_factors(clip_min: torch.Tensor, clip_max: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric int8 activation factors from a range [lo, hi] (lo <= 0 <= hi is enforced).

    ``scale_d = (hi - lo) / 255`` and ``offset_d = round(-128 - lo / scale_d)``, clipped to int8.
    Differentiable in the range (the offset's rounding is straight-through).
    """
    lo = torch.clamp(clip_min, max=0.0)
    hi = torch.clamp(clip_max, min=0.0)
    span = torch.clamp(hi - lo, min=MIN_ACT_SPAN)
    scale = span / INT8_LEVELS
    offset = torch.clamp(round_ste(INT8_MIN - lo / scale), INT8_MIN, INT8_MAX)
    return scale, offset


def quantize(x: torch.Tensor, inv_scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """``clip(round(x * inv_scale) + offset, -128, 127)``: AscendQuant's definition, as float values."""
    return torch.clamp(round_ste(x * inv_scale) + offset, INT8_MIN, INT8_MAX)


def dequantize(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    return (q - offset) * scale


def weight_scale(w: torch.Tensor, channel_wise: bool) -> torch.Tensor:
    """Symmetric weight scale ``max|w| / 127``, per output channel (axis 0) or per tensor.

    Shape ``[C_out]`` or ``[1]``. An all-zero channel gets scale 1 (its weights quantize to 0 anyway); a
    channel holding a NaN or an infinity keeps a NaN or infinite scale, so the export refuses it.
    """
    w = w.detach()
    if channel_wise:
        amax = w.abs().reshape(w.shape[0], -1).amax(dim=1)
    else:
        amax = w.abs().amax().reshape(1)
    scale = amax / INT8_MAX
    return torch.where(amax == 0, torch.ones_like(scale), scale)


def quantize_weight_ste(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The integer grid of ``w`` (scale broadcast over axis 0), differentiable: straight-through rounding."""
    return quantize_weight(w, scale, axis=0, rounding=round_ste)
