"""distill()'s cost linear in depth (issue 12): each batch's teacher and student forwards run once,
paused at the group boundaries; groups train on what the paused student forward holds. The exact slow
path (every step runs the model from its input) is what ``cache_bytes=0`` runs, and what batches
beyond the budget and groups that are not a chain of modules run; the fast path must give exactly
the same model."""
from __future__ import annotations

import contextvars
import copy
import json
import logging
import threading

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import amct_core
from amct_core.distill import DistillError
from bench.models import token_batches, transformer_teacher

from .test_distill import cnn_data, make_student, state
from .zoo_models import ZOO

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class ResBlock(nn.Module):
    def __init__(self, c: int, down: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.down = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)) if down else None

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        skip = x if self.down is None else self.down(x)
        return F.relu(self.bn2(self.conv2(y)) + skip)


class ResNet(nn.Module):
    """Residual blocks (the live set at a boundary is two tensors), a projection shortcut, functional
    activations and pooling, a classifier."""

    def __init__(self, depth: int = 3, c: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(1, c, 3, padding=1)
        self.blocks = nn.Sequential(*(ResBlock(c, down=(i == 1)) for i in range(depth)))
        self.fc = nn.Linear(c, 5)

    def forward(self, x):
        x = self.blocks(F.relu(self.stem(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def resnet_teacher(depth: int = 3) -> nn.Module:
    torch.manual_seed(0)
    m = ResNet(depth)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.1)
                bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
    return m.eval()


def both_paths(teacher, student, cfg, data, **kw):
    """(fast-path result, slow-path result): fresh copies of ``student`` distilled with the default cache
    and with ``cache_bytes=0``."""
    fast = amct_core.distill(teacher, copy.deepcopy(student), cfg, data, **kw)
    slow = amct_core.distill(teacher, copy.deepcopy(student), cfg, data, cache_bytes=0, **kw)
    return fast, slow


def assert_same_model(a: nn.Module, b: nn.Module) -> None:
    sa, sb = state(a), state(b)
    differ = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not differ, differ
    assert a.amct_distill_report == b.amct_distill_report


def distill_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("amct-distill")]


# ---- the fast path computes exactly what the slow path computes ------------------------------------


def test_residual_net_distilled_through_the_cache_equals_the_exact_slow_path(tmp_path):
    teacher = resnet_teacher()
    data = cnn_data(n=5, batch=4)
    cfg, student = make_student(tmp_path, teacher, data[0][0])
    fast, slow = both_paths(teacher, student, cfg, data, epochs=2, lr=1e-3)
    assert fast.amct_distill_cache["cached_batches"] == 5 and fast.amct_distill_cache["slow_groups"] == []
    assert slow.amct_distill_cache["cached_batches"] == 0
    assert any(r["kept"] == "distilled" for r in fast.amct_distill_report)
    assert_same_model(fast, slow)
    assert distill_threads() == []


def test_transformer_block_distilled_through_the_cache_equals_the_exact_slow_path(tmp_path):
    teacher = transformer_teacher()
    data = token_batches(6, seed=1, batch=4)
    cfg, student = make_student(tmp_path, teacher, data[0])
    fast, slow = both_paths(teacher, student, cfg, data, epochs=2, lr=1e-3)
    assert fast.amct_distill_cache["slow_groups"] == []
    assert_same_model(fast, slow)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_every_zoo_architecture_distilled_through_the_cache_equals_the_exact_slow_path(tmp_path, name):
    z = ZOO[name]
    teacher = z.float_model()
    cfg, student = make_student(tmp_path, teacher, z.inputs(2, 0))
    fast, slow = both_paths(teacher, student, cfg, [z.inputs(4, seed) for seed in range(1, 4)], epochs=1, lr=1e-3)
    assert fast.amct_distill_cache["cached_batches"] == 3 and fast.amct_distill_cache["slow_groups"] == []
    assert_same_model(fast, slow)


def test_upstream_layers_run_once_per_batch_not_once_per_group(tmp_path):
    teacher = resnet_teacher(depth=4)
    data = cnn_data(n=5, batch=4)
    cfg, student = make_student(tmp_path, teacher, data[0][0])
    calls = {"student": 0, "teacher": 0}
    student.stem.register_forward_hook(lambda *a: calls.__setitem__("student", calls["student"] + 1))
    teacher.stem.register_forward_hook(lambda *a: calls.__setitem__("teacher", calls["teacher"] + 1))
    epochs, n, n_check = 2, len(data), 4
    amct_core.distill(teacher, student, cfg, data, epochs=epochs)
    # the stem's own group: checks before and after, training; then once per batch to carry each batch
    # through the network, plus the one calibration batch; nothing for the 10 groups after it
    assert calls["student"] == 1 + 2 * n_check + epochs * n + n
    assert calls["teacher"] == n  # one teacher forward per batch in all


# ---- where the fast path cannot be taken, the slow path is, and says so ------------------------------


def test_group_with_functional_code_between_its_modules_takes_the_slow_path_and_says_so(tmp_path, caplog):
    teacher = resnet_teacher(depth=2)
    data = cnn_data(n=3, batch=4)
    cfg, student = make_student(tmp_path, teacher, data[0][0])
    c = json.loads(open(cfg).read())
    # conv1 -> bn1 -> F.relu -> conv2 -> bn2: F.relu between the group's modules
    c["distill_group"] = [g for g in c["distill_group"] if not g[0].startswith("blocks.0.conv")]
    c["distill_group"].insert(1, ["blocks.0.conv1", "blocks.0.bn1", "blocks.0.conv2", "blocks.0.bn2"])
    open(cfg, "w").write(json.dumps(c))
    with caplog.at_level(logging.INFO, logger="amct_core.distill"):
        fast, slow = both_paths(teacher, student, cfg, data, epochs=1, lr=1e-3)
    msgs = [r.getMessage() for r in caplog.records if "exact slow path" in r.getMessage()]
    assert any("['blocks.0.conv1', 'blocks.0.bn1', 'blocks.0.conv2', 'blocks.0.bn2']" in m
               and "'blocks.0.conv2' is not fed by the group's earlier modules alone" in m for m in msgs), msgs
    assert fast.amct_distill_cache["slow_groups"] == [["blocks.0.conv1", "blocks.0.bn1", "blocks.0.conv2",
                                                       "blocks.0.bn2"]]
    assert_same_model(fast, slow)


class Swapping(nn.Module):
    """Calls its two convolutions in an order that depends on the data."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3, padding=1)
        self.b = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        if float(x.mean()) < 0.5:
            ya, yb = self.a(x), self.b(x)
        else:
            yb = self.b(x)
            ya = self.a(x)
        return self.fc(torch.cat([ya, yb], 1).mean((2, 3)))


def test_batch_whose_modules_run_in_another_order_falls_back_to_the_slow_path(tmp_path, caplog):
    torch.manual_seed(0)
    teacher = Swapping().eval()
    g = torch.Generator().manual_seed(0)
    data = [torch.rand(4, 1, 6, 6, generator=g) * (0.9 if i == 0 else 1.0) + (0.0 if i < 2 else 0.5)
            for i in range(4)]
    assert [float(x.mean()) < 0.5 for x in data] == [True, True, False, False]
    cfg, student = make_student(tmp_path, teacher, data[0])
    with caplog.at_level(logging.INFO, logger="amct_core.distill"):
        fast, slow = both_paths(teacher, student, cfg, data, epochs=1, lr=1e-3)
    msgs = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("batch 2: 'b', of a group after ['a'], was called before 'a'") for m in msgs), msgs
    assert_same_model(fast, slow)


class Rewired(nn.Module):
    """Scales the convolution's output before the BN only for some inputs: the group [conv, bn] is
    a chain on those batches and not on the others."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = self.conv(x)
        if float(x.mean()) >= 0.5:
            y = y * 2
        return self.fc(self.bn(y).mean((2, 3)))


def test_batch_on_which_a_group_is_wired_differently_trains_that_group_through_the_slow_path(tmp_path, caplog):
    torch.manual_seed(0)
    teacher = Rewired().eval()
    g = torch.Generator().manual_seed(0)
    data = [torch.rand(4, 1, 6, 6, generator=g) * 0.9 + (0.0 if i < 2 else 0.5) for i in range(4)]
    assert [float(x.mean()) >= 0.5 for x in data] == [False, False, True, True]
    cfg, student = make_student(tmp_path, teacher, data[0])
    assert json.loads(open(cfg).read())["distill_group"][0] == ["conv", "bn"]
    with caplog.at_level(logging.INFO, logger="amct_core.distill"):
        fast, slow = both_paths(teacher, student, cfg, data, epochs=2, lr=1e-3)
    msgs = [r.getMessage() for r in caplog.records]
    for i in (2, 3):
        want = (f"batch {i}: the modules of group ['conv', 'bn'] are wired differently from the first batch ('bn' "
                "is not fed by the group's earlier modules alone")
        assert any(m.startswith(want) for m in msgs), msgs
    assert_same_model(fast, slow)


def test_memory_budget_caches_what_fits_and_runs_the_other_batches_from_the_input(tmp_path):
    teacher = resnet_teacher()
    data = cnn_data(n=7, batch=4)
    cfg, student = make_student(tmp_path, teacher, data[0][0])
    per_batch = amct_core.distill(teacher, copy.deepcopy(student), cfg, data).amct_distill_cache["bytes_per_batch"]
    # the first batch also holds the teacher's outputs of every group: about two batches in all
    budget = int(3.5 * per_batch)
    fast = amct_core.distill(teacher, copy.deepcopy(student), cfg, data, epochs=2, cache_bytes=budget)
    figures = fast.amct_distill_cache
    assert 0 < figures["cached_batches"] < 4 and figures["budget_bytes"] == budget
    # the check batches (the first 4) are held as inputs; the others are read again from the loader
    assert figures["cached_batches"] + figures["held_batches"] == 4 and figures["streamed"]
    slow = amct_core.distill(teacher, copy.deepcopy(student), cfg, data, epochs=2, cache_bytes=0)
    assert_same_model(fast, slow)


def test_replayed_layer_sees_its_input_as_the_forward_gave_it_despite_a_user_pre_hook(tmp_path):
    teacher = resnet_teacher(depth=2)
    data = cnn_data(n=3, batch=4)
    cfg, student = make_student(tmp_path, teacher, data[0][0])
    teacher.blocks[1].conv1.register_forward_pre_hook(lambda m, a: (a[0] * 0.5,))
    student.blocks[1].conv1.register_forward_pre_hook(lambda m, a: (a[0] * 0.5,))
    fast, slow = both_paths(teacher, student, cfg, data, epochs=1, lr=1e-3)
    assert_same_model(fast, slow)


# ---- errors and clean-up ------------------------------------------------------------------------------


class FailsOnWideBatches(ResNet):
    def forward(self, x):
        if x.shape[0] > 4:
            raise ValueError("batch too wide")
        return super().forward(x)


def test_forward_error_in_a_later_batch_names_the_batch_and_leaves_no_thread(tmp_path):
    torch.manual_seed(0)
    teacher = FailsOnWideBatches().eval()
    data = cnn_data(n=3, batch=4) + [(torch.rand(6, 1, 8, 8), torch.zeros(6, dtype=torch.long))]
    cfg, student = make_student(tmp_path, teacher, data[0][0])
    with pytest.raises(DistillError, match="forward failed on batch 3: batch too wide"):
        amct_core.distill(teacher, student, cfg, data)
    assert distill_threads() == []


def test_non_finite_loss_mid_run_stops_the_paused_forwards(tmp_path):
    teacher = resnet_teacher()
    data = cnn_data(n=3, batch=4)
    cfg, student = make_student(tmp_path, teacher, data[0][0])
    seen = []

    def loss(s, t):
        seen.append(1)
        return F.mse_loss(s, t) * (float("nan") if len(seen) > 20 else 1.0)

    with pytest.raises(DistillError, match="loss is nan"):
        amct_core.distill(teacher, student, cfg, data, loss=loss)
    assert distill_threads() == []


@pytest.mark.parametrize("value", [-1, 1.5, True, "1G"])
def test_cache_bytes_must_be_a_byte_count(tmp_path, value):
    teacher = resnet_teacher(depth=1)
    data = cnn_data(n=2)
    cfg, student = make_student(tmp_path, teacher, data[0][0])
    with pytest.raises(DistillError, match=r"cache_bytes must be None .* or a number of bytes >= 0"):
        amct_core.distill(teacher, student, cfg, data, cache_bytes=value)


def test_each_group_reports_its_time_and_the_eta(tmp_path, caplog):
    teacher = resnet_teacher(depth=1)
    data = cnn_data(n=2)
    cfg, student = make_student(tmp_path, teacher, data[0][0])
    with caplog.at_level(logging.INFO, logger="amct_core.distill"):
        amct_core.distill(teacher, student, cfg, data)
    lines = [r.getMessage() for r in caplog.records if "block loss" in r.getMessage()]
    n = len(student.amct_distill_report)
    assert len(lines) == n
    assert f"1/{n} groups in " in lines[0] and ", ETA " in lines[0]
    assert lines[-1].endswith(", ETA 0 s)")
    assert any(m.startswith("cache: 2 of 2 batch(es) paused at the group boundaries")
               for m in (r.getMessage() for r in caplog.records))


class RecordsAutocast(ResNet):
    """Notes whether its forward runs under CPU autocast."""

    def __init__(self):
        super().__init__()
        self.seen: list[bool] = []

    def forward(self, x):
        self.seen.append(torch.is_autocast_enabled("cpu"))
        return super().forward(x)


def test_paused_forwards_run_under_the_callers_autocast(tmp_path):
    torch.manual_seed(0)
    teacher = RecordsAutocast().eval()
    data = cnn_data(n=2, batch=4)
    cfg, student = make_student(tmp_path, teacher, data[0][0])
    teacher.seen, student.seen = [], []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amct_core.distill(teacher, student, cfg, data)
    assert teacher.seen and all(teacher.seen) and student.seen and all(student.seen)


SCALE = contextvars.ContextVar("scale", default=1.0)


class ScaledByContext(ResNet):
    """Reads a context variable in its forward."""

    def forward(self, x):
        return super().forward(x * SCALE.get())


def test_paused_forwards_see_the_callers_context_variables(tmp_path):
    torch.manual_seed(0)
    teacher = ScaledByContext().eval()
    data = cnn_data(n=3, batch=4)
    cfg, student = make_student(tmp_path, teacher, data[0][0])
    token = SCALE.set(0.25)
    try:
        fast, slow = both_paths(teacher, student, cfg, data, epochs=1, lr=1e-3)
    finally:
        SCALE.reset(token)
    assert_same_model(fast, slow)
