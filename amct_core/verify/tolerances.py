"""Pass/fail thresholds of the checks, with their documented defaults (docs/VERIFY.md)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class Tolerances:
    # ---- torch (distilled model) vs ONNX Runtime (fake-quant model) ---------------------------
    #: every parity figure (per graph output, per layer, local) is computed over at least this many
    #: values: an output or layer with fewer per input batch is also compared on further seeded
    #: batches, and its figures pool them. An SQNR over the two logits of one batch is no verdict: on a
    #: correct BERT-base file it spreads from 1 dB to 53 dB with the batch (docs/VERIFY.md)
    #: (None: one batch, as 1)
    figure_min_values: int | None = 32
    #: per graph output: minimum cosine similarity
    output_cosine_min: float = 0.995
    #: per graph output: minimum SQNR in dB
    output_sqnr_min_db: float = 25.0
    #: per graph output: minimum fraction of positions whose arg-max agrees (None: not checked)
    output_argmax_min: float | None = 0.9
    #: per graph output made by a quantized layer: max error in output quantization steps (None: not checked)
    output_max_steps: float | None = None
    #: per quantized layer (its output, both models fed the same model inputs): minimum cosine. Loose
    #: on purpose: float32 differences flip a few int8 roundings, and flips add up with depth (a
    #: 7-conv ResNet-like net measured 41.7 dB at its last layer); the local figures below isolate
    #: a wrong layer precisely.
    layer_cosine_min: float = 0.99
    #: per quantized layer: minimum SQNR in dB
    layer_sqnr_min_db: float = 20.0
    #: per quantized layer, local check (the torch layer fed ONNX Runtime's own input of the layer):
    #: a layer fails when its max error exceeds BOTH ``layer_local_max_steps`` output quantization
    #: steps (deq_scale; bias rounding alone gives 0.5) AND ``layer_local_max_rel`` of the output's
    #: max |value| (float32 summation noise of large layers stays far below it). None: not checked.
    layer_local_max_steps: float | None = 4.0
    layer_local_max_rel: float = 1e-4
    #: per quantized layer, local check: minimum SQNR in dB
    layer_local_sqnr_min_db: float = 40.0
    # ---- deploy simulation vs fake-quant -------------------------------------------------------
    #: final outputs: max |deploy - fake_quant| <= deploy_output_rtol * max|fake_quant| + deploy_output_atol
    deploy_output_rtol: float = 1e-5
    deploy_output_atol: float = 1e-6
    #: per layer dequantized output: |deploy - fake_quant| <= deploy_dequant_rtol * |fake_quant|
    #: (+ deq_scale * the accumulator slack allowed where float32 cannot hold the sums exactly)
    deploy_dequant_rtol: float = 2.0 ** -22

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None and "None" in str(f.type):
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
                can_be_none = " or None (not checked)" if "None" in str(f.type) else ""
                raise ValueError(f"tolerance {f.name!r} must be a number{can_be_none}, got {v!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "Tolerances":
        if not d:
            return cls()
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown tolerance(s) {unknown}; known: {sorted(names)}")
        return cls(**d)


def as_tolerances(t) -> Tolerances:
    if t is None:
        return Tolerances()
    if isinstance(t, Tolerances):
        return t
    if isinstance(t, dict):
        return Tolerances.from_dict(t)
    raise TypeError(f"tolerances must be a Tolerances or a dict, got {type(t).__name__}")
