"""Every fact of the file format (``FORMATS.md``), in one module.

The ranges (§2, §3), the quantization of weights and biases with the int32 check of the bias (§3),
deq_scale and its uint64 packing (§4, §5), the Ascend ops and their attributes (§5), the names of
quantized layers' nodes and tensors (§4, §5, §7) and the names of the files (§1). The tracer, the
graph passes, record validation, verify (preflight; the deploy simulation takes its constants from
here and keeps its own arithmetic, so that it checks the exporter instead of repeating it) and the
pipeline's output paths import them; no other module spells them out.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from onnx import AttributeProto

if TYPE_CHECKING:  # torch is imported by quantize_weight only: the file names and constants load without it
    import torch

from .errors import RecordError

# ---- §2, §3: ranges ------------------------------------------------------------------------------
INT8_MIN, INT8_MAX = -128, 127
INT8_LEVELS = INT8_MAX - INT8_MIN  # 2^b - 1 steps of an int8 range
INT16_MIN, INT16_MAX = -(2**15), 2**15 - 1
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
SCALE_MIN = 2.220446e-16  # DBL_EPSILON: every scale_d and scale_w lies within [SCALE_MIN, SCALE_MAX]
SCALE_MAX = 4.5035996e15  # 1 / DBL_EPSILON
QUANT_TYPE = "INT8"  # default of the record's dst_type / act_type / wts_type, and AscendQuant's dst_type
OFFSET_RANGE = {"INT8": (INT8_MIN, INT8_MAX), "INT16": (INT16_MIN, INT16_MAX)}  # offset_d by act_type
SHIFT_BIT_RANGE = (1, 16)  # a non-zero shift_bit entry lies within this range


# ---- §3: quantization arithmetic ----------------------------------------------------------------
def quantize_weight(w: torch.Tensor, scale_w, axis: int = 0,
                    rounding: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """``q_w = clip(round(w / scale_w), -128, 127)`` as float values; ``scale_w`` holds one value or one
    per output channel along ``axis`` of ``w``.

    Without ``rounding`` (export): round half to even, computed in place on the one new tensor
    ``w / scale_w``, zeros written as +0.0; no autograd. ``rounding`` (training) is a differentiable
    rounding, e.g. the straight-through estimator of :func:`amct_core.quant.arith.round_ste`.
    """
    import torch

    s = torch.as_tensor(scale_w, dtype=w.dtype)
    if s.numel() > 1:
        shape = [1] * w.dim()
        shape[axis] = -1
        s = s.reshape(shape)
    if rounding is None:
        return torch.div(w, s).round_().clamp_(INT8_MIN, INT8_MAX).add_(0.0)
    return torch.clamp(rounding(w / s), INT8_MIN, INT8_MAX)


def inverse_scale(scale_d: float) -> np.float32:
    """``1 / scale_d`` in float32: AscendQuant's ``scale`` and the fake-quant chain's multiplier (§4, §5)."""
    return np.float32(1.0) / np.float32(scale_d)


def deq_scale(scale_d: float, scale_w) -> np.ndarray:
    """``scale_d * scale_w`` computed in float32, exactly as the deploy model stores it (§4, §5)."""
    return (np.float32(scale_d) * np.asarray(scale_w, dtype=np.float32)).astype(np.float32)


def quantize_bias(bias, deq, layer: str) -> np.ndarray:
    """``bias_q = round(bias / (scale_w * scale_d))`` (§3), in float64, from ``deq`` = :func:`deq_scale`.

    A value outside int32 (or not finite) is a :class:`RecordError` naming the layer and the channel,
    and saying the layer must be excluded from quantization (§2).
    """
    b = np.asarray(bias, dtype=np.float64)
    bq = np.round(b / np.broadcast_to(np.asarray(deq, dtype=np.float64), b.shape))
    bad = np.flatnonzero((bq < INT32_MIN) | (bq > INT32_MAX) | ~np.isfinite(bq))
    if bad.size:
        c = int(bad[0])
        raise RecordError(
            f"layer {layer!r}: bias overflows int32 after quantization (channel {c}: bias {float(b.flat[c]):.6g} "
            f"/ (scale_w * scale_d) = {float(bq.flat[c]):.6g}); exclude this layer from quantization")
    return bq


def pack_deq_scale(deq) -> np.ndarray:
    """uint64 whose low 32 bits are the IEEE-754 float32 pattern of ``deq``; high 32 bits zero (§5)."""
    return np.ascontiguousarray(deq, dtype=np.float32).view(np.uint32).astype(np.uint64)


def unpack_deq_scale(packed) -> tuple[np.ndarray, np.ndarray]:
    """uint64 deq_scale -> (the float32 of the low 32 bits, the high 32 bits as uint32), flattened."""
    u = np.asarray(packed).astype(np.uint64).reshape(-1)
    low = (u & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    return low.view(np.float32), (u >> np.uint64(32)).astype(np.uint32)


# ---- §4, §5: the ops around a quantized layer --------------------------------------------------------
LAYER_OPS = ("Conv", "Gemm", "MatMul")  # the ops a quantized layer is (§7)
FAKE_QUANT_OPS = ("Mul", "Round", "Add", "Clip", "Sub")  # the fake-quant chain on a layer's input, in order
FAKE_QUANT_MIN_OPSET = 11  # Round exists from opset 11

ASCEND_QUANT = "AscendQuant"
ASCEND_DEQUANT = "AscendDequant"
_T = AttributeProto
# name -> (attribute type, required). Writers write the required attributes only (AMCT's form); readers
# accept the optional ones too.
ASCEND_QUANT_ATTRS = {"scale": (_T.FLOAT, True), "offset": (_T.FLOAT, True), "dst_type": (_T.STRING, True),
                      "sqrt_mode": (_T.INT, False), "round_mode": (_T.STRING, False)}
ASCEND_DEQUANT_ATTRS = {"dtype": (_T.INT, True), "sqrt_mode": (_T.INT, False), "relu_flag": (_T.INT, False)}
ROUND_MODES = ("Round", "Floor", "Ceil", "Trunc")  # AscendQuant's round_mode values; "Round" is the default
DEQUANT_FLOAT32, DEQUANT_FLOAT16 = 0, 1  # AscendDequant's dtype


def ascend_quant_attributes(scale_d: float, offset_d: int) -> dict[str, float | str]:
    """The attributes a writer gives AscendQuant: exactly ``scale = 1 / scale_d``, ``offset = offset_d``,
    ``dst_type = "INT8"`` (§5)."""
    return {"dst_type": QUANT_TYPE, "offset": float(offset_d), "scale": float(inverse_scale(scale_d))}


def ascend_dequant_attributes() -> dict[str, int]:
    """The attributes a writer gives AscendDequant: ``dtype = 0`` (float32 output, §5)."""
    return {"dtype": DEQUANT_FLOAT32}


# ---- §4, §5, §7: names -------------------------------------------------------------------------------
def _named(suffix: str, doc: str) -> property:
    return property(lambda self: self.layer + suffix, doc=f"``<layer>{suffix}``: {doc}")


@dataclass(frozen=True)
class LayerNames:
    """The names of one quantized layer's nodes and tensors. ``layer`` is the torch module name, the
    record key and the name of the layer's Conv/Gemm/MatMul node (§7)."""

    layer: str

    # the layer (traced, fake-quant and deploy models)
    weight = _named(".weight", "the weight initializer")
    bias = _named(".bias", "the bias initializer")
    output = _named(".output", "the layer's output tensor, unless it is a graph output (which keeps its name)")
    matmul_output = _named(".matmul_output", "a MatMul layer's product, read by its bias Add")
    bias_add = _named(".bias_add", "the Add node of a MatMul layer's bias")
    # deploy model (§5)
    quant = _named(".quant", "the AscendQuant node")
    quant_output = _named(".quant.output", "the AscendQuant node's int8 output")
    dequant = _named(".dequant", "the AscendDequant node")
    dequant_param = _named(".dequant.param", "the uint64 deq_scale initializer")
    dequant_input = _named(".dequant.input", "the int32 accumulator AscendDequant reads")

    # fake-quant model (§4)
    def fakequant(self, part: str) -> str:
        """``<layer>.quant.fakequant.<part>``: the chain on the layer's input."""
        return f"{self.layer}.quant.fakequant.{part}"

    def fakedequant(self, part: str) -> str:
        """``<layer>.fakedequant.<part>``: the Mul by deq_scale on the layer's output."""
        return f"{self.layer}.fakedequant.{part}"


