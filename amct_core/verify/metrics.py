"""Agreement figures between a reference tensor and a tensor under test (computed in float64)."""
from __future__ import annotations

import math

import numpy as np

SQNR_EXACT_DB = 300.0  # reported when the error is exactly zero (JSON has no infinity)


def _f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def max_abs_error(ref, test) -> float:
    r, t = _f64(ref), _f64(test)
    return float(np.max(np.abs(r - t))) if r.size else 0.0


def cosine(ref, test) -> float:
    """Cosine similarity of the flattened tensors; 1.0 when both are all zeros, 0.0 when only one is."""
    r, t = _f64(ref).ravel(), _f64(test).ravel()
    nr, nt = float(np.linalg.norm(r)), float(np.linalg.norm(t))
    if nr == 0.0 and nt == 0.0:
        return 1.0
    if nr == 0.0 or nt == 0.0:
        return 0.0
    return float(np.clip(np.dot(r, t) / (nr * nt), -1.0, 1.0))


def sqnr_db(ref, test) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(sum ref^2 / sum (ref - test)^2)`` in dB.
    ``SQNR_EXACT_DB`` when the two are equal; -inf is clipped to -300."""
    r, t = _f64(ref), _f64(test)
    noise = float(np.sum((r - t) ** 2))
    signal = float(np.sum(r ** 2))
    if noise == 0.0:
        return SQNR_EXACT_DB
    if signal == 0.0:
        return -SQNR_EXACT_DB
    return float(max(min(10.0 * math.log10(signal / noise), SQNR_EXACT_DB), -SQNR_EXACT_DB))


def default_argmax_axis(ndim: int) -> int | None:
    """Axis 1 for [N, C] and [N, C, H, W] (classes / channels), the last axis for [N, T, D]; None for rank < 2."""
    if ndim < 2:
        return None
    if ndim == 3:
        return 2
    return 1


def argmax_agreement(ref, test, axis: int | None = None) -> float | None:
    """Fraction of positions where the arg-max over ``axis`` agrees (None for scalars / 1-D)."""
    r, t = _f64(ref), _f64(test)
    ax = default_argmax_axis(r.ndim) if axis is None else axis
    if ax is None or r.size == 0:
        return None
    return float(np.mean(np.argmax(r, axis=ax) == np.argmax(t, axis=ax)))


def max_error_steps(ref, test, step, channel_axis: int) -> float | None:
    """Max |ref - test| in units of ``step`` (one per channel along ``channel_axis``, or one value)."""
    if step is None:
        return None
    r, t = _f64(ref), _f64(test)
    s = _f64(step).ravel()
    if s.size > 1:
        if r.ndim == 0 or r.shape[channel_axis] != s.size:
            return None
        shape = [1] * r.ndim
        shape[channel_axis] = s.size
        s = s.reshape(shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.abs(r - t) / s
    return float(np.max(q)) if q.size else 0.0


def tensor_figures(ref, test, step=None, channel_axis: int = 1, argmax_axis: int | None = None) -> dict:
    return {
        "max_abs_error": max_abs_error(ref, test),
        "max_error_steps": max_error_steps(ref, test, step, channel_axis),
        "cosine": cosine(ref, test),
        "sqnr_db": sqnr_db(ref, test),
        "argmax_agreement": argmax_agreement(ref, test, argmax_axis),
        "ref_max_abs": float(np.max(np.abs(_f64(ref)))) if np.size(ref) else 0.0,
        "shape": list(np.shape(ref)),
    }
