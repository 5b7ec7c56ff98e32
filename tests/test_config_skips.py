"""create_distill_config names every layer it does not quantize and says why."""
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from amct_core import create_distill_config, create_distill_model


class Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(4, 4)
        self.tied = nn.Linear(4, 4)
        self.tied.weight = self.emb.weight  # shared weight
        self.reflect = nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect")
        self.twice = nn.Linear(4, 4)
        self.unused = nn.Linear(4, 4)
        self.ok = nn.Linear(4, 2)

    def forward(self, x):
        img = self.reflect(x.reshape(-1, 1, 2, 2)).reshape(-1, 4)
        h = self.twice(F.relu(self.twice(self.emb(x) + self.tied(x) + img)))
        return self.ok(h)


@pytest.fixture
def cfg(tmp_path):
    path = tmp_path / "c.json"
    create_distill_config(path, Odd(), torch.randn(3, 4))
    return json.loads(path.read_text()), path


def test_only_safe_layers_are_enabled(cfg):
    c, _ = cfg
    assert [k for k, v in c.items() if isinstance(v, dict) and v.get("quant_enable")] == ["ok"]


@pytest.mark.parametrize("layer,reason", [
    ("emb", "weight shared"), ("tied", "weight shared"), ("reflect", "padding_mode 'reflect'"),
    ("twice", "called 2 times"), ("unused", "not called by forward"),
])
def test_skipped_layers_say_why(cfg, layer, reason):
    c, _ = cfg
    assert c[layer]["quant_enable"] is False
    assert reason in c[layer]["skip_reason"]


def test_model_with_skips_still_wraps_and_runs(cfg):
    _, path = cfg
    student = create_distill_model(path, Odd(), torch.randn(3, 4))
    assert type(student.ok).__name__ == "QuantLinear" and type(student.twice) is nn.Linear
    assert student(torch.randn(5, 4)).shape == (5, 2)


class Aliased(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.second = self.first  # one module under two names
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.first(x))


def test_a_module_reachable_under_two_names_is_skipped_naming_the_other(tmp_path):
    path = tmp_path / "c.json"
    create_distill_config(path, Aliased(), torch.randn(3, 4))
    c = json.loads(path.read_text())
    assert c["first"] == {"quant_enable": False, "skip_reason": "module reused under several names: ['second']"}
