"""The training arithmetic of FORMATS §3 and the QAT modules (format facts: tests/test_formats.py)."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from amct_core.quant import arith
from amct_core.quant.modules import QuantConv2d, QuantLinear


def test_quantize_rounds_half_to_even_and_clips():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 1000.0, -1000.0])
    q = arith.quantize(x, torch.tensor(1.0), torch.tensor(0.0))
    assert q.tolist() == [0.0, 2.0, 2.0, -0.0, -2.0, 127.0, -128.0]


def test_relu_range_gives_offset_minus_128():
    scale, offset = arith.act_factors(torch.tensor(0.0), torch.tensor(2.55))
    assert offset.item() == -128
    assert scale.item() == pytest.approx(0.01, rel=1e-6)


def test_asymmetric_range_offset_formula():
    lo, hi = -1.0, 3.0
    scale, offset = arith.act_factors(torch.tensor(lo), torch.tensor(hi))
    assert scale.item() == pytest.approx(4.0 / 255, rel=1e-6)
    assert offset.item() == round(-128 - lo / (4.0 / 255))


def test_range_is_widened_to_include_zero():
    scale, offset = arith.act_factors(torch.tensor(0.5), torch.tensor(2.0))
    assert scale.item() == pytest.approx(2.0 / 255, rel=1e-6)
    assert offset.item() == -128


def test_weight_scale_per_channel_and_per_tensor():
    w = torch.tensor([[1.0, -2.0], [0.5, 0.25], [0.0, 0.0]])
    assert arith.weight_scale(w, True).tolist() == pytest.approx([2 / 127, 0.5 / 127, 1.0])
    assert arith.weight_scale(w, False).tolist() == pytest.approx([2 / 127])


def test_weight_scale_keeps_a_nan_or_infinite_channel_non_finite():
    w = torch.tensor([[1.0, float("nan")], [0.5, 0.25], [float("inf"), 0.0], [0.0, 0.0]])
    scale = arith.weight_scale(w, True)
    assert math.isnan(scale[0]) and scale[2] == float("inf")  # not 1, which would hide them
    assert scale[1].item() == pytest.approx(0.5 / 127) and scale[3].item() == 1.0


def test_calibration_keeps_a_nan_seen_in_an_earlier_batch():
    m = QuantLinear(nn.Linear(2, 2))
    m.observe(torch.tensor([[float("nan"), 1.0]]))
    m.observe(torch.tensor([[0.5, 2.0]]))  # Python's max(2.0, nan) would give 2.0
    assert math.isnan(float(m.clip_max.detach())) and math.isnan(float(m.clip_min.detach()))


def test_qat_conv_factors_come_from_parameters_not_last_forward():
    m = QuantConv2d(nn.Conv2d(2, 3, 3))
    m(torch.randn(1, 2, 5, 5))  # initialises the range
    with torch.no_grad():
        m.clip_min.fill_(-1.0)
        m.clip_max.fill_(2.0)
    f = m.quant_factors()
    scale = np.float32(3.0) / np.float32(255)
    assert f.scale_d == scale
    assert f.offset_d == int(np.round(np.float32(-128) - np.float32(-1.0) / scale))


def test_qat_linear_gradients_reach_weight_and_range():
    m = QuantLinear(nn.Linear(4, 3))
    x = torch.randn(8, 4)
    m(x)
    m.train()
    m(x).pow(2).sum().backward()
    assert m.weight.grad is not None and m.weight.grad.abs().sum() > 0
    assert m.clip_max.grad is not None and m.clip_min.grad is not None


def test_quant_factors_refuse_an_uncalibrated_layer():
    m = QuantLinear(nn.Linear(4, 3))
    with pytest.raises(RuntimeError, match="not initialised"):
        m.quant_factors()


def test_qat_conv_refuses_reflect_padding():
    with pytest.raises(ValueError, match="padding_mode"):
        QuantConv2d(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"))


def test_weight_memo_follows_in_place_changes_of_the_weight():
    conv = QuantConv2d(nn.Conv2d(2, 3, 3))
    conv.weight_memo = {}
    with torch.no_grad():
        first = conv.fake_quant_weight()
        assert conv.fake_quant_weight() is first  # computed once while the weight is unchanged
        conv.weight.mul_(2.0)
        second = conv.fake_quant_weight()
    assert torch.equal(second, conv._fake_quant_weight()) and not torch.equal(second, first)
    assert conv.fake_quant_weight().requires_grad  # with autograd on, no memo: a fresh graph
