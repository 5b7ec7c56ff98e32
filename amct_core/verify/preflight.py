"""ATC preflight: check a deploy model (ours or AMCT's) against FORMATS §5 and §6 without ATC.

Every finding names the node (or initializer / opset entry) and says what is expected. Findings of
severity ``error`` fail the check; ``warning`` findings are reported only.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto

from ..errors import TargetError
from ..formats import (
    ASCEND_DEQUANT,
    ASCEND_DEQUANT_ATTRS,
    ASCEND_QUANT,
    ASCEND_QUANT_ATTRS,
    DEQUANT_FLOAT16,
    DEQUANT_FLOAT32,
    INT8_MAX,
    INT8_MIN,
    ROUND_MODES,
    LayerNames,
    unpack_deq_scale,
)
from ..targets import Target, get_target
from ._graph import (
    DeployLayer,
    GraphIndex,
    attr_map,
    attr_value,
    dtype_name,
    find_deploy_layers,
    load_model,
    node_label,
)
from ._outcome import Outcome

ERROR, WARNING = "error", "warning"

# Ops the ATC ONNX parser is known to reject, or that mean the file is not an AMCT-style deploy
# model (ONNX Runtime's own quantization formats). Data, not branches: extend here.
REJECTED_OPS: dict[str, str] = {
    "DynamicQuantizeLinear": "dynamic (runtime) quantization; use AscendQuant with fixed scale/offset",
    "ConvInteger": "integer Conv of ONNX Runtime's format; use Conv with an int8 weight between AscendQuant/AscendDequant",
    "MatMulInteger": "integer MatMul of ONNX Runtime's format; use MatMul with an int8 weight between AscendQuant/AscendDequant",
    "QLinearConv": "QLinear ops of ONNX Runtime's format; use Conv between AscendQuant/AscendDequant",
    "QLinearMatMul": "QLinear ops of ONNX Runtime's format; use MatMul between AscendQuant/AscendDequant",
    "QLinearAdd": "QLinear ops of ONNX Runtime's format",
    "QLinearMul": "QLinear ops of ONNX Runtime's format",
    "QLinearGlobalAveragePool": "QLinear ops of ONNX Runtime's format",
    "QLinearLeakyRelu": "QLinear ops of ONNX Runtime's format",
    "QLinearConcat": "QLinear ops of ONNX Runtime's format",
    "QLinearSigmoid": "QLinear ops of ONNX Runtime's format",
    "QLinearAveragePool": "QLinear ops of ONNX Runtime's format",
}
# Ops that are legal ONNX but do not belong in an AMCT deploy model.
SUSPICIOUS_OPS: dict[str, str] = {
    "QuantizeLinear": "an AMCT deploy model quantizes with AscendQuant, not QuantizeLinear",
    "DequantizeLinear": "an AMCT deploy model dequantizes with AscendDequant, not DequantizeLinear",
}

_T = AttributeProto.AttributeType


@dataclass
class Finding:
    code: str
    severity: str
    node: str
    message: str
    expected: str

    def __str__(self) -> str:
        return f"[{self.severity}] {self.code} at {self.node}: {self.message}; expected {self.expected}"


@dataclass
class PreflightResult(Outcome):
    model: str
    target: str
    opset: int | None
    layers: list[str]
    findings: list[Finding] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == ERROR]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == WARNING]

    @property
    def ok(self) -> bool:
        return not self.errors

    def codes(self) -> set[str]:
        return {f.code for f in self.findings}

    def to_dict(self) -> dict:
        return {
            "model": self.model, "target": self.target, "opset": self.opset, "ok": self.ok,
            "layers": list(self.layers), "errors": len(self.errors), "warnings": len(self.warnings),
            "findings": [asdict(f) for f in self.findings],
        }

    def summary(self) -> str:
        if self.ok:
            return (f"preflight passed: {len(self.layers)} quantized layer(s), opset {self.opset}, target "
                    f"{self.target}" + (f", {len(self.warnings)} warning(s)" if self.warnings else ""))
        return f"preflight failed with {len(self.errors)} error(s); first: {self.errors[0]}"


class _Checker:
    def __init__(self, model: onnx.ModelProto, target: Target, label: str):
        self.model = model
        self.target = target
        self.ix = GraphIndex(model)
        self.findings: list[Finding] = []
        self.label = label

    def add(self, code, node, message, expected, severity=ERROR):
        self.findings.append(Finding(code, severity, node, message, expected))

    # -- file-level ---------------------------------------------------------------------------
    def check_opsets(self) -> int | None:
        entries = list(self.model.opset_import)
        t = self.target
        rng = f"[{t.opset_min}, {t.opset_max}]"
        if len(entries) != 1:
            listed = ", ".join(f"{e.domain or '<default>'}:{e.version}" for e in entries) or "none"
            self.add("opset.count", "opset_import",
                     f"the file declares {len(entries)} opset_import entries ({listed}); ATC's ONNX parser refuses "
                     "a model whose default-domain nodes meet more than one opset entry",
                     f"exactly one entry: the default domain '' with a version in {rng} (target {t.name})")
        default = None
        for e in entries:
            if e.domain not in ("", "ai.onnx"):
                self.add("opset.domain", f"opset_import {e.domain}:{e.version}",
                         f"opset entry for domain {e.domain!r}", "only the default domain '' (remove helper domains "
                         "used while tracing; Ascend ops live in the default domain)")
            else:
                default = int(e.version)
                if not t.opset_min <= default <= t.opset_max:
                    self.add("opset.range", f"opset_import {e.domain or '<default>'}:{e.version}",
                             f"default-domain opset {e.version} is outside target {t.name}'s range",
                             f"a version in {rng} (FORMATS §6)")
        if default is None and entries:
            self.add("opset.missing_default", "opset_import", "no default-domain ('') opset entry",
                     f"one default-domain entry with a version in {rng}")
        return default

    def check_nodes(self) -> None:
        ix = self.ix
        known = set(ix.initializers) | {i.name for i in self.model.graph.input}
        names: dict[str, int] = {}
        for n in self.model.graph.node:
            lab = node_label(n)
            if n.name:
                names[n.name] = names.get(n.name, 0) + 1
            if n.domain not in ("", "ai.onnx"):
                if n.op_type in (ASCEND_QUANT, ASCEND_DEQUANT):
                    self.add("ascend.domain", lab, f"{n.op_type} is in domain {n.domain!r}",
                             "the default ONNX domain (empty domain string), where ATC looks Ascend ops up")
                else:
                    self.add("node.domain", lab, f"{n.op_type} is in custom domain {n.domain!r}, which ATC does not know",
                             "only default-domain ops")
            if n.op_type in REJECTED_OPS:
                self.add("op.rejected", lab, f"{n.op_type} is in the file: {REJECTED_OPS[n.op_type]}",
                         "no ONNX Runtime quantization ops in a deploy model")
            elif n.op_type in SUSPICIOUS_OPS:
                self.add("op.unexpected", lab, f"{n.op_type}: {SUSPICIOUS_OPS[n.op_type]}",
                         "AscendQuant/AscendDequant around quantized layers", WARNING)
            for i in n.input:
                if i and i not in known:
                    self.add("graph.dangling_input", lab, f"input {i!r} is produced by no node, initializer or graph input "
                             "before this node", "a topologically sorted graph with every input defined")
            known.update(o for o in n.output if o)
        for name, count in names.items():
            if count > 1 and any(x.name == name for x in self.layers_nodes):
                self.add("layer.duplicate_name", name, f"{count} nodes share this name",
                         "unique node names (the quantized node is named after its module, FORMATS §7)")

    # -- Ascend ops ------------------------------------------------------------------------------
    def _check_attrs(self, node, spec: dict, what: str) -> dict:
        lab = node_label(node)
        attrs = attr_map(node)
        for name, (typ, required) in spec.items():
            a = attrs.get(name)
            if a is None:
                if required:
                    self.add(f"{what}.attr_missing", lab, f"attribute {name!r} is missing",
                             f"{name!r} of type {_T.Name(typ)}")
            elif a.type != typ:
                self.add(f"{what}.attr_type", lab, f"attribute {name!r} has type {_T.Name(a.type)}",
                         f"type {_T.Name(typ)}")
        for name in attrs:
            if name not in spec:
                self.add(f"{what}.attr_unknown", lab, f"unknown attribute {name!r}",
                         f"only {sorted(spec)} (FORMATS §5)", WARNING)
        return {k: onnx.helper.get_attribute_value(a) for k, a in attrs.items()
                if k in spec and a.type == spec[k][0]}

    def check_quant(self, node) -> None:
        lab = node_label(node)
        if len(node.input) != 1 or len(node.output) != 1:
            self.add("ascend_quant.io", lab, f"{len(node.input)} input(s) and {len(node.output)} output(s)",
                     "one data input and one output")
        v = self._check_attrs(node, ASCEND_QUANT_ATTRS, "ascend_quant")
        s = v.get("scale")
        if s is not None and not (math.isfinite(s) and s > 0):
            self.add("ascend_quant.scale", lab, f"scale = {s!r}", "a finite positive float: 1 / scale_d")
        o = v.get("offset")
        if o is not None and not (math.isfinite(o) and float(o).is_integer() and INT8_MIN <= o <= INT8_MAX):
            self.add("ascend_quant.offset", lab, f"offset = {o!r}", f"an integer value in [{INT8_MIN}, {INT8_MAX}] (offset_d)")
        d = v.get("dst_type")
        if d is not None:
            d = d.decode() if isinstance(d, bytes) else d
            if d not in self.target.dst_types:
                self.add("ascend_quant.dst_type", lab, f"dst_type = {d!r}",
                         f"one of {list(self.target.dst_types)} for target {self.target.name}")
        sm = v.get("sqrt_mode")
        if sm is not None and sm not in (0, 1):
            self.add("ascend_quant.sqrt_mode", lab, f"sqrt_mode = {sm}", "0 (default) or 1")
        rm = v.get("round_mode")
        if rm is not None:
            rm = rm.decode() if isinstance(rm, bytes) else rm
            if rm not in ROUND_MODES:
                self.add("ascend_quant.round_mode", lab, f"round_mode = {rm!r}", f"one of {list(ROUND_MODES)}")
        cons = self.ix.consumers.get(node.output[0], []) if node.output else []
        layer_nodes = {id(l.node) for l in self.layers}
        for c in cons:
            if id(c) not in layer_nodes:
                self.add("ascend_quant.consumer", lab,
                         f"its int8 output feeds {c.op_type} {node_label(c)!r}, which is not a quantized layer",
                         "AscendQuant feeding only quantized Conv/Gemm/MatMul layers")
        if not cons:
            self.add("ascend_quant.unused", lab, "its output is used by no node", "an AscendQuant feeding a quantized layer")

    def check_dequant(self, node, layer: DeployLayer | None) -> None:
        lab = node_label(node)
        ix = self.ix
        if len(node.input) != 2 or len(node.output) != 1:
            self.add("ascend_dequant.io", lab, f"{len(node.input)} input(s) and {len(node.output)} output(s)",
                     "inputs [int32 accumulator, uint64 deq_scale] and one output")
        v = self._check_attrs(node, ASCEND_DEQUANT_ATTRS, "ascend_dequant")
        dt = v.get("dtype")
        if dt is not None and dt not in (DEQUANT_FLOAT32, DEQUANT_FLOAT16):
            self.add("ascend_dequant.dtype", lab, f"dtype = {dt}", f"{DEQUANT_FLOAT32} (float32) or {DEQUANT_FLOAT16} (float16)")
        for k in ("sqrt_mode", "relu_flag"):
            if v.get(k) not in (None, 0, 1):
                self.add(f"ascend_dequant.{k}", lab, f"{k} = {v[k]}", "0 or 1")
        if layer is None:
            p = ix.producer.get(node.input[0]) if node.input else None
            self.add("ascend_dequant.producer", lab,
                     f"its input comes from {p.op_type + ' ' + repr(node_label(p)) if p is not None else 'no node'}, "
                     "not from a quantized layer", "AscendDequant right after a quantized Conv/Gemm (or MatMul + bias Add)")
        if len(node.input) < 2:
            return
        pname = node.input[1]
        t = ix.const_tensor(pname)
        if t is None:
            self.add("deq_scale.not_constant", lab, f"deq_scale input {pname!r} is not an initializer/constant",
                     f"a UINT64 initializer {LayerNames('<layer>').dequant_param!r}")
            return
        if t.data_type != TensorProto.UINT64:
            self.add("deq_scale.dtype", pname, f"deq_scale of {lab!r} is {dtype_name(t.data_type)}",
                     "UINT64 (low 32 bits: float32 bit pattern of scale_d * scale_w[c]; high 32 bits 0)")
            return
        arr = ix.const_array(pname)
        low, high = unpack_deq_scale(arr)
        bad_hi = np.flatnonzero(high)
        if bad_hi.size:
            c = int(bad_hi[0])
            self.add("deq_scale.high_bits", pname,
                     f"{bad_hi.size} of {high.size} entries have non-zero high 32 bits (first: channel {c}, "
                     f"high word 0x{int(high[c]):08x})", "high 32 bits all 0 (FORMATS §5)")
        bad_lo = np.flatnonzero(~np.isfinite(low) | (low <= 0))
        if bad_lo.size:
            c = int(bad_lo[0])
            self.add("deq_scale.value", pname, f"{bad_lo.size} entries whose low 32 bits are not a finite positive "
                     f"float32 (first: channel {c} = {float(low[c])!r})", "finite positive scale_d * scale_w[c]")
        if layer is not None:
            c_out = layer.c_out(ix)
            if c_out is not None and low.size not in (1, c_out):
                self.add("deq_scale.length", pname, f"{low.size} entries for layer {layer.name!r} with {c_out} output channels",
                         f"1 or {c_out} entries")
        if layer is not None and layer.name and pname != LayerNames(layer.name).dequant_param:
            self.add("deq_scale.name", pname, f"deq_scale of layer {layer.name!r} is named {pname!r}",
                     f"{LayerNames(layer.name).dequant_param!r} (FORMATS §5)", WARNING)

    # -- layers -----------------------------------------------------------------------------------
    def check_layer(self, layer: DeployLayer) -> None:
        ix = self.ix
        lab = node_label(layer.node)
        if not layer.name:
            self.add("layer.unnamed", lab, "the quantized node has no name",
                     "the node named after its torch module (the record key, FORMATS §7)")
        wt = ix.const_dtype(layer.weight)
        w = ix.const_array(layer.weight)
        if wt != TensorProto.INT8:
            self.add("layer.weight_dtype", lab, f"weight {layer.weight!r} is {dtype_name(wt)}",
                     "an INT8 initializer q_w = clip(round(w / scale_w), -128, 127)")
        if layer.kind == "Conv" and w is not None and w.ndim < 3:
            self.add("layer.weight_shape", lab, f"Conv weight {layer.weight!r} has shape {list(w.shape)}",
                     "[C_out, C_in/group, kH, kW]")
        if layer.kind in ("Gemm", "MatMul") and w is not None and w.ndim != 2:
            self.add("layer.weight_shape", lab, f"{layer.kind} weight {layer.weight!r} has shape {list(w.shape)}",
                     "a 2-D weight [in, out]")
        if layer.kind == "Gemm":
            if attr_value(layer.node, "transB", 0) != 0:
                self.add("layer.gemm_transB", lab, "Gemm has transB = 1 (weight [out, in])",
                         "transB = 0 with the weight stored [in, out], the layout of existing deploy files", WARNING)
            for k in ("alpha", "beta"):
                val = attr_value(layer.node, k, 1.0)
                if val != 1.0:
                    self.add("layer.gemm_" + k, lab, f"Gemm {k} = {val}", f"{k} = 1 (scales live in deq_scale)")
            if attr_value(layer.node, "transA", 0) != 0:
                self.add("layer.gemm_transA", lab, "Gemm has transA = 1", "transA = 0", WARNING)
        c_out = layer.c_out(ix)
        if layer.bias is not None:
            bt = ix.const_dtype(layer.bias)
            b = ix.const_array(layer.bias)
            if bt != TensorProto.INT32:
                self.add("layer.bias_dtype", lab, f"bias {layer.bias!r} is {dtype_name(bt)}",
                         "an INT32 initializer bias_q = round(bias / (scale_w * scale_d))")
            if b is not None and c_out is not None and b.size not in (c_out,):
                self.add("layer.bias_shape", lab, f"bias {layer.bias!r} has {b.size} entries", f"{c_out} (one per output channel)")
        if layer.quant is None:
            p = ix.producer.get(layer.node.input[0])
            self.add("layer.missing_quant", lab,
                     "its data input comes from " + (f"{p.op_type} {node_label(p)!r}" if p is not None else
                                                     f"graph input {layer.node.input[0]!r}"),
                     f"an AscendQuant node ({LayerNames(layer.name).quant!r}) on the data input")
        if layer.dequant is None:
            cs = ix.consumers.get(layer.acc, [])
            what = ", ".join(f"{c.op_type} {node_label(c)!r}" for c in cs) or (
                "a graph output" if layer.acc in ix.output_names else "nothing")
            self.add("layer.missing_dequant", lab, f"its output {layer.acc!r} goes to {what}",
                     f"an AscendDequant node ({LayerNames(layer.name).dequant!r}) on the output"
                     + (" (after the bias Add)" if layer.kind == "MatMul" else ""))

    def run(self) -> PreflightResult:
        opset = self.check_opsets()
        self.layers = find_deploy_layers(self.ix)
        self.layers_nodes = [l.node for l in self.layers]
        self.check_nodes()
        by_dequant = {id(l.dequant): l for l in self.layers if l.dequant is not None}
        for n in self.model.graph.node:
            if n.op_type == ASCEND_QUANT:
                self.check_quant(n)
            elif n.op_type == ASCEND_DEQUANT:
                self.check_dequant(n, by_dequant.get(id(n)))
        for layer in self.layers:
            self.check_layer(layer)
        if not self.layers:
            self.add("model.no_quantized_layer", "graph", "no quantized layer (Conv/Gemm/MatMul with an int8 weight "
                     "between AscendQuant and AscendDequant) was found", "at least one quantized layer", WARNING)
        return PreflightResult(self.label, self.target.name, opset, [l.name for l in self.layers], self.findings)


def preflight(deploy_model, target: str | Target | None = None) -> PreflightResult:
    """Check a deploy model against FORMATS §5/§6 (what can be checked without ATC).

    ``deploy_model``: path, bytes or onnx.ModelProto. ``target``: ``A2`` (default), ``A3``, ``950`` or a
    Target. Returns a :class:`PreflightResult`; ``result.ok`` is False when any error was found.
    """
    tgt = target if isinstance(target, Target) else get_target(target)
    label = str(deploy_model) if not isinstance(deploy_model, (onnx.ModelProto, bytes, bytearray)) else (
        getattr(deploy_model, "graph", None) and deploy_model.graph.name or "<in-memory model>")
    model = load_model(deploy_model)
    return _Checker(model, tgt, label).run()


__all__ = ["preflight", "PreflightResult", "Finding", "REJECTED_OPS", "TargetError"]
