"""The arithmetic of FORMATS.md section 3, shared by training, fake-quant and deploy.

Torch functions are used by the QAT modules and by the exporter, so the factors a model trains with
are bit-for-bit the factors it is exported with. Rounding is round-half-to-even everywhere
(``torch.round`` and ``numpy.round`` both are).
"""
from __future__ import annotations

import numpy as np
import torch

QMIN, QMAX = -128, 127  # int8
LEVELS = QMAX - QMIN  # 2^b - 1
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
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
    scale = span / LEVELS
    offset = torch.clamp(round_ste(QMIN - lo / scale), QMIN, QMAX)
    return scale, offset


def quantize(x: torch.Tensor, inv_scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """``clip(round(x * inv_scale) + offset, -128, 127)``: AscendQuant's definition, as float values."""
    return torch.clamp(round_ste(x * inv_scale) + offset, QMIN, QMAX)


def dequantize(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    return (q - offset) * scale


def weight_scale(w: torch.Tensor, channel_wise: bool) -> torch.Tensor:
    """Symmetric weight scale ``max|w| / 127``, per output channel (axis 0) or per tensor.

    Shape ``[C_out]`` or ``[1]``. An all-zero channel gets scale 1 (its weights quantize to 0 anyway).
    """
    w = w.detach()
    if channel_wise:
        amax = w.abs().reshape(w.shape[0], -1).amax(dim=1)
    else:
        amax = w.abs().amax().reshape(1)
    scale = amax / QMAX
    return torch.where(amax > 0, scale, torch.ones_like(scale))


def quantize_weight(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``clip(round(w / scale_w), -128, 127)`` with ``scale`` broadcast over axis 0 (float values)."""
    s = scale.reshape((-1,) + (1,) * (w.dim() - 1))
    return torch.clamp(round_ste(w / s), QMIN, QMAX)


def deq_scale(scale_d: float, scale_w: np.ndarray) -> np.ndarray:
    """``scale_d * scale_w`` computed in float32, exactly as the deploy model stores it."""
    return (np.float32(scale_d) * np.asarray(scale_w, dtype=np.float32)).astype(np.float32)


def quantize_bias(bias: np.ndarray, deq: np.ndarray) -> np.ndarray:
    """``round(bias / (scale_w * scale_d))`` in float64, returned as float64 integers (may overflow int32;
    the caller checks the range and names the layer)."""
    b = np.asarray(bias, dtype=np.float64)
    d = np.broadcast_to(np.asarray(deq, dtype=np.float64), b.shape)
    return np.round(b / d)


def pack_deq_scale(deq: np.ndarray) -> np.ndarray:
    """uint64 whose low 32 bits are the IEEE-754 float32 pattern of ``deq``; high 32 bits zero."""
    return np.ascontiguousarray(deq, dtype=np.float32).view(np.uint32).astype(np.uint64)
