"""The graph passes of the export, on onnx-ir, each in its own module with its rule in the docstring.

Trace (the tracer's graph -> the float graph both models are built from), in order:

1. :class:`InitializerIdentityEliminationPass` - readers of ``Identity(<initializer>)`` read the initializer;
2. :class:`LowerQuantLayersPass` - each placeholder -> Conv / Gemm / MatMul (+ bias Add) with its quantized weight;
3. :class:`FoldBatchNormPass` - a BatchNormalization after a quantized Conv folded into it;
4. ``RemoveUnusedOpsetsPass`` (onnx-ir) - the tracer's helper domain goes: one opset entry, the default domain.

Build (the float graph -> the fake-quant or the deploy model), in order:

1. :class:`QuantizeWeightsPass` - weights to their int8 grid, biases to int32 values (float32 or int8 / int32);
2. :class:`InsertFakeQuantPass` or :class:`InsertAscendQuantPass` - the quant and dequant nodes around each layer;
3. ``TopologicalSortPass`` (onnx-ir) - a stable sort: a quant shared by several layers moves right before
   the first of them in graph order; every other node keeps its place.

:func:`run` runs a pass list with onnx-ir's ``PassManager``; an :class:`~amct_core.errors.AmctError`
raised in a pass (it names the layer) reaches the caller as itself.
"""
from __future__ import annotations

from collections.abc import Sequence

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedOpsetsPass, TopologicalSortPass

from ...errors import AmctError
from ...record import LayerRecord
from .fold_batchnorm import FoldBatchNormPass
from .initializer_identities import InitializerIdentityEliminationPass
from .insert_quant import InsertAscendQuantPass, InsertFakeQuantPass
from .lower_quant_layers import LayerSource, LowerQuantLayersPass
from .quantize_weights import QuantizeWeightsPass

__all__ = [
    "FoldBatchNormPass", "InitializerIdentityEliminationPass", "InsertAscendQuantPass", "InsertFakeQuantPass",
    "LayerSource", "LowerQuantLayersPass", "QuantizeWeightsPass", "deploy_passes", "fake_quant_passes", "run",
    "trace_passes",
]


def trace_passes(layers: dict[str, LayerSource], opset: int) -> list[ir.passes.PassBase]:
    return [InitializerIdentityEliminationPass(), LowerQuantLayersPass(layers, opset), FoldBatchNormPass(),
            RemoveUnusedOpsetsPass()]


def fake_quant_passes(records: dict[str, LayerRecord]) -> list[ir.passes.PassBase]:
    return [QuantizeWeightsPass(records, ir.DataType.FLOAT, ir.DataType.FLOAT), InsertFakeQuantPass(records),
            TopologicalSortPass()]


def deploy_passes(records: dict[str, LayerRecord]) -> list[ir.passes.PassBase]:
    return [QuantizeWeightsPass(records, ir.DataType.INT8, ir.DataType.INT32), InsertAscendQuantPass(records),
            TopologicalSortPass()]


def run(passes: Sequence[ir.passes.PassBase], model: ir.Model) -> ir.Model:
    """Run ``passes`` in order on ``model`` (in place) with onnx-ir's pass manager; returns the model."""
    try:
        return ir.passes.PassManager(passes)(model).model
    except (ir.passes.PassError, ir.passes.PreconditionError, ir.passes.PostconditionError) as e:
        cause: BaseException | None = e
        while cause is not None and not isinstance(cause, AmctError):
            cause = cause.__cause__
        if cause is None:
            raise
        raise cause from None
