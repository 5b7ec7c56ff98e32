"""Helpers for the verify tests: real exports (cached per process), deploy / fake-quant pairs built by
hand from FORMATS §4/§5 with onnx.helper (independent of our exporter, some in another naming
style), and functions that break a deploy or fake-quant model in one specific way.

Every breaker returns a modified copy; the input model is never changed.
"""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from tests import models


# ---------------------------------------------------------------------------------------------
# real exports
# ---------------------------------------------------------------------------------------------
@dataclass
class Export:
    name: str
    model: torch.nn.Module  # the distilled (QAT) torch model
    example: torch.Tensor
    fake_quant: Path
    deploy: Path
    record: Path


@functools.lru_cache(maxsize=None)
def _export_dir() -> Path:
    d = Path(tempfile.mkdtemp(prefix="amct_verify_exports_"))
    atexit.register(shutil.rmtree, d, True)
    return d


@functools.lru_cache(maxsize=None)
def export(name: str, opset: int | None = None, target: str | None = None, batch: int = 2) -> Export:
    """Distill-wrap ``tests.models.build(name)`` (calibrated on its example input of ``batch``) and export
    it with ``save_distill_model``. Cached per process."""
    from amct_core import create_distill_config, create_distill_model, save_distill_model

    torch.manual_seed(0)
    d = _export_dir() / f"{name}_{opset}_{target}_{batch}"
    d.mkdir(parents=True, exist_ok=True)
    m = models.build(name)
    x = models.example_inputs(name, batch)
    cfg = d / "distill.json"
    create_distill_config(str(cfg), m, (x,))
    q = create_distill_model(str(cfg), m, (x,)).eval()
    kwargs = {}
    if opset is not None:
        kwargs["opset_version"] = opset
    if target is not None:
        kwargs["target"] = target
    save_distill_model(q, str(d / name), (x,), record_file=str(d / "record.txt"), **kwargs)
    return Export(name, q, x, d / f"{name}_fake_quant_model.onnx", d / f"{name}_deploy_model.onnx", d / "record.txt")


