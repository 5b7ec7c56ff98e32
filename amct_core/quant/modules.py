"""QAT wrappers for Conv2d and Linear.

Each wrapper keeps the wrapped layer's ``weight`` and ``bias`` under the same names (so a float
checkpoint's keys still match) and adds a learnable activation range ``clip_min`` / ``clip_max``
(asymmetric int8, per tensor). Weights are quantized symmetrically: per output channel for Conv2d,
per tensor for Linear. All factors are functions of the parameters: :meth:`quant_factors` needs no
forward pass and reads no state cached by one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..formats import PLACEHOLDER_OP, TRACE_DOMAIN
from . import arith


def _widen(pick, a: float, b: float) -> float:
    """``pick(a, b)``, but a NaN on either side stays NaN (Python's min and max drop it when it comes second),
    so a NaN seen in any calibration batch is not forgotten and the calibration can refuse it."""
    return math.nan if math.isnan(a) or math.isnan(b) else pick(a, b)


def nonfinite_ranges(model: nn.Module) -> list[str]:
    """The quantized layers of ``model`` whose activation range is not finite: ``["fc1 (clip_min = 0.0,
    clip_max = nan)"]``."""
    out = []
    for n, m in model.named_modules():
        if is_quant_module(m):
            lo, hi = float(m.clip_min.detach()), float(m.clip_max.detach())
            if not (math.isfinite(lo) and math.isfinite(hi)):
                out.append(f"{n} (clip_min = {lo}, clip_max = {hi})")
    return out


def describe_nonfinite(t: torch.Tensor) -> str | None:
    """None when every value of ``t`` is finite; else how many are not and where the first is
    (``'2 non-finite values, the first nan at [3, 0, 1, 1]'``, or ``'nan'`` for a scalar)."""
    t = t.detach()
    if not t.is_floating_point():
        return None
    bad = ~torch.isfinite(t)
    if not bool(bad.any()):
        return None
    if t.dim() == 0:
        return f"{float(t)}"
    first = [int(i) for i in torch.nonzero(bad)[0]]
    count = int(bad.sum())
    return f"{count} non-finite value{'s' if count > 1 else ''}, the first {float(t[tuple(first)])} at {first}"


@dataclass
class LayerFactors:
    """What a quantized layer deploys with, derived from its parameters."""

    scale_d: float
    offset_d: int
    scale_w: np.ndarray  # float32 [C_out] or [1]
    bias: np.ndarray | None  # float32 [C_out] (not quantized; the exporter quantizes it)


class _QuantBase(nn.Module):
    channel_wise: bool

    def _init_act_range(self) -> None:
        self.clip_min = nn.Parameter(torch.zeros(()))
        self.clip_max = nn.Parameter(torch.zeros(()))
        self.register_buffer("act_initialized", torch.zeros((), dtype=torch.bool))
        # While True, forward() widens the range to cover what it sees (calibration).
        self.calibrating = False
        # Set by the exporter while tracing: the record key of this layer.
        self._export_name: str | None = None

    # ---- activation range -------------------------------------------------------------------
    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Widen the activation range to include ``x`` (min/max calibration)."""
        lo = float(x.detach().min())
        hi = float(x.detach().max())
        if bool(self.act_initialized):
            lo = _widen(min, lo, float(self.clip_min))
            hi = _widen(max, hi, float(self.clip_max))
        self.clip_min.fill_(_widen(min, lo, 0.0))
        self.clip_max.fill_(_widen(max, hi, 0.0))
        self.act_initialized.fill_(True)

    def act_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return arith.act_factors(self.clip_min, self.clip_max)

    def fake_quant_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating or (self.training and not bool(self.act_initialized)):
            self.observe(x)
        elif not bool(self.act_initialized):
            raise RuntimeError(
                "activation range is not initialised: calibrate the model (distill(), calibrate(), or a "
                "forward pass in train mode) before running it in eval mode or exporting it"
            )
        scale, offset = self.act_factors()
        inv = 1.0 / scale.detach() if not self.training else 1.0 / scale
        q = arith.quantize(x, inv, offset)
        return arith.dequantize(q, scale, offset)

    # ---- weights ----------------------------------------------------------------------------
    def weight_scale(self) -> torch.Tensor:
        return arith.weight_scale(self.weight, self.channel_wise)

    # A dict while distill() runs forwards in which the weights do not change (its checks and the
    # forward that carries the batches past a trained group): the fake-quantized weight is then
    # computed once, not once per batch. Only used without autograd; keyed by the weight tensor and
    # its version counter (bumped by every in-place change, optimizer steps included).
    weight_memo: dict | None = None

    def fake_quant_weight(self) -> torch.Tensor:
        memo = self.weight_memo
        if memo is not None and not torch.is_grad_enabled():
            key = (id(self.weight), self.weight._version)
            if memo.get("key") != key:
                memo["key"], memo["value"] = key, self._fake_quant_weight()
            return memo["value"]
        return self._fake_quant_weight()

    def _fake_quant_weight(self) -> torch.Tensor:
        scale = self.weight_scale()
        q = arith.quantize_weight_ste(self.weight, scale)
        return q * scale.reshape((-1,) + (1,) * (self.weight.dim() - 1))

    @torch.no_grad()
    def nonfinite_parameters(self, scale_w: torch.Tensor | None = None) -> list[str]:
        """What a quantization needs finite and is not: ``'weight: 1 non-finite value, the first nan at
        [3, 0, 1, 1]'``, ``'clip_max = inf'``, ... (empty when all is finite). The weight is scanned only when
        its scale (one max per channel; ``scale_w`` when already computed) is not finite."""
        bad = []
        for name in ("clip_min", "clip_max"):
            d = describe_nonfinite(getattr(self, name))
            if d is not None:
                bad.append(f"{name} = {d} (activation range)")
        if not bool(torch.isfinite(self.weight_scale() if scale_w is None else scale_w).all()):
            bad.append(f"weight: {describe_nonfinite(self.weight)}")
        if self.bias is not None:
            d = describe_nonfinite(self.bias)
            if d is not None:
                bad.append(f"bias: {d}")
        return bad

    @torch.no_grad()
    def quant_factors(self, scale_w: torch.Tensor | None = None) -> LayerFactors:
        """The layer's factors; ``scale_w``: its :meth:`weight_scale` when already computed."""
        if not bool(self.act_initialized):
            raise RuntimeError(
                "activation range is not initialised: calibrate the model (distill(), or one forward "
                "pass in train or eval mode) before exporting"
            )
        scale_d, offset_d = self.act_factors()
        scale_w = self.weight_scale() if scale_w is None else scale_w
        return LayerFactors(
            scale_d=float(scale_d.to(torch.float32)),
            offset_d=int(offset_d),
            scale_w=scale_w.to(torch.float32).cpu().numpy(),
            bias=None if self.bias is None else self.bias.detach().to(torch.float32).cpu().numpy(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D401
        if torch.onnx.is_in_onnx_export() and self._export_name is not None:
            # Every tensor the forward reads is passed explicitly: the tracer must know them as inputs.
            state = [t for t in (*self.parameters(recurse=False), *self.buffers(recurse=False)) if t is not None]
            return _TraceQuantLayer.apply(x, self._trace_forward, self._export_name, self._kind(x), *state)
        return self._eval_forward(x)

    def _eval_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _trace_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The output the tracer sees: the float layer on the unquantized input.

        Only the shape and dtype reach the exported graph; the values matter only to Python control
        flow in forward(), for which they are close to the real ones. Skipping fake quantization
        here makes the trace cost what a float trace costs.
        """
        raise NotImplementedError

    def _kind(self, x: torch.Tensor) -> str:
        raise NotImplementedError


class QuantConv2d(_QuantBase):
    """Conv2d with int8 fake quantization of its input (asymmetric) and weight (per channel)."""

    channel_wise = True

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if conv.padding_mode != "zeros":
            raise ValueError(f"padding_mode {conv.padding_mode!r} is not supported (only 'zeros')")
        if isinstance(conv.padding, str):
            raise ValueError(f"string padding {conv.padding!r} is not supported; give explicit ints")
        self.in_channels = conv.in_channels
        self.out_channels = conv.out_channels
        self.kernel_size = tuple(conv.kernel_size)
        self.stride = tuple(conv.stride)
        self.padding = tuple(conv.padding)
        self.dilation = tuple(conv.dilation)
        self.groups = conv.groups
        self.weight = conv.weight
        self.bias = conv.bias
        self._init_act_range()

    def _eval_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(
            self.fake_quant_input(x), self.fake_quant_weight(), self.bias,
            self.stride, self.padding, self.dilation, self.groups,
        )

    def _trace_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def _kind(self, x: torch.Tensor) -> str:
        return "conv"

    def out_sizes(self, sizes: list) -> list:
        """Output sizes for input sizes (None where unknown), for the tracer's type information."""
        out = [sizes[0], self.out_channels]
        for i, n in enumerate(sizes[2:]):
            if n is None:
                out.append(None)
            else:
                k = self.dilation[i] * (self.kernel_size[i] - 1) + 1
                out.append((n + 2 * self.padding[i] - k) // self.stride[i] + 1)
        return out

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"groups={self.groups}, bias={self.bias is not None}")


class QuantLinear(_QuantBase):
    """Linear with int8 fake quantization of its input (asymmetric) and weight (per tensor)."""

    channel_wise = False

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self._init_act_range()

    def _eval_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.fake_quant_input(x), self.fake_quant_weight(), self.bias)

    def _trace_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def _kind(self, x: torch.Tensor) -> str:
        return "gemm" if x.dim() == 2 else "matmul"

    def out_sizes(self, sizes: list) -> list:
        return list(sizes[:-1]) + [self.out_features]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


QUANT_MODULES = (QuantConv2d, QuantLinear)


def is_quant_module(m: nn.Module) -> bool:
    return isinstance(m, QUANT_MODULES)


class _TraceQuantLayer(torch.autograd.Function):
    """Stands in for a quantized layer while tracing to ONNX.

    Forward computes the layer's real (fake-quantized) output so the rest of the trace sees true
    values; the ONNX symbolic emits one placeholder node ``amct_trace::QuantLayer`` that carries only
    the data input and the layer's name. The exporter's passes replace it with the real ops and the
    weights the record says; the layer's float weights are therefore never serialized by the tracer.
    """

    @staticmethod
    def forward(ctx, x, fn, name, kind, *state):  # noqa: D401
        return fn(x)

    @staticmethod
    def symbolic(g, x, fn, name, kind, *state):
        y = g.op(f"{TRACE_DOMAIN}::{PLACEHOLDER_OP}", x, layer_s=name, kind_s=kind)
        xt = x.type()
        sizes = xt.varyingSizes()
        if sizes is not None:
            y.setType(xt.with_sizes(fn.__self__.out_sizes(list(sizes))))
        return y
