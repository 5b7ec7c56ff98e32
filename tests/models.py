"""Small model definitions shared by the tests (no torchvision). Each is built with a fixed seed."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def _randomize_bn(bn: nn.BatchNorm2d, g: torch.Generator) -> None:
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.2)
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
        bn.weight.copy_(torch.randn(bn.num_features, generator=g))  # some negative gammas: tests the sign fold
        bn.bias.copy_(torch.randn(bn.num_features, generator=g) * 0.1)


class SmallCNN(nn.Module):
    """conv/bn/relu, strided conv, depthwise conv, dilated conv, bias-free conv, a residual add, a head."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.pw = nn.Conv2d(32, 32, 1, bias=False)
        self.dilated = nn.Conv2d(32, 32, 3, padding=2, dilation=2)
        self.fc = nn.Linear(32, num_classes)
        for bn in (self.bn1, self.bn2):
            _randomize_bn(bn, g)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        y = F.relu(self.pw(F.relu(self.dw(x))))
        x = x + self.dilated(y)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


class MLP(nn.Module):
    def __init__(self, d_in: int = 20, hidden: int = 64, d_out: int = 7):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden, bias=False)
        self.fc3 = nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.fc3(F.gelu(self.fc2(F.relu(self.fc1(x)))))


class EncoderBlock(nn.Module):
    """A transformer encoder block written out by hand: Q/K/V projections fed by one tensor, attention
    math, residual adds, LayerNorm, a GELU MLP; Linear layers on 3-D inputs."""

    def __init__(self, d: int = 32, heads: int = 4, ff: int = 64):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d, bias=False)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.ff1 = nn.Linear(d, ff)
        self.ff2 = nn.Linear(ff, d)

    def forward(self, x):
        b, t, d = x.shape
        h = self.ln1(x)
        def split(z):
            return z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2)
        q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads), dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        return x + self.ff2(F.gelu(self.ff1(self.ln2(x))))


class TwoOutputs(nn.Module):
    """A quantized layer's output is itself a graph output."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        feat = self.conv(x)
        return feat, self.head(F.relu(feat).mean((2, 3)))


class TinyUNet(nn.Module):
    """A UNet-style net: a stride-2 conv down, a ConvTranspose2d back up, concat with the skip. It runs
    only at even spatial sizes (at 1x1 or 33x33 the upsampled map and the skip differ in size)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.enc = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.mid = nn.Conv2d(16, 16, 3, padding=1)
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.dec = nn.Conv2d(16, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 2, 1)
        _randomize_bn(self.bn, g)

    def forward(self, x):
        skip = F.relu(self.bn(self.enc(x)))
        y = F.relu(self.mid(F.relu(self.down(skip))))
        y = torch.cat([self.up(y), skip], 1)
        return self.head(F.relu(self.dec(y)))


class WideMLP(nn.Module):
    """Residual blocks of two Linear layers on [batch, tokens, d] inputs (MatMul + Add each). At the default
    size its fp32 weights are 2.22e9 bytes: just over protobuf's 2 GiB limit, so its fake-quant model must
    go through external data (FORMATS §1); the int8 deploy model (0.55 GB) stays one file."""

    def __init__(self, d: int = 4096, ff: int = 16896, blocks: int = 4):
        super().__init__()
        self.up = nn.ModuleList(nn.Linear(d, ff) for _ in range(blocks))
        self.down = nn.ModuleList(nn.Linear(ff, d) for _ in range(blocks))

    def forward(self, x):
        for up, down in zip(self.up, self.down, strict=True):
            x = x + down(F.gelu(up(x)))
        return x


def build_wide(d: int = 4096, ff: int = 16896, blocks: int = 4) -> nn.Module:
    """WideMLP with seeded N(0, 1/fan_in) weights and small biases, built without torch's initialisers
    (they would take longer than the whole export at this size)."""
    with torch.device("meta"):
        m = WideMLP(d, ff, blocks)
    m = m.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in m.named_parameters():
            std = 0.02 if name.endswith("bias") else 1.0 / math.sqrt(p.shape[1])
            p.normal_(0.0, std, generator=g)
    return m.eval()


def deep_encoder() -> nn.Module:
    """BERT-base's structure at test size (bench.models.deep_encoder): 12 post-LN layers, token ids in, two logits."""
    from bench.models import deep_encoder

    return deep_encoder()[0]


def example_inputs(name: str, batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if name == "deep":
        return torch.randint(0, 1000, (batch, 16), generator=g)  # token ids
    shapes = {"cnn": (batch, 3, 16, 16), "mlp": (batch, 20), "encoder": (batch, 8, 32), "two": (batch, 3, 8, 8),
              "unet": (batch, 3, 32, 32)}
    return torch.randn(*shapes[name], generator=g)


MODELS = {"cnn": SmallCNN, "mlp": MLP, "encoder": EncoderBlock, "two": TwoOutputs, "unet": TinyUNet,
          "deep": deep_encoder}


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[name]().eval()


def make_qat(name: str, workdir, calib_batches: int = 4, batch: int = 8) -> nn.Module:
    """The float test model ``name`` wrapped by create_distill_model and calibrated on random batches."""
    from amct_core import create_distill_config, create_distill_model
    from amct_core.distill import calibrate

    model = build(name)
    cfg = f"{workdir}/{name}_distill_config.json"
    create_distill_config(cfg, model, example_inputs(name, batch))
    qat = create_distill_model(cfg, model, example_inputs(name, batch))
    calibrate(qat, [(example_inputs(name, batch, seed=s),) for s in range(1, calib_batches + 1)])
    return qat.eval()
