"""Build the fake-quant model (FORMATS §4) and the deploy model (FORMATS §5) from a traced float graph.

Each builder runs its pass list (:mod:`amct_core.onnx.passes`) on a clone of the traced graph: nodes
and values are new, tensors are shared (none is copied, and the traced graph is left as it was).
"""
from __future__ import annotations

import onnx_ir as ir

from ..errors import ExportError
from ..formats import FAKE_QUANT_MIN_OPSET
from ..record import LayerRecord
from .passes import deploy_passes, fake_quant_passes, run


def build_fake_quant(traced: ir.Model, records: dict[str, LayerRecord]) -> ir.Model:
    """The fake-quant model (FORMATS §4) from a traced graph and the records."""
    opset = traced.opset_imports.get("", 0)
    if opset < FAKE_QUANT_MIN_OPSET:
        raise ExportError(
            f"opset_version {opset}: the fake-quant model needs Round, which ONNX has from opset "
            f"{FAKE_QUANT_MIN_OPSET}; pick an opset >= {FAKE_QUANT_MIN_OPSET}"
        )
    return run(fake_quant_passes(records), traced.clone())


def build_deploy(traced: ir.Model, records: dict[str, LayerRecord]) -> ir.Model:
    """The deploy model (FORMATS §5) from a traced graph and the records."""
    return run(deploy_passes(records), traced.clone())
