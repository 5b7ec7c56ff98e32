"""Model shapes for the benchmarks, written out here (no torchvision): ResNet-50 and BERT-base shapes,
a width-scalable transformer for the size sweep and the multi-GB case, and the transformer block
distillation's quality is measured on (bench.distill, and the test that distillation beats calibration)."""
from __future__ import annotations

import math
import zlib

import torch
import torch.nn as nn
import torch.nn.functional as F


class Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = width * 4
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet50(nn.Module):
    """The ResNet-50 layer shapes (25.6M parameters at 1000 classes)."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers, cin = [], 64
        for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            stage = []
            for i in range(blocks):
                stage.append(Bottleneck(cin, width, stride if i == 0 else 1))
                cin = width * 4
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.fc = nn.Linear(2048, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class EncoderLayer(nn.Module):
    def __init__(self, d: int, heads: int, ff: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d)
        self.value = nn.Linear(d, d)
        self.attn_out = nn.Linear(d, d)
        self.ln1 = nn.LayerNorm(d)
        self.ff_in = nn.Linear(d, ff)
        self.ff_out = nn.Linear(ff, d)
        self.ln2 = nn.LayerNorm(d)

    def forward(self, x):
        b, t, d = x.shape
        hd = d // self.heads

        def split(z):
            return z.reshape(b, t, self.heads, hd).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)
        x = self.ln1(x + self.attn_out((att @ v).transpose(1, 2).reshape(b, t, d)))
        return self.ln2(x + self.ff_out(F.gelu(self.ff_in(x))))


class Encoder(nn.Module):
    """BERT-style encoder: token + position embeddings, N post-LN layers, a pooled classifier."""

    def __init__(self, vocab: int = 30522, d: int = 768, layers: int = 12, heads: int = 12, ff: int = 3072,
                 max_len: int = 512, classes: int = 2):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(max_len, d)
        self.ln = nn.LayerNorm(d)
        self.layers = nn.ModuleList(EncoderLayer(d, heads, ff) for _ in range(layers))
        self.pooler = nn.Linear(d, d)
        self.cls = nn.Linear(d, classes)

    def forward(self, ids):
        t = ids.shape[1]
        x = self.ln(self.tok(ids) + self.pos(torch.arange(t).unsqueeze(0)))
        for layer in self.layers:
            x = layer(x)
        return self.cls(torch.tanh(self.pooler(x[:, 0])))


def resnet50():
    return ResNet50().eval(), torch.randn(1, 3, 224, 224)


def bert_base():
    return Encoder().eval(), torch.randint(0, 30522, (1, 128))


def deep_encoder():
    """BERT-base's structure at test size (12 post-LN layers, d=64, 74 quantized layers, sequence 16,
    two logits): as deep as bert_base and as sensitive to rounding, exported in a second."""
    torch.manual_seed(0)
    m = Encoder(vocab=1000, d=64, layers=12, heads=4, ff=256, max_len=64, classes=2).eval()
    return m, torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- size sweep and the multi-GB model --------------------------------------------------------

SWEEP_WIDTHS = (512, 1024, 1536, 2048)
SWEEP_LAYERS = 6
SWEEP_VOCAB = 1000
SWEEP_SEQ = 64


def seeded_fill_(model: nn.Module, seed: int = 0, block: int = 1 << 20) -> nn.Module:
    """Fill every parameter deterministically and cheaply: one seeded block of N(0, 1) values, tiled
    (a memcpy per tensor instead of a random draw per element), scaled by 1/sqrt(fan_in) for weights.
    LayerNorm weights get 1, biases small values, so activations stay in a sane range."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(2 * block, generator=g)
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.view(-1)
            n = flat.numel()
            if name.endswith("bias"):
                scale = 0.02
            elif p.dim() == 1:  # LayerNorm / BatchNorm weight
                flat.fill_(1.0)
                continue
            else:
                scale = 1.0 / math.sqrt(p[0].numel()) if p.dim() > 1 else 1.0
            for i, s in enumerate(range(0, n, block)):
                k = min(block, n - s)
                # a different window of the seeded pool per tensor and chunk: no two weights are equal
                # (torch.onnx.export would deduplicate equal initializers and write less)
                o = (zlib.crc32(name.encode()) + i * 7919) % block
                flat[s:s + k].copy_(base[o:o + k])
            flat.mul_(scale)
        for b in model.buffers():
            if b.dtype.is_floating_point:
                b.zero_()
    return model


def _encoder_no_init(seed: int = 0, **kw) -> Encoder:
    """An Encoder built without running torch's initialisers (fast for GBs), then seeded_fill_."""
    with torch.device("meta"):
        m = Encoder(**kw)
    m = m.to_empty(device="cpu")
    return seeded_fill_(m, seed).eval()


def transformer_w(d: int, layers: int = SWEEP_LAYERS, seq: int = SWEEP_SEQ, vocab: int = SWEEP_VOCAB):
    """The sweep architecture at width ``d`` (heads of 64, ff = 4d)."""
    m = _encoder_no_init(vocab=vocab, d=d, layers=layers, heads=max(1, d // 64), ff=4 * d, max_len=max(seq, 64))
    return m, torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(1))


def large():
    """A 2.65 GB (fp32) transformer: d=4096, 4 layers, ff=11008, vocab 8000 (662M parameters), sequence 32."""
    m = _encoder_no_init(vocab=8000, d=4096, layers=4, heads=32, ff=11008, max_len=64)
    return m, torch.randint(0, 8000, (1, 32), generator=torch.Generator().manual_seed(1))


def tiny():
    """The sweep architecture at width 64, one layer: for smoke runs (seconds)."""
    return transformer_w(64, layers=1, seq=8, vocab=50)


def by_name(name: str):
    """``resnet50``, ``bert_base``, ``large``, ``tiny``, ``deep_encoder`` or ``tx<d>`` (the sweep architecture
    at width d)."""
    if name.startswith("tx") and name[2:].isdigit():
        return transformer_w(int(name[2:]))
    fn = {"resnet50": resnet50, "bert_base": bert_base, "large": large, "tiny": tiny,
          "deep_encoder": deep_encoder}.get(name)
    if fn is None:
        raise SystemExit(f"unknown model {name!r}: use resnet50, bert_base, large, tiny, deep_encoder or tx<width> "
                         "(e.g. tx1024)")
    return fn()


def float_model(name: str = "resnet50"):
    """Only the float model of :func:`by_name` (the flow's ``model`` callable: 'bench.models:float_model')."""
    return by_name(name)[0]


# ---- the distillation quality case ------------------------------------------------------------


class TransformerBlock(nn.Module):
    """Pre-LN transformer block, Linear layers on [B, T, D] inputs, functional GELU / softmax."""

    def __init__(self, d: int = 32, ff: int = 96, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.ln = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.fc1 = nn.Linear(d, ff)
        self.fc2 = nn.Linear(ff, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, -1)
        x = x + self.proj((a @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(x)))


def transformer_teacher() -> nn.Module:
    """The block with uneven LayerNorm gains and a few strong hidden units (long-tailed GELU outputs)."""
    torch.manual_seed(0)
    t = TransformerBlock().eval()
    with torch.no_grad():
        t.ln.weight.mul_(torch.linspace(0.2, 3.0, 32))
        t.fc1.weight[:8].mul_(4.0)
    return t


def token_batches(n_batches: int, seed: int, batch: int = 16) -> list[torch.Tensor]:
    """``n_batches`` batches of [batch, 16, 32] with two outlier channels, as in real residual streams."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        x = torch.randn(batch, 16, 32, generator=g)
        x[..., :2] *= 8
        out.append(x)
    return out