def dynamic_axis_name(tensor: str, k: int) -> str:
    """The name of the ``k``-th (from 0) dynamic axis listed for ``tensor`` in list-form ``dynamic_axes``."""
    return f"{tensor}_dynamic_axes_{k + 1}"


def output_dim_name(output: str, axis: int) -> str:
    """The name of a symbolic dimension of a graph output that has no name from the export."""
    return f"{output}_dim_{axis}"


# ---- the tracer's placeholder (never in a written file) ------------------------------------------------
TRACE_DOMAIN = "amct_trace"
PLACEHOLDER_OP = "QuantLayer"  # one node per QAT layer; attributes "layer" (module name) and "kind"

# ---- §1: files -------------------------------------------------------------------------------------
FAKE_QUANT_MODEL = "fake_quant_model.onnx"
DEPLOY_MODEL = "deploy_model.onnx"
RECORD_FILE = "scale_offset_record.txt"
DEFAULT_RECORD_FILE = f"amct_log/{RECORD_FILE}"  # relative to the working directory


def prefixed_file(directory, prefix: str, file_name: str) -> Path:
    """``<directory>/<prefix>_<file_name>``, or ``<directory>/<file_name>`` for an empty prefix (§1)."""
    return Path(directory) / (f"{prefix}_{file_name}" if prefix else file_name)


def output_file(save_path, file_name: str) -> Path:
    """Where ``file_name`` goes for ``save_path`` (a directory plus a name prefix, §1):
    ``./out/resnet`` gives ``./out/resnet_<file_name>``; a path ending in ``/`` (or naming an existing
    directory) gives ``<that directory>/<file_name>``."""
    s = str(save_path)
    if s.endswith(("/", "\\")) or Path(s).is_dir():
        return prefixed_file(s, "", file_name)
    return prefixed_file(Path(s).parent, Path(s).name, file_name)
