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

from tests.models import EncoderBlock


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
        for i, (n, w) in enumerate(zip(blocks, widths, strict=True)):
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
# MobileNetV2 and an EfficientNet-style net
# ---------------------------------------------------------------------------------------------
class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand, 3x3 depthwise, 1x1 linear projection, ReLU6, residual add."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
                   nn.ReLU6(inplace=True), nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    SETTINGS = ((1, 8, 1, 1), (6, 12, 2, 2), (6, 16, 2, 2), (6, 24, 2, 1))  # expand t, channels c, repeats n, stride s

    def __init__(self, classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(inplace=True)]
        cin = 8
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers += [nn.Conv2d(cin, 64, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(64, classes))

    def forward(self, x):
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


class SqueezeExcite(nn.Module):
    """Squeeze-excitation: average pool, 1x1 reduce, SiLU, 1x1 expand, sigmoid gate multiplied in."""

    def __init__(self, c: int, reduced: int):
        super().__init__()
        self.reduce = nn.Conv2d(c, reduced, 1)
        self.expand = nn.Conv2d(reduced, c, 1)

    def forward(self, x):
        gate = torch.sigmoid(self.expand(F.silu(self.reduce(F.adaptive_avg_pool2d(x, 1)))))
        return x * gate


class MBConv(nn.Module):
    """EfficientNet's block: 1x1 expand + BN + SiLU, depthwise + BN + SiLU, squeeze-excitation,
    1x1 projection + BN, residual add."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.expand = None
        if expand != 1:
            self.expand = nn.Sequential(nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.SiLU())
        self.dw = nn.Sequential(nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
                                nn.BatchNorm2d(hidden), nn.SiLU())
        self.se = SqueezeExcite(hidden, max(2, cin // 4))
        self.project = nn.Sequential(nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = x if self.expand is None else self.expand(x)
        y = self.project(self.se(self.dw(y)))
        return x + y if self.residual else y


class EfficientNetish(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.SiLU())
        blocks, cin = [], 8
        for t, c, n, s in ((1, 8, 1, 1), (4, 12, 2, 2), (4, 16, 2, 2)):
            for i in range(n):
                blocks.append(MBConv(cin, c, s if i == 0 else 1, t))
                cin = c
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Conv2d(cin, 48, 1, bias=False), nn.BatchNorm2d(48), nn.SiLU())
        self.fc = nn.Linear(48, classes)

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ---------------------------------------------------------------------------------------------
# UNet
# ---------------------------------------------------------------------------------------------
def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class UNet(nn.Module):
    """Two-level UNet: max-pool encoder, a ConvTranspose2d and a bilinear upsampling (both left in
    float), concatenated skips, a skip add, a 1x1 conv head whose output is the graph output."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.enc1, self.enc2, self.bottom = _double_conv(3, 8), _double_conv(8, 16), _double_conv(16, 32)
        self.up2 = nn.ConvTranspose2d(32, 16, 2, stride=2)
        self.dec2 = _double_conv(32, 16)
        self.reduce = nn.Conv2d(16, 8, 1)
        self.dec1 = _double_conv(16, 8)
        self.head = nn.Conv2d(8, classes, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        b = self.bottom(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([self.up2(b), e2], 1))
        up1 = F.interpolate(self.reduce(d2), scale_factor=2, mode="bilinear", align_corners=False)
        d1 = self.dec1(torch.cat([up1, e1], 1))
        return self.head(d1 + e1)


# ---------------------------------------------------------------------------------------------
# transformer encoders: BERT (token ids) and ViT (patches), on tests.models.EncoderBlock (pre-LN;
# Q, K and V Linear layers on one [B, T, D] input, V without bias; GELU MLP; residual adds)
# ---------------------------------------------------------------------------------------------
class Bert(nn.Module):
    """Token and position embeddings, two encoder blocks, a tanh pooler on the first token (Gemm) and
    a classifier."""

    def __init__(self, vocab: int = 50, d: int = 32, heads: int = 4, ff: int = 64, max_len: int = 16, classes: int = 3):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(max_len, d)
        self.ln = nn.LayerNorm(d)
        self.blocks = nn.ModuleList(EncoderBlock(d, heads, ff) for _ in range(2))
        self.pooler, self.cls = nn.Linear(d, d), nn.Linear(d, classes)

    def forward(self, ids):
        x = self.ln(self.tok(ids) + self.pos(torch.arange(ids.shape[1]).unsqueeze(0)))
        for blk in self.blocks:
            x = blk(x)
        return self.cls(torch.tanh(self.pooler(x[:, 0])))


class ViT(nn.Module):
    """Patch embedding (a strided Conv2d), a class token, learned positions, two encoder blocks,
    LayerNorm, a Linear head on the class token."""

    def __init__(self, d: int = 32, patch: int = 4, image: int = 16, classes: int = 10):
        super().__init__()
        self.patch = nn.Conv2d(3, d, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, d) * 0.02)
        self.blocks = nn.Sequential(EncoderBlock(d, 4, 64), EncoderBlock(d, 4, 64))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        p = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(p.shape[0], -1, -1), p], 1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