# ---------------------------------------------------------------------------------------------
# generic model surgery
# ---------------------------------------------------------------------------------------------
def copy(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m


def load(path) -> onnx.ModelProto:
    return onnx.load(str(path))


def _init(m: onnx.ModelProto, name: str) -> onnx.TensorProto:
    for t in m.graph.initializer:
        if t.name == name:
            return t
    raise KeyError(f"no initializer {name!r}")


def get_array(m: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(_init(m, name))


def set_array(m: onnx.ModelProto, name: str, arr: np.ndarray) -> None:
    _init(m, name).CopyFrom(numpy_helper.from_array(np.asarray(arr), name))


def node(m: onnx.ModelProto, name: str) -> onnx.NodeProto:
    for n in m.graph.node:
        if n.name == name:
            return n
    raise KeyError(f"no node {name!r}")


# ---------------------------------------------------------------------------------------------
# corrupted values (deploy model): the simulation must catch each
# ---------------------------------------------------------------------------------------------
def corrupt_weight(deploy: onnx.ModelProto, layer: str, index: int = 0, delta: int = 37) -> onnx.ModelProto:
    """Change one int8 weight value of ``layer`` (wrapping inside int8)."""
    m = copy(deploy)
    w = get_array(m, node(m, layer).input[1]).copy()
    flat = w.reshape(-1)
    flat[index] = np.int8(((int(flat[index]) + 128 + delta) % 256) - 128)
    set_array(m, node(m, layer).input[1], w)
    return m


def _bias_name(m: onnx.ModelProto, layer: str) -> str:
    n = node(m, layer)
    if n.op_type == "MatMul":
        return node(m, f"{layer}.bias_add").input[1]
    return n.input[2]


def corrupt_bias(deploy: onnx.ModelProto, layer: str, index: int = 0, delta: int = 1000) -> onnx.ModelProto:
    m = copy(deploy)
    name = _bias_name(m, layer)
    b = get_array(m, name).copy()
    b.reshape(-1)[index] += np.int32(delta)
    set_array(m, name, b)
    return m


def deq_param_name(m: onnx.ModelProto, layer: str) -> str:
    return node(m, f"{layer}.dequant").input[1]


def corrupt_deq_scale(deploy: onnx.ModelProto, layer: str, index: int = 0, factor: float = 1.01) -> onnx.ModelProto:
    """Scale one deq_scale entry's float32 (kept in the low 32 bits, high bits 0)."""
    m = copy(deploy)
    name = deq_param_name(m, layer)
    u = get_array(m, name).astype(np.uint64).copy()
    f = (u & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.float32).copy()
    f[index] = np.float32(f[index] * factor)
    set_array(m, name, f.view(np.uint32).astype(np.uint64))
    return m


# ---------------------------------------------------------------------------------------------
# structurally broken deploy files: preflight must report each
# ---------------------------------------------------------------------------------------------
def two_opset_imports(deploy: onnx.ModelProto, domain: str = "amct_trace", version: int = 1) -> onnx.ModelProto:
    m = copy(deploy)
    m.opset_import.append(helper.make_opsetid(domain, version))
    return m


def ascend_ops_in_custom_domain(deploy: onnx.ModelProto, domain: str = "ascend") -> onnx.ModelProto:
    m = copy(deploy)
    for n in m.graph.node:
        if n.op_type in ("AscendQuant", "AscendDequant"):
            n.domain = domain
    m.opset_import.append(helper.make_opsetid(domain, 1))
    return m


def float_weights(deploy: onnx.ModelProto, layer: str) -> onnx.ModelProto:
    m = copy(deploy)
    name = node(m, layer).input[1]
    set_array(m, name, get_array(m, name).astype(np.float32))
    return m


def float_bias(deploy: onnx.ModelProto, layer: str) -> onnx.ModelProto:
    m = copy(deploy)
    name = _bias_name(m, layer)
    set_array(m, name, get_array(m, name).astype(np.float32))
    return m


def nonzero_high_bits(deploy: onnx.ModelProto, layer: str, index: int = 0, bits: int = 1 << 40) -> onnx.ModelProto:
    m = copy(deploy)
    name = deq_param_name(m, layer)
    u = get_array(m, name).astype(np.uint64).copy()
    u[index] |= np.uint64(bits)
    set_array(m, name, u)
    return m


def float_deq_scale(deploy: onnx.ModelProto, layer: str) -> onnx.ModelProto:
    m = copy(deploy)
    name = deq_param_name(m, layer)
    u = get_array(m, name).astype(np.uint64)
    set_array(m, name, (u & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.float32))
    return m


def missing_dequant(deploy: onnx.ModelProto, layer: str) -> onnx.ModelProto:
    """Drop ``<layer>.dequant``: its consumers read the int32 accumulator directly."""
    m = copy(deploy)
    dq = node(m, f"{layer}.dequant")
    acc, out = dq.input[0], dq.output[0]
    m.graph.node.remove(dq)
    for n in m.graph.node:
        for i, x in enumerate(n.input):
            if x == out:
                n.input[i] = acc
    for o in m.graph.output:
        if o.name == out:
            o.name = acc
    return m


def missing_quant(deploy: onnx.ModelProto, layer: str) -> onnx.ModelProto:
    """The layer reads the float tensor instead of its AscendQuant's output."""
    m = copy(deploy)
    n = node(m, layer)
    q = next(p for p in m.graph.node if n.input[0] in p.output)
    n.input[0] = q.input[0]
    if not any(q.output[0] in c.input for c in m.graph.node):
        m.graph.node.remove(q)
    return m


def with_rejected_op(deploy: onnx.ModelProto, op: str = "DynamicQuantizeLinear") -> onnx.ModelProto:
    """Insert an op ATC rejects, on the first graph input (outputs unused)."""
    m = copy(deploy)
    x = m.graph.input[0].name
    outs = ["rej_y", "rej_scale", "rej_zp"] if op == "DynamicQuantizeLinear" else ["rej_y"]
    m.graph.node.insert(0, helper.make_node(op, [x], outs, name=f"rejected.{op}"))
    return m


def bad_quant_attributes(deploy: onnx.ModelProto, quant: str) -> onnx.ModelProto:
    """``scale`` as an INT attribute, ``dst_type`` missing."""
    m = copy(deploy)
    n = node(m, quant)
    keep = [a for a in n.attribute if a.name not in ("scale", "dst_type")]
    del n.attribute[:]
    n.attribute.extend(keep + [helper.make_attribute("scale", 3)])
    return m


def opset_version(deploy: onnx.ModelProto, version: int) -> onnx.ModelProto:
    m = copy(deploy)
    for o in m.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = version
    return m


# ---------------------------------------------------------------------------------------------
# fake-quant perturbations: parity must catch each
# ---------------------------------------------------------------------------------------------
def perturb_fake_quant(fake_quant: onnx.ModelProto, initializer: str, factor: float) -> onnx.ModelProto:
    m = copy(fake_quant)
    set_array(m, initializer, (get_array(m, initializer) * np.float32(factor)).astype(np.float32))
    return m


def flip_fake_quant_weight(fake_quant: onnx.ModelProto, layer: str) -> onnx.ModelProto:
    """Negate the int8 weight of ``layer`` with the largest magnitude (the fake-quant model keeps the
    weight grid as float32 integers): one sign bit wrong."""
    m = copy(fake_quant)
    name = node(m, layer).input[1]
    w = get_array(m, name).copy()
    i = int(np.argmax(np.abs(w)))
    w.reshape(-1)[i] = -w.reshape(-1)[i]
    set_array(m, name, w)
    return m


def shift_fake_quant_bias(fake_quant: onnx.ModelProto, layer: str, delta: float = 1000.0) -> onnx.ModelProto:
    """Move the first int32 bias value of ``layer`` (kept as float32 integers) by ``delta`` accumulator steps."""
    m = copy(fake_quant)
    name = _bias_name(m, layer)
    b = get_array(m, name).copy()
    b.reshape(-1)[0] += np.float32(delta)
    set_array(m, name, b)
    return m


# ---------------------------------------------------------------------------------------------
# hand-built pairs (FORMATS §4/§5), not made by our exporter
# ---------------------------------------------------------------------------------------------
def _q(x, inv, off):
    return np.clip(np.round(x * inv) + off, -128, 127)


def hand_built_pair(*, c_in: int = 4, c_out: int = 6, k: int = 3, stride: int = 1, pad: int = 1, dilation: int = 1,
                    groups: int = 1, hw: int = 9, hidden: int = 5, seed: int = 0, style: str = "ours",
                    opset: int = 11, batch: int = 2,
                    explicit_quant_defaults: bool = False) -> tuple[onnx.ModelProto, onnx.ModelProto, dict]:
    """x -> Conv 'features.0' -> Relu -> GlobalAveragePool -> Flatten -> Gemm 'classifier' -> y, quantized per spec.

    ``style='amct'`` varies everything the spec leaves free: deq_scale initializers named otherwise,
    Gemm with transB=1 ([out, in] weight), the fake-quant chain with different node names. Both styles
    write AscendQuant as AMCT does (scale, offset, dst_type); ``explicit_quant_defaults`` adds the
    optional ``sqrt_mode=0`` and ``round_mode="Round"`` that ATC also reads. Returns (fake_quant,
    deploy, info)."""
    rng = np.random.default_rng(seed)
    conv_name, fc_name = "features.0", "classifier"
    # conv factors
    s_d1, off1 = np.float32(6.0 / 255), -43  # range [-1.0118, 4.988]
    w1 = rng.integers(-127, 128, (c_out, c_in // groups, k, k)).astype(np.int8)
    s_w1 = (rng.uniform(0.5, 2.0, c_out) / 127).astype(np.float32)
    deq1 = (s_d1 * s_w1).astype(np.float32)
    b1 = rng.integers(-5000, 5000, c_out).astype(np.int32)
    # head factors (ReLU output: offset -128)
    s_d2, off2 = np.float32(0.02), -128
    w2 = rng.integers(-127, 128, (c_out, hidden)).astype(np.int8)  # [in, out]
    s_w2 = np.float32(0.9 / 127)
    deq2 = np.asarray([s_d2 * s_w2], np.float32)
    b2 = rng.integers(-300, 300, hidden).astype(np.int32)
    x_vi = helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, c_in, hw, hw])
    y_vi = helper.make_tensor_value_info("output", TensorProto.FLOAT, [batch, hidden])
    conv_attrs = dict(kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4, dilations=[dilation, dilation],
                      group=groups)
    amct = style == "amct"
    gemm_w_deploy = np.ascontiguousarray(w2.T) if amct else w2
    gemm_attrs = {"transB": 1} if amct else {"transB": 0}

    def fq_chain(prefix, x, inv, off):
        p = prefix if not amct else prefix.replace(".quant.fakequant", "_fq")
        inits = [numpy_helper.from_array(np.float32(inv), f"{p}.scale"),
                 numpy_helper.from_array(np.float32(off), f"{p}.offset"),
                 numpy_helper.from_array(np.float32(-128), f"{p}.min"),
                 numpy_helper.from_array(np.float32(127), f"{p}.max")]
        nodes = [helper.make_node("Mul", [x, f"{p}.scale"], [f"{p}.m"], name=f"{p}.mul"),
                 helper.make_node("Round", [f"{p}.m"], [f"{p}.r"], name=f"{p}.round"),
                 helper.make_node("Add", [f"{p}.r", f"{p}.offset"], [f"{p}.a"], name=f"{p}.add"),
                 helper.make_node("Clip", [f"{p}.a", f"{p}.min", f"{p}.max"], [f"{p}.c"], name=f"{p}.clip"),
                 helper.make_node("Sub", [f"{p}.c", f"{p}.offset"], [f"{p}.out"], name=f"{p}.sub")]
        return nodes, inits, f"{p}.out"

    inv1, inv2 = np.float32(1) / s_d1, np.float32(1) / s_d2
    # ---- fake-quant
    n1, i1, g1 = fq_chain(f"{conv_name}.quant.fakequant", "input", inv1, off1)
    n2, i2, g2 = fq_chain(f"{fc_name}.quant.fakequant", "flat", inv2, off2)
    fq_nodes = n1 + [
        helper.make_node("Conv", [g1, "features.0.weight", "features.0.bias"], ["c_acc"], name=conv_name, **conv_attrs),
        helper.make_node("Mul", ["c_acc", "features.0.fakedequant.deq_scale"], ["c_out"], name="features.0.fakedequant.mul"),
        helper.make_node("Relu", ["c_out"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["flat"], name="flatten", axis=1),
    ] + n2 + [
        helper.make_node("Gemm", [g2, "classifier.weight", "classifier.bias"], ["g_acc"], name=fc_name, transB=0),
        helper.make_node("Mul", ["g_acc", "classifier.fakedequant.deq_scale"], ["output"], name="classifier.fakedequant.mul"),
    ]
    fq_inits = i1 + i2 + [
        numpy_helper.from_array(w1.astype(np.float32), "features.0.weight"),
        numpy_helper.from_array(b1.astype(np.float32), "features.0.bias"),
        numpy_helper.from_array(deq1.reshape(1, c_out, 1, 1), "features.0.fakedequant.deq_scale"),
        numpy_helper.from_array(w2.astype(np.float32), "classifier.weight"),
        numpy_helper.from_array(b2.astype(np.float32), "classifier.bias"),
        numpy_helper.from_array(deq2.reshape(1, 1), "classifier.fakedequant.deq_scale"),
    ]
    fq = helper.make_model(helper.make_graph(fq_nodes, "hand_fq", [x_vi], [y_vi], fq_inits),
                           opset_imports=[helper.make_opsetid("", max(opset, 11))])
    fq.ir_version = 7

    # ---- deploy
    def pack(d):
        return np.ascontiguousarray(d, np.float32).view(np.uint32).astype(np.uint64)

    def quant_node(name, x, y, inv, off):
        attrs = dict(scale=float(inv), offset=float(off), dst_type="INT8")
        if explicit_quant_defaults:
            attrs.update(sqrt_mode=0, round_mode="Round")
        return helper.make_node("AscendQuant", [x], [y], name=name, **attrs)

    p1 = "features.0.dequant.param" if not amct else "features.0_deq_scale"
    p2 = "classifier.dequant.param" if not amct else "classifier_deq_scale"
    d_nodes = [
        quant_node("features.0.quant", "input", "xq1", inv1, off1),
        helper.make_node("Conv", ["xq1", "features.0.weight", "features.0.bias"], ["c_acc"], name=conv_name, **conv_attrs),
        helper.make_node("AscendDequant", ["c_acc", p1], ["c_out"], name="features.0.dequant", dtype=0),
        helper.make_node("Relu", ["c_out"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["flat"], name="flatten", axis=1),
        quant_node("classifier.quant", "flat", "xq2", inv2, off2),
        helper.make_node("Gemm", ["xq2", "classifier.weight", "classifier.bias"], ["g_acc"], name=fc_name, **gemm_attrs),
        helper.make_node("AscendDequant", ["g_acc", p2], ["output"], name="classifier.dequant", dtype=0),
    ]
    d_inits = [
        numpy_helper.from_array(w1, "features.0.weight"),
        numpy_helper.from_array(b1, "features.0.bias"),
        numpy_helper.from_array(pack(deq1), p1),
        numpy_helper.from_array(gemm_w_deploy, "classifier.weight"),
        numpy_helper.from_array(b2, "classifier.bias"),
        numpy_helper.from_array(pack(deq2), p2),
    ]
    dep = helper.make_model(helper.make_graph(d_nodes, "hand_deploy", [x_vi], [y_vi], d_inits),
                            opset_imports=[helper.make_opsetid("", opset)])
    dep.ir_version = 7
    info = {"conv": conv_name, "fc": fc_name, "w1": w1, "b1": b1, "inv1": inv1, "off1": off1, "deq1": deq1,
            "conv_attrs": conv_attrs, "K": (c_in // groups) * k * k}
    return fq, dep, info


def quant_probe_pair(values: np.ndarray, scale: float, offset: int) -> onnx.ModelProto:
    """A deploy model whose only layer is a 1x1 Conv with weight 1: its int32 accumulator is exactly
    AscendQuant's output minus the offset, for inspecting the quantization arithmetic."""
    x = np.asarray(values, np.float32).reshape(1, 1, 1, -1)
    d_nodes = [
        helper.make_node("AscendQuant", ["x"], ["xq"], name="probe.quant", scale=float(scale), offset=float(offset),
                         dst_type="INT8"),
        helper.make_node("Conv", ["xq", "probe.weight"], ["acc"], name="probe", kernel_shape=[1, 1]),
        helper.make_node("AscendDequant", ["acc", "probe.dequant.param"], ["y"], name="probe.dequant", dtype=0),
    ]
    inits = [numpy_helper.from_array(np.ones((1, 1, 1, 1), np.int8), "probe.weight"),
             numpy_helper.from_array(np.ones(1, np.float32).view(np.uint32).astype(np.uint64), "probe.dequant.param")]
    m = helper.make_model(helper.make_graph(
        d_nodes, "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits),
        opset_imports=[helper.make_opsetid("", 11)])
    m.ir_version = 7
    return m


def reference_quant(x: np.ndarray, scale: float, offset: int, device: bool = False) -> np.ndarray:
    """Exact arithmetic on the float32 product t = x*scale, round half to even: training / fake-quant
    (FORMATS §3/§4) clip(round(t) + offset); the device's AscendQuant (§5) clip(round(t + offset))."""
    t = (np.asarray(x, np.float32) * np.float32(scale)).astype(np.float64)
    if device:
        return np.clip(np.round(t + offset), -128, 127)
    return np.clip(np.round(t) + offset, -128, 127)
