"""The conformance zoo: common architectures written out by hand (no torchvision), narrow and with
tiny inputs, because the structure is what the exporter must get right, not the size.

Each entry of :data:`ZOO` says how to build the float model, how to make its inputs, the names of
its inputs and outputs (every one with a dynamic batch axis), and what the distill config must skip.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


def randomize_bns(model: nn.Module, seed: int) -> nn.Module:
    """Give every BatchNorm trained-looking statistics and affine parameters (some negative gammas)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) * 0.5 + 0.75)
                m.weight.copy_(torch.randn(c, generator=g).sign() * (torch.rand(c, generator=g) * 0.5 + 0.75))
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)
    return model


# ---------------------------------------------------------------------------------------------
# ResNet-18 and ResNet-50
# ---------------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    """torchvision's layout: one ``nn.ReLU`` module called twice, downsample after the main branch."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.relu(self.b1(self.c1(x)))
        y = self.b2(self.c2(y))
        return self.relu(y + (x if self.down is None else self.down(x)))


class Bottleneck(nn.Module):
    """The ResNet-50 bottleneck, written the way many hand-written ResNets are: the downsample
    branch runs *first* (so it reads the block input before ``c1`` does, against module order), and
    one ``nn.ReLU`` module is called three times."""

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = width * 4
        self.c1 = nn.Conv2d(cin, width, 1, bias=False)
        self.b1 = nn.BatchNorm2d(width)
        self.c2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(width)
        self.c3 = nn.Conv2d(width, cout, 1, bias=False)
        self.b3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.down is None else self.down(x)
        y = self.relu(self.b1(self.c1(x)))
        y = self.relu(self.b2(self.c2(y)))
        return self.relu(self.b3(self.c3(y)) + identity)


class ResNet(nn.Module):
    """ResNet stem (7x7/2 conv, BN, ReLU, 3x3/2 max pool), four stages, average pool, Linear."""

    def __init__(self, block: str, blocks: tuple[int, ...], widths: tuple[int, ...], classes: int = 10):
        super().__init__()
        stem = widths[0]
        self.conv1 = nn.Conv2d(3, stem, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        cin, stages = stem, []
        for i, (n, w) in enumerate(zip(blocks, widths)):
            stage = []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                if block == "basic":
                    stage.append(BasicBlock(cin, w, stride))
                    cin = w
                else:
                    stage.append(Bottleneck(cin, w, stride))
                    cin = w * 4
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet18() -> nn.Module:
    """ResNet-18's structure (2-2-2-2 basic blocks) at widths 8-64; BatchNorms as constructed (equal
    statistics: torch's exporter deduplicates them into Identity nodes)."""
    return ResNet("basic", (2, 2, 2, 2), (8, 16, 32, 64))


def resnet50() -> nn.Module:
    """ResNet-50's structure (3-4-6-3 bottlenecks, 53 convs) at widths 4-32 (outputs 16-128)."""
    return randomize_bns(ResNet("bottleneck", (3, 4, 6, 3), (4, 8, 16, 32)), seed=50)


# ---------------------------------------------------------------------------------------------
# the zoo
# ---------------------------------------------------------------------------------------------
def _images(shape):
    def make(batch: int, seed: int) -> tuple[torch.Tensor, ...]:
        return (torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed)),)
    return make


@dataclass(frozen=True)
class ZooModel:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int, int], tuple[torch.Tensor, ...]]  # (batch, seed) -> model inputs
    input_names: tuple[str, ...] = ("input",)
    output_names: tuple[str, ...] = ("output",)
    skipped: dict[str, str] = field(default_factory=dict)  # layer -> part of its skip reason

    def float_model(self) -> nn.Module:
        torch.manual_seed(0)
        return self.build().eval()

    @property
    def dynamic_axes(self) -> dict:
        return {n: {0: "batch"} for n in self.input_names + self.output_names}


ZOO: dict[str, ZooModel] = {m.name: m for m in (
    ZooModel("resnet18", resnet18, _images((3, 32, 32))),
    ZooModel("resnet50", resnet50, _images((3, 32, 32))),
)}