# ---------------------------------------------------------------------------------------------
# recurrent, several inputs and outputs, a conv called twice
# ---------------------------------------------------------------------------------------------
class GRUTagger(nn.Module):
    """Linear input projection on [B, T, F] (MatMul), a GRU left in float, a per-step Linear head on
    [B, T, H] and a Linear head on the last step (Gemm): two outputs."""

    def __init__(self, features: int = 6, hidden: int = 24, tags: int = 5, classes: int = 3):
        super().__init__()
        self.proj = nn.Linear(features, 16)
        self.gru = nn.GRU(16, hidden, batch_first=True)
        self.tag = nn.Linear(hidden, tags)
        self.cls = nn.Linear(hidden, classes)

    def forward(self, x):
        h, _ = self.gru(F.relu(self.proj(x)))
        return self.tag(h), self.cls(h[:, -1])


class TwoInTwoOut(nn.Module):
    """An image branch and a feature-vector branch, concatenated, then two heads on one tensor."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.vec = nn.Linear(10, 16)
        self.fuse = nn.Linear(32, 32)
        self.logits, self.box = nn.Linear(32, 4), nn.Linear(32, 2)

    def forward(self, image, features):
        a = F.relu(self.conv2(F.relu(self.bn1(self.conv1(image)))))
        a = torch.flatten(F.adaptive_avg_pool2d(a, 1), 1)
        h = F.relu(self.fuse(torch.cat([a, F.relu(self.vec(features))], 1)))
        return self.logits(h), self.box(h)


class ConvCalledTwice(nn.Module):
    """One Conv2d module applied twice in a row: it cannot be quantized (one range and one node per
    call would be needed), so the config skips it and the rest is quantized around it."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.shared(F.relu(self.shared(F.relu(self.stem(x))))))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


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


def _token_ids(batch: int, seed: int) -> tuple[torch.Tensor, ...]:
    return (torch.randint(0, 50, (batch, 8), generator=torch.Generator().manual_seed(seed)),)


def _sequences(batch: int, seed: int) -> tuple[torch.Tensor, ...]:
    return (torch.randn(batch, 7, 6, generator=torch.Generator().manual_seed(seed)),)


def _image_and_features(batch: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 16, 16, generator=g), torch.randn(batch, 10, generator=g)


def _seeded_bns(cls, seed: int):
    def build():
        return randomize_bns(cls(), seed)
    build.__name__ = cls.__name__
    return build


ZOO: dict[str, ZooModel] = {m.name: m for m in (
    ZooModel("resnet18", resnet18, _images((3, 32, 32))),
    ZooModel("resnet50", resnet50, _images((3, 32, 32))),
    ZooModel("mobilenetv2", _seeded_bns(MobileNetV2, 2), _images((3, 32, 32))),
    ZooModel("efficientnet", _seeded_bns(EfficientNetish, 3), _images((3, 32, 32))),
    ZooModel("unet", _seeded_bns(UNet, 4), _images((3, 16, 16))),
    ZooModel("bert", Bert, _token_ids, input_names=("ids",)),
    ZooModel("vit", ViT, _images((3, 16, 16))),
    ZooModel("gru", GRUTagger, _sequences, output_names=("tags", "label")),
    ZooModel("two_in_two_out", _seeded_bns(TwoInTwoOut, 5), _image_and_features, input_names=("image", "features"),
             output_names=("logits", "box")),
    ZooModel("conv_called_twice", ConvCalledTwice, _images((3, 16, 16)), skipped={"shared": "called 2 times"}),
)}
