"""Deploy simulation: run a deploy model (FORMATS §5) on the CPU exactly as the device defines it.

The deploy model is rewritten, in memory, into a graph of standard ONNX ops that ONNX Runtime runs:

* ``AscendQuant(x; scale, offset)`` -> ``t = x * scale`` in float32 (the device's data type), then
  ``clip(round(t + offset), -128, 127)`` evaluated exactly in float64 (round half to even, or the node's
  ``round_mode``), cast to **int8**.
* the quantized ``Conv`` / ``Gemm`` / ``MatMul`` -> ``ConvInteger`` / ``MatMulInteger`` on the int8 data
  (zero point = the AscendQuant's offset, so padding is (q - offset) = 0) and the **int8** weight, with
  **int32** accumulation, plus the **int32** bias (an int32 ``Add``).
* ``AscendDequant(acc, deq_scale)`` -> ``float32(acc) * deq_scale`` with deq_scale unpacked from the low
  32 bits of the uint64 initializer (``sqrt_mode`` squares it, ``relu_flag`` applies a ReLU, ``dtype=1``
  casts to float16).

Everything else in the graph runs as it is. The int32 accumulator of every quantized layer is an
output of the simulation, and :func:`compare_deploy` checks it against the fake-quant model's
pre-dequant output, integer for integer.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import AmctError
from ..formats import (
    ASCEND_DEQUANT,
    ASCEND_QUANT,
    DEQUANT_FLOAT16,
    DEQUANT_FLOAT32,
    INT8_MAX,
    INT8_MIN,
    LayerNames,
    unpack_deq_scale,
)
from ._graph import (
    DeployLayer,
    FakeQuantLayer,
    GraphIndex,
    attr_value,
    fake_quant_layer,
    find_deploy_layers,
    load_model,
    node_label,
    with_extra_outputs,
)
from ._outcome import Outcome
from ._run import explain_size_failure, feeds_for, generate_inputs, remap_feeds, run
from .tolerances import Tolerances, as_tolerances

SIM_MIN_OPSET = 10  # ConvInteger / MatMulInteger
F32_EXACT = 2.0 ** 24  # integers up to this magnitude are exact in float32
U32 = 2.0 ** -24  # unit roundoff of float32


class SimulationError(AmctError, ValueError):
    """The deploy model cannot be simulated; the message names the node and what is expected."""


@dataclass
class SimLayer:
    name: str
    kind: str
    quant: str  # AscendQuant node name
    quant_output: str  # int8 tensor
    quant_input: str  # the float tensor AscendQuant reads
    offset: int
    acc: str  # int32 accumulator tensor (after the bias)
    output: str  # dequant output tensor
    deq_scale: np.ndarray  # float32 per channel (or 1)
    channel_axis: int  # of the layer's output
    n_terms: int  # products summed per output element (+1 with a bias)
    abs_acc: str | None = None  # tensor bounding every partial sum, when float32 may be inexact


@dataclass
class Simulation:
    model: onnx.ModelProto
    layers: list[SimLayer]
    opset: int

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return run(self.model, remap_feeds(feeds, self.model), "disabled")


def _c(name: str, arr) -> TensorProto:
    return numpy_helper.from_array(np.asarray(arr), name)


class _Rewriter:
    def __init__(self, model: onnx.ModelProto, with_bounds: bool, quant_rounding: str = "device"):
        self.src = model
        self.ix = GraphIndex(model)
        self.with_bounds = with_bounds
        self.quant_rounding = quant_rounding
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.used: set[str] = {t.name for t in model.graph.initializer}
        for n in model.graph.node:
            self.used.update(n.output)
        self.quant_info: dict[str, tuple[str, int, str]] = {}  # AscendQuant output -> (node name, offset, input)
        self.layers: list[SimLayer] = []

    def fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self.used:
            name = f"{base}_{k}"
            k += 1
        self.used.add(name)
        return name

    def const(self, base: str, arr) -> str:
        name = self.fresh(base)
        self.inits.append(_c(name, arr))
        return name

    def node(self, op, inputs, output=None, base="sim", **attrs) -> str:
        out = output or self.fresh(f"{base}.{op.lower()}_output")
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.fresh(f"{base}.sim.{op.lower()}"), **attrs))
        return out

    # ---- AscendQuant -------------------------------------------------------------------------
    def quant(self, n: onnx.NodeProto) -> None:
        lab = node_label(n)
        scale, offset = attr_value(n, "scale"), attr_value(n, "offset")
        if scale is None or offset is None:
            raise SimulationError(f"AscendQuant {lab!r} lacks attribute 'scale' or 'offset' (FORMATS §5); run preflight")
        if not float(offset).is_integer() or not INT8_MIN <= offset <= INT8_MAX:
            raise SimulationError(f"AscendQuant {lab!r}: offset {offset!r} is not an integer in [{INT8_MIN}, {INT8_MAX}]")
        sqrt_mode = attr_value(n, "sqrt_mode", 0)
        mode = attr_value(n, "round_mode", b"Round")
        mode = mode.decode() if isinstance(mode, bytes) else str(mode)
        b = lab
        x = self.node("Cast", [n.input[0]], base=b, to=TensorProto.FLOAT)
        s = self.const(f"{b}.sim.scale", np.float32(scale))
        t = self.node("Mul", [x, s], base=b)
        if sqrt_mode:
            t = self.node("Mul", [t, s], base=b)
        v = self.node("Cast", [t], base=b, to=TensorProto.DOUBLE)
        off = self.const(f"{b}.sim.offset", np.float64(offset))
        if self.quant_rounding == "device":  # FORMATS §5: round(x * scale + offset)
            r = self.round(self.node("Add", [v, off], base=b), mode, b, lab)
        else:  # FORMATS §3/§4 (training, fake-quant): round(x * scale) + offset
            r = self.node("Add", [self.round(v, mode, b, lab), off], base=b)
        r = self.node("Max", [r, self.const(f"{b}.sim.qmin", np.float64(INT8_MIN))], base=b)
        r = self.node("Min", [r, self.const(f"{b}.sim.qmax", np.float64(INT8_MAX))], base=b)
        self.node("Cast", [r], output=n.output[0], base=b, to=TensorProto.INT8)
        self.quant_info[n.output[0]] = (lab, int(offset), n.input[0])

    def round(self, v: str, mode: str, b: str, lab: str) -> str:
        """Exact rounding of float64 values with Floor (all opsets): half to even for 'Round'."""
        if mode == "Floor":
            return self.node("Floor", [v], base=b)
        if mode == "Ceil":
            return self.node("Ceil", [v], base=b)
        if mode == "Trunc":
            return self.node("Mul", [self.node("Sign", [v], base=b),
                                     self.node("Floor", [self.node("Abs", [v], base=b)], base=b)], base=b)
        if mode != "Round":
            raise SimulationError(f"AscendQuant {lab!r}: round_mode {mode!r} is not one of Round/Floor/Ceil/Trunc")
        half = self.const(f"{b}.sim.half", np.float64(0.5))
        two = self.const(f"{b}.sim.two", np.float64(2.0))
        f = self.node("Floor", [self.node("Add", [v, half], base=b)], base=b)  # nearest, ties up
        d = self.node("Sub", [f, v], base=b)  # in (-0.5, 0.5]; 0.5 exactly on ties
        tie = self.node("Relu", [self.node("Floor", [self.node("Mul", [d, two], base=b)], base=b)], base=b)
        half_f = self.node("Floor", [self.node("Mul", [f, half], base=b)], base=b)
        odd = self.node("Sub", [f, self.node("Mul", [half_f, two], base=b)], base=b)  # 1 if f is odd
        return self.node("Sub", [f, self.node("Mul", [tie, odd], base=b)], base=b)

    # ---- quantized layers --------------------------------------------------------------------
    def layer(self, L: DeployLayer) -> None:
        ix = self.ix
        n = L.node
        lab = node_label(n)
        if L.quant is None or L.dequant is None:
            raise SimulationError(f"layer {lab!r} is not wrapped by AscendQuant/AscendDequant; run preflight")
        w = ix.const_array(L.weight)
        if w is None or w.dtype != np.int8:
            raise SimulationError(f"layer {lab!r}: weight {L.weight!r} is {None if w is None else w.dtype}, expected int8")
        xq = n.input[0]
        if xq not in self.quant_info:
            raise SimulationError(f"layer {lab!r}: its AscendQuant {node_label(L.quant)!r} comes after it in the graph")
        qname, offset, q_in = self.quant_info[xq]
        zp = self.const(f"{lab}.sim.x_zero_point", np.int8(offset))
        bias = None
        if L.bias is not None:
            bias = ix.const_array(L.bias)
            if bias is None or bias.dtype != np.int32:
                raise SimulationError(f"layer {lab!r}: bias {L.bias!r} is {None if bias is None else bias.dtype}, expected int32")
        deq_t = ix.const_array(L.dequant.input[1]) if len(L.dequant.input) > 1 else None
        if deq_t is None or deq_t.dtype != np.uint64:
            raise SimulationError(f"AscendDequant {node_label(L.dequant)!r}: deq_scale is not a uint64 initializer")
        deq, _ = unpack_deq_scale(deq_t)
        c_out = L.c_out(ix)
        out = n.output[0]
        if L.kind == "Conv":
            attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            k_terms = int(np.prod(w.shape[1:]))
            acc_in = self.fresh(f"{lab}.sim.acc_nobias") if bias is not None else out
            self.node("ConvInteger", [xq, L.weight, zp], output=acc_in, base=lab, **attrs)
            if bias is not None:
                bshape = [1, bias.size] + [1] * (w.ndim - 2)
                self.node("Add", [acc_in, self.const(f"{lab}.sim.bias", bias.reshape(bshape))], output=out, base=lab)
            channel_axis = 1
            wname = L.weight
        else:
            a = xq
            wname = L.weight
            if L.kind == "Gemm":
                for k in ("alpha", "beta"):
                    if attr_value(n, k, 1.0) != 1.0:
                        raise SimulationError(f"Gemm {lab!r}: {k} = {attr_value(n, k)} cannot be simulated in integers; expected 1")
                if attr_value(n, "transA", 0):
                    a = self.node("Transpose", [a], base=lab, perm=[1, 0])
                if attr_value(n, "transB", 0):  # transposed in the graph: no second copy of the weight
                    wname = self.node("Transpose", [wname], base=lab, perm=[1, 0])
                    w = w.T
            k_terms = int(w.shape[0]) if w.ndim == 2 else int(w.shape[-2])
            acc_in = self.fresh(f"{lab}.sim.acc_nobias") if (bias is not None and L.kind == "Gemm") else out
            self.node("MatMulInteger", [a, wname, zp], output=acc_in, base=lab)
            if bias is not None and L.kind == "Gemm":
                self.node("Add", [acc_in, self.const(f"{lab}.sim.bias", bias.reshape(-1))], output=out, base=lab)
            # MatMul: the bias Add node stays as it is (int32 + int32)
            channel_axis = -1
        n_terms = k_terms + (1 if bias is not None else 0)
        bmax = float(np.max(np.abs(bias.astype(np.int64)))) if bias is not None and bias.size else 0.0
        abs_acc = None
        if self.with_bounds and k_terms * 255.0 * 128.0 + bmax > F32_EXACT:
            abs_acc = self.abs_bound(L, lab, xq, offset, wname, w.ndim, bias, a if L.kind != "Conv" else None)
        self.layers.append(SimLayer(
            name=L.name, kind=L.kind, quant=qname, quant_output=xq, quant_input=q_in, offset=offset, acc=L.acc,
            output=L.dequant.output[0], deq_scale=deq, channel_axis=channel_axis, n_terms=n_terms, abs_acc=abs_acc,
        ))
        if c_out is not None and deq.size not in (1, c_out):
            raise SimulationError(f"AscendDequant {node_label(L.dequant)!r}: {deq.size} deq_scale entries for {c_out} channels")

    def abs_bound(self, L, lab, xq, offset, weight, w_rank, bias, a_override) -> str:
        """sum_k |x_k - offset| * |w_k| + |bias|: bounds every partial sum of the layer's accumulation.

        |w| is computed in the graph from the int8 weight (int16 so that |-128| fits), so the simulation
        holds no second weight-sized constant; the runtime makes it when the layer runs, and frees it."""
        xi = self.node("Cast", [a_override or xq], base=lab, to=TensorProto.INT32)
        xi = self.node("Sub", [xi, self.const(f"{lab}.sim.off32", np.int32(offset))], base=lab)
        xa = self.node("Cast", [self.node("Abs", [xi], base=lab)], base=lab, to=TensorProto.UINT8)
        w16 = self.node("Cast", [weight], base=lab, to=TensorProto.INT16)
        wa = self.node("Cast", [self.node("Abs", [w16], base=lab)], base=lab, to=TensorProto.UINT8)
        if L.kind == "Conv":
            attrs = {a.name: helper.get_attribute_value(a) for a in L.node.attribute}
            s = self.node("ConvInteger", [xa, wa], base=lab, **attrs)
        else:
            s = self.node("MatMulInteger", [xa, wa], base=lab)
        if bias is not None:
            b = np.abs(bias.astype(np.int64)).astype(np.int32)
            if L.kind == "Conv":
                b = b.reshape([1, b.size] + [1] * (w_rank - 2))
            s = self.node("Add", [s, self.const(f"{lab}.sim.bias_abs", b.reshape(b.shape if L.kind == "Conv" else -1))], base=lab)
        return s

    # ---- AscendDequant -----------------------------------------------------------------------
    def dequant(self, n: onnx.NodeProto, L: SimLayer | None) -> None:
        lab = node_label(n)
        if L is None:
            raise SimulationError(f"AscendDequant {lab!r} does not follow a quantized layer; run preflight")
        deq = L.deq_scale.astype(np.float32)
        if deq.size > 1 and L.channel_axis == 1:
            w = self.ix.const_array(self.ix.nodes_named(L.name)[0].input[1]) if self.ix.nodes_named(L.name) else None
            rank = w.ndim if w is not None else 4
            deq = deq.reshape([1, deq.size] + [1] * (rank - 2))
        y = self.node("Cast", [n.input[0]], base=lab, to=TensorProto.FLOAT)
        d = self.const(f"{lab}.sim.deq_scale", deq)
        y = self.node("Mul", [y, d], base=lab)
        if attr_value(n, "sqrt_mode", 0):
            y = self.node("Mul", [y, d], base=lab)
        if attr_value(n, "relu_flag", 0):
            y = self.node("Relu", [y], base=lab)
        if attr_value(n, "dtype", DEQUANT_FLOAT32) == DEQUANT_FLOAT16:
            y = self.node("Cast", [y], base=lab, to=TensorProto.FLOAT16)
        self.node("Identity", [y], output=n.output[0], base=lab)


def build_simulation(deploy_model, with_bounds: bool = True, quant_rounding: str = "device") -> Simulation:
    """Rewrite a deploy model into an ONNX Runtime-runnable model (see the module docstring).

    ``quant_rounding``: ``"device"`` rounds ``x * scale + offset`` as FORMATS §5 defines AscendQuant;
    ``"training"`` rounds ``x * scale`` and adds the offset after, as training and the fake-quant model
    do (§3/§4). The two differ only where ``x * scale`` is exactly halfway between two integers and
    the offset is odd (round half to even moves to the other neighbour).

    Raises SimulationError naming the node when the file cannot be simulated (run preflight for
    the full list of what is wrong)."""
    src = load_model(deploy_model)
    ix = GraphIndex(src)
    opset = ix.opset()
    if opset is None:
        raise SimulationError("the deploy model has no default-domain opset_import entry")
    if opset < SIM_MIN_OPSET:
        src = _upgrade_opset(src, SIM_MIN_OPSET)
        ix = GraphIndex(src)
    layers = {id(L.node): L for L in find_deploy_layers(ix)}
    if quant_rounding not in ("device", "training"):
        raise ValueError(f"quant_rounding must be 'device' or 'training', got {quant_rounding!r}")
    rw = _Rewriter(src, with_bounds, quant_rounding)
    rw.ix = ix
    by_dequant: dict[int, DeployLayer] = {id(L.dequant): L for L in layers.values() if L.dequant is not None}
    sim_by_name: dict[str, SimLayer] = {}
    for n in src.graph.node:
        if n.op_type == ASCEND_QUANT:
            rw.quant(n)
        elif id(n) in layers:
            rw.layer(layers[id(n)])
            sim_by_name[n.name] = rw.layers[-1]
        elif n.op_type == ASCEND_DEQUANT:
            L = by_dequant.get(id(n))
            rw.dequant(n, sim_by_name.get(L.name) if L is not None else None)
        else:
            rw.nodes.append(n)
    m = onnx.ModelProto()
    m.CopyFrom(src)
    g = m.graph
    del g.node[:]
    g.node.extend(rw.nodes)
    g.initializer.extend(rw.inits)
    del g.value_info[:]
    keep = [o for o in m.opset_import if o.domain not in ("", "ai.onnx")]
    del m.opset_import[:]
    m.opset_import.extend([helper.make_opsetid("", max(opset, SIM_MIN_OPSET))] + keep)
    m.ir_version = max(int(m.ir_version), 5)  # opset >= 10 needs IR version 5
    for nd in g.node:
        if nd.op_type in (ASCEND_QUANT, ASCEND_DEQUANT):
            raise SimulationError(f"{nd.op_type} {node_label(nd)!r} is not attached to a quantized layer; run preflight")
    return Simulation(m, rw.layers, opset)


def _upgrade_opset(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """Convert an opset 8/9 deploy model to ``target`` with ONNX's version converter; the Ascend ops are
    moved to a private domain meanwhile so the converter leaves them alone."""
    from onnx import version_converter
    m = onnx.ModelProto()
    m.CopyFrom(model)
    dom = "amct.verify.ascend"
    moved = []
    for n in m.graph.node:
        if n.op_type in (ASCEND_QUANT, ASCEND_DEQUANT) and n.domain in ("", "ai.onnx"):
            n.domain = dom
            moved.append(n.name)
    m.opset_import.append(helper.make_opsetid(dom, 1))
    m.ir_version = max(int(m.ir_version), 4)  # IR 3 would want every initializer listed as a graph input
    try:
        conv = version_converter.convert_version(m, target)
    except Exception as e:  # noqa: BLE001
        raise SimulationError(f"the deploy model's opset is below {target} and ONNX's version converter could not "
                              f"raise it ({e}); simulate an export at opset >= {target}") from e
    for n in conv.graph.node:
        if n.domain == dom:
            n.domain = ""
    keep = [o for o in conv.opset_import if o.domain != dom]
    del conv.opset_import[:]
    conv.opset_import.extend(keep)
    return conv


# =============================================================================================
# Deploy simulation vs fake-quant model
# =============================================================================================
@dataclass
class DeployLayerResult:
    name: str
    kind: str
    ok: bool
    failed_figure: str | None
    message: str
    elements: int
    input_grid_mismatches: int
    acc_mismatches: int  # elements outside the allowed slack
    acc_exact_fraction: float
    acc_max_abs_diff: float
    acc_max_abs: float
    acc_allowed_slack: float  # max allowed |diff| over the layer (0 where float32 is exact)
    acc_int32_overflow_risk: bool
    acc_abs_sum_max: float  # max over outputs of sum |x - offset| * |w| + |bias| (bounds every partial sum)
    dequant_max_abs_diff: float
    dequant_max_rel_diff: float
    dequant_violations: int
    static: dict = field(default_factory=dict)
    #: the layer's float input already differs from the fake-quant model's (an upstream layer failed)
    inherited: bool = False
    input_max_rel_diff: float | None = None
    order: int = 0
    #: inputs where the device's AscendQuant (round(x*scale + offset), §5) gives another int8 value than
    #: training / fake-quant (round(x*scale) + offset): exact ties with an odd offset. Reported, not failed.
    device_tie_differences: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DeployOutputResult:
    name: str
    ok: bool
    max_abs_diff: float
    ref_max_abs: float
    allowed: float
    identical: bool

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DeployCheckResult(Outcome):
    ok: bool
    message: str
    layers: list[DeployLayerResult]
    outputs: list[DeployOutputResult]
    problems: list[str]
    opset: int | None
    inputs: dict
    notes: list[str] = field(default_factory=list)  # information that does not fail the check

    @property
    def worst_layer(self) -> DeployLayerResult | None:
        return self.layers_sorted()[0] if self.layers else None

    def layers_sorted(self) -> list[DeployLayerResult]:
        return sorted(self.layers, key=_deploy_badness)

    def to_dict(self) -> dict:
        return {
            "ok": self.ok, "message": self.message, "opset": self.opset, "problems": list(self.problems),
            "notes": list(self.notes),
            "inputs": self.inputs,
            "layer_order": LAYER_ORDER,
            "layers": [l.to_dict() for l in self.layers_sorted()],
            "outputs": [o.to_dict() for o in self.outputs],
        }


LAYER_ORDER = ("worst first: failing layers whose own data is wrong, in graph order; then failures inherited "
               "from upstream; then passing layers by largest accumulator difference")


def _deploy_badness(r: DeployLayerResult) -> tuple:
    """Sort key, worst first: failing layers whose own data is wrong (their input agrees with the
    fake-quant model) in graph order, then failures inherited from upstream, then the passing layers."""
    return (r.ok, r.inherited, r.order if not r.ok else -r.acc_max_abs_diff, r.order)


def _static_compare(dix: GraphIndex, L: DeployLayer, fix: GraphIndex, F) -> dict:
    """The deploy file's integers and scales next to the fake-quant file's (same layout: a Gemm weight
    is brought to [in, out] in both by its own ``transB``). ``None`` where they cannot be compared."""
    out: dict = {}
    wd, wf = dix.const_array(L.weight), fix.const_array(F.weight) if F.weight else None
    if wd is not None and wf is not None and L.kind == "Gemm" and F.kind == "Gemm":
        if attr_value(L.node, "transB", 0) and wd.ndim == 2:
            wd = wd.T
        if attr_value(F.node, "transB", 0) and wf.ndim == 2:
            wf = wf.T
    if wd is not None and wf is not None and wd.shape == wf.shape:
        out["weight_differences"] = _count_differences(wd, wf)
    else:
        out["weight_differences"] = None
    if L.bias is not None and F.bias is not None:
        bd, bf = dix.const_array(L.bias), fix.const_array(F.bias)
        out["bias_differences"] = int(np.count_nonzero(bd.astype(np.float64).ravel() != bf.astype(np.float64).ravel())) \
            if bd is not None and bf is not None and bd.size == bf.size else None
    if L.dequant is not None and F.deq_scale is not None:
        dd, _ = unpack_deq_scale(dix.const_array(L.dequant.input[1]))
        df = F.deq_scale.ravel()
        if dd.size == df.size or df.size == 1 or dd.size == 1:
            a, b = np.broadcast_arrays(dd.astype(np.float64), df.astype(np.float64))
            with np.errstate(divide="ignore", invalid="ignore"):
                rel = np.abs(a - b) / np.abs(b)
            out["deq_scale_max_rel_diff"] = float(np.nanmax(rel)) if rel.size else 0.0
    return out


def _count_differences(a: np.ndarray, b: np.ndarray, block_elements: int = 1 << 22) -> int:
    """How many elements of two same-shaped arrays differ, a block of leading-axis slices at a time, so
    memory-mapped weights are read once with no full-size temporary. NumPy compares mixed types in
    their common type, which holds both exactly (int8 and float32: float32; int32 and float32: float64)."""
    if a.ndim == 0:
        return int(a != b)
    rows = max(1, block_elements // max(1, a[0].size))
    return sum(int(np.count_nonzero(a[i:i + rows] != b[i:i + rows])) for i in range(0, a.shape[0], rows))


def _static_verdict(r: "DeployLayerResult", tol: Tolerances) -> None:
    """A layer whose simulated figures agree can still hold a wrong value the inputs never reached
    (e.g. the weights of a channel that only ever sees zeros): the stored values must agree too."""
    if not r.ok:
        return
    st = r.static
    if st.get("weight_differences"):
        r.failed_figure = "int8_weight"
        r.message = (f"{st['weight_differences']} int8 weight value(s) differ from the fake-quant model's weight grid "
                     "(no accumulator on these inputs reached them)")
    elif st.get("bias_differences"):
        r.failed_figure = "int32_bias"
        r.message = f"{st['bias_differences']} int32 bias value(s) differ from the fake-quant model's bias"
    elif (st.get("deq_scale_max_rel_diff") or 0.0) > tol.deploy_dequant_rtol:
        r.failed_figure = "deq_scale"
        r.message = (f"deq_scale differs from the fake-quant dequant scale by {st['deq_scale_max_rel_diff']:.3g} "
                     f"(relative; allowed {tol.deploy_dequant_rtol:.3g})")
    else:
        return
    r.ok = False


def compare_deploy(deploy_model, fake_quant_model, inputs=None, *, seed: int = 0, dims=None,
                   tolerances=None) -> DeployCheckResult:
    """Simulate the deploy model and compare it with the fake-quant model (ONNX Runtime, graph
    optimizations off) on the same inputs.

    Per quantized layer (paired by node name): the int8 input grid, the int32 accumulator (must equal
    the fake-quant pre-dequant output exactly wherever float32 holds the sums exactly, and within the
    float32 summation bound elsewhere) and the dequantized output. Per graph output: agreement
    within ``tolerances.deploy_output_rtol``. ``inputs``: dict by name / sequence / None (seeded, from
    the graph's input shapes; symbolic dimensions take ``dims[name]``, else the export's size the file
    records, else 1)."""
    tol: Tolerances = as_tolerances(tolerances)
    dmodel, fmodel = load_model(deploy_model), load_model(fake_quant_model)
    # The file check uses the training order of rounding so that the integers compared are the ones the
    # files encode; where the device's order (§5) would quantize differently (exact ties, odd offset)
    # is counted separately and reported per layer as ``device_tie_differences``.
    sim = build_simulation(dmodel, with_bounds=True, quant_rounding="training")
    feeds = feeds_for(fmodel, inputs) if inputs is not None else generate_inputs(fmodel, seed=seed, dims=dims)
    dix, fix = GraphIndex(dmodel), GraphIndex(fmodel)
    problems: list[str] = []
    notes: list[str] = []
    pairs = _pair_deploy_layers(sim, fix, problems)
    with explain_size_failure(fmodel, dims, generated=inputs is None):
        douts, fouts = _run_deploy_pair(sim, fmodel, pairs, feeds)
    layers = _layer_results(dix, fix, pairs, douts, fouts, tol)
    outputs = _output_results(sim, fmodel, douts, fouts, tol, problems, notes)
    ok, msg = _deploy_verdict(layers, outputs, problems, tol)
    inputs_desc = {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in feeds.items()}
    return DeployCheckResult(ok, msg, layers, outputs, problems, sim.opset, inputs_desc, notes)


def _pair_deploy_layers(sim: Simulation, fix: GraphIndex,
                        problems: list[str]) -> list[tuple[SimLayer, FakeQuantLayer]]:
    """Each simulated layer with the fake-quant layer of the same node name (FORMATS §4/§5)."""
    pairs = []
    for sl in sim.layers:
        F = fake_quant_layer(fix, sl.name)
        if F is None:
            problems.append(f"deploy layer {sl.name!r} has no Conv/Gemm/MatMul node of that name in the fake-quant model "
                            "(both files name the quantized node after its module, FORMATS §4/§5)")
            continue
        pairs.append((sl, F))
    return pairs


def _run_deploy_pair(sim: Simulation, fmodel: onnx.ModelProto, pairs, feeds) -> tuple[dict, dict]:
    """The simulation and the fake-quant model on the same feeds, one session after the other, each with
    every paired layer's tensors as extra outputs: (simulation values, fake-quant values) by tensor name."""
    sim_extra, types = [], {}
    for sl, _ in pairs:
        sim_extra += [sl.quant_input, sl.quant_output, sl.acc, sl.output] + ([sl.abs_acc] if sl.abs_acc else [])
        types[sl.quant_output] = TensorProto.INT8
        types[sl.acc] = TensorProto.INT32
        if sl.abs_acc:
            types[sl.abs_acc] = TensorProto.INT32
    sim_model = with_extra_outputs(sim.model, sim_extra, types)
    fq_extra = [t for _, F in pairs for t in [F.grid_input, F.acc, F.output] + ([F.float_input] if F.float_input else [])]
    douts = run(sim_model, remap_feeds(feeds, sim_model), "disabled")
    fouts = run(with_extra_outputs(fmodel, fq_extra), feeds, "disabled")
    return douts, fouts


def _layer_results(dix: GraphIndex, fix: GraphIndex, pairs, douts, fouts, tol: Tolerances) -> list[DeployLayerResult]:
    """Per paired layer, in graph order: the figures of the run (:func:`_compare_layer`), the stored values
    (:func:`_static_verdict`), the device's rounding ties, and whether its input already differs."""
    dlayers = {L.name: L for L in find_deploy_layers(dix)}
    results = []
    for k, (sl, F) in enumerate(pairs):
        r = _compare_layer(sl, F, douts, fouts, tol, _static_compare(dix, dlayers[sl.name], fix, F))
        r.order = k
        _static_verdict(r, tol)
        r.device_tie_differences = _device_tie_differences(douts[sl.quant_input], sim_quant_attrs(dix.model, sl.quant))
        if F.float_input is not None:
            r.input_max_rel_diff = _input_max_rel_diff(douts[sl.quant_input], fouts[F.float_input])
            r.inherited = (not r.ok) and r.input_max_rel_diff is not None and r.input_max_rel_diff > 1e-6
        results.append(r)
    return results


def _input_max_rel_diff(deploy_input: np.ndarray, fake_quant_input: np.ndarray) -> float | None:
    """Max |difference| of a layer's float input in the two runs, relative to max |input| (None: not comparable)."""
    a, b = deploy_input.astype(np.float64), fake_quant_input.astype(np.float64)
    if a.shape != b.shape or not a.size:
        return None
    return float(np.max(np.abs(a - b))) / (float(np.max(np.abs(b))) or 1.0)


def _output_results(sim: Simulation, fmodel, douts, fouts, tol: Tolerances, problems: list[str],
                    notes: list[str]) -> list[DeployOutputResult]:
    """Graph outputs, paired by name when both files use the same names, else by position."""
    d_names = [o.name for o in sim.model.graph.output]
    f_names = [o.name for o in fmodel.graph.output]
    if len(d_names) != len(f_names):
        problems.append(f"the deploy model has {len(d_names)} outputs {d_names}, the fake-quant model {len(f_names)} {f_names}")
    if sorted(d_names) == sorted(f_names):
        d_names = list(f_names)  # same names: pair by name
    results = []
    for dn, fn in zip(d_names, f_names, strict=False):  # unequal counts are a problem above
        if dn != fn:
            notes.append(f"output names differ: deploy {dn!r} vs fake-quant {fn!r} (paired by position)")
        d, f = douts[dn].astype(np.float64), fouts[fn].astype(np.float64)
        if d.shape != f.shape:
            problems.append(f"output {fn!r}: deploy shape {list(d.shape)} vs fake-quant {list(f.shape)}")
            continue
        ref = float(np.max(np.abs(f))) if f.size else 0.0
        diff = float(np.max(np.abs(d - f))) if f.size else 0.0
        allowed = tol.deploy_output_rtol * ref + tol.deploy_output_atol
        results.append(DeployOutputResult(fn, diff <= allowed, diff, ref, allowed, diff == 0.0))
    return results


def _deploy_verdict(layers: list[DeployLayerResult], outputs: list[DeployOutputResult], problems: list[str],
                    tol: Tolerances) -> tuple[bool, str]:
    failing = [r for r in layers if not r.ok]
    bad_out = [o for o in outputs if not o.ok]
    if not failing and not bad_out and not problems:
        msg = (f"deploy simulation matches the fake-quant model: {len(layers)} layer(s), accumulators "
               f"{'identical' if all(r.acc_max_abs_diff == 0 for r in layers) else 'within float32 summation bounds'}, "
               f"{len(outputs)} output(s) within rtol {tol.deploy_output_rtol:g}")
        ties = sum(r.device_tie_differences for r in layers)
        if ties:
            msg += (f"; note: {ties} int8 input(s) sit on an exact rounding tie where the device's AscendQuant "
                    "(round(x*scale+offset)) differs by 1 from training (round(x*scale)+offset)")
        return True, msg
    if failing:
        w = min(failing, key=_deploy_badness)
        msg = f"deploy simulation FAILED: worst layer {w.name!r}: {w.message}"
        if len(failing) > 1:
            inh = sum(1 for r in failing if r.inherited)
            msg += f" (and {len(failing) - 1} more failing layer(s), {inh} of them downstream of a failure)"
        return False, msg
    if bad_out:
        o = bad_out[0]
        return False, (f"deploy simulation FAILED: output {o.name!r} differs by {o.max_abs_diff:.6g} "
                       f"(allowed {o.allowed:.6g}, max|ref| {o.ref_max_abs:.6g})")
    return False, "deploy simulation FAILED: " + problems[0]


def sim_quant_attrs(model: onnx.ModelProto, quant_name: str) -> tuple[float, int, int, str]:
    for n in model.graph.node:
        if n.name == quant_name and n.op_type == ASCEND_QUANT:
            mode = attr_value(n, "round_mode", b"Round")
            return (float(attr_value(n, "scale")), int(attr_value(n, "offset")), int(attr_value(n, "sqrt_mode", 0)),
                    mode.decode() if isinstance(mode, bytes) else str(mode))
    return (float("nan"), 0, 0, "Round")


def _device_tie_differences(x: np.ndarray, attrs) -> int:
    scale, offset, sqrt_mode, mode = attrs
    if mode != "Round" or offset % 2 == 0 or not np.isfinite(scale):
        return 0
    t = np.asarray(x, np.float32) * np.float32(scale)
    if sqrt_mode:
        t = t * np.float32(scale)
    t = t.astype(np.float64)
    dev = np.clip(np.round(t + offset), INT8_MIN, INT8_MAX)
    train = np.clip(np.round(t) + offset, INT8_MIN, INT8_MAX)
    return int(np.count_nonzero(dev != train))


# ---- one layer's figures --------------------------------------------------------------------------
def _compare_layer(sl: SimLayer, F, douts, fouts, tol: Tolerances, static: dict) -> DeployLayerResult:
    """The layer's three figures in the order data flows through it; the first that disagrees names it."""
    grid_mis, grid_size = _grid_mismatches(sl, F, douts, fouts)
    acc_d, acc_f = douts[sl.acc].astype(np.int64), fouts[F.acc].astype(np.float64)
    if acc_d.shape != acc_f.shape:
        return _shape_mismatch(sl, acc_d, acc_f, grid_mis, static)
    acc = _accumulator_figures(sl, acc_d, acc_f, douts)
    deq = _dequant_figures(sl, douts[sl.output], fouts[F.output], acc["allowed"], tol)
    n = int(acc_f.size)
    figure, message = None, "matches"
    if grid_mis:
        figure = "input_grid"
        message = (f"{grid_mis} of {grid_size} int8 input values differ from the fake-quant grid (AscendQuant "
                   f"{sl.quant!r} scale/offset vs the fake-quant chain)")
    elif acc["bad"]:
        diff, allowed = acc["diff"], acc["allowed"]
        idx = np.unravel_index(int(np.argmax(diff - allowed)), diff.shape)
        figure = "int32_accumulator"
        message = (f"{acc['bad']} of {n} int32 accumulators differ from the fake-quant pre-dequant output "
                   f"(max |diff| {diff.max():.0f}; first worst at {list(map(int, idx))}: deploy {int(acc_d[idx])} vs "
                   f"fake-quant {acc_f[idx]:.0f}); check the int8 weight and the int32 bias")
    elif deq["bad"]:
        figure = "dequantized_output"
        message = (f"{deq['bad']} of {deq['size']} dequantized outputs differ (max rel diff {deq['max_rel']:.3g} > "
                   f"{tol.deploy_dequant_rtol:.3g}); check the deq_scale {LayerNames(sl.name).dequant_param!r}")
    diff = acc["diff"]
    return DeployLayerResult(
        name=sl.name, kind=sl.kind, ok=figure is None, failed_figure=figure, message=message, elements=n,
        input_grid_mismatches=grid_mis, acc_mismatches=acc["bad"],
        acc_exact_fraction=float(np.mean(diff == 0)) if n else 1.0,
        acc_max_abs_diff=float(diff.max(initial=0.0)), acc_max_abs=float(np.abs(acc_d).max(initial=0)),
        acc_allowed_slack=float(acc["allowed"].max(initial=0.0)), acc_int32_overflow_risk=acc["overflow"],
        acc_abs_sum_max=acc["abs_sum_max"],
        dequant_max_abs_diff=deq["max_abs"], dequant_max_rel_diff=deq["max_rel"], dequant_violations=deq["bad"],
        static=static,
    )


def _grid_mismatches(sl: SimLayer, F, douts, fouts) -> tuple[int, int]:
    """(int8 inputs - offset that differ from the fake-quant grid, grid size); every value when shapes differ."""
    q = douts[sl.quant_output].astype(np.int64) - sl.offset
    grid = fouts[F.grid_input].astype(np.float64)
    mismatches = int(np.count_nonzero(q != grid)) if q.shape == grid.shape else int(grid.size or 1)
    return mismatches, int(grid.size)


def _accumulator_figures(sl: SimLayer, acc_d: np.ndarray, acc_f: np.ndarray, douts) -> dict:
    """|deploy - fake-quant| per accumulator and the slack allowed: 0 where float32 holds every partial sum
    (S = sum |x - offset| |w| + |bias| <= 2^24), else ceil(gamma_n S) (FORMATS §5 summation bound)."""
    diff = np.abs(acc_d.astype(np.float64) - acc_f)
    if sl.abs_acc is not None:
        S = douts[sl.abs_acc].astype(np.float64)
        gamma = sl.n_terms * U32 / (1 - sl.n_terms * U32)
        allowed = np.where(S <= F32_EXACT, 0.0, np.ceil(gamma * S))
        overflow, s_max = bool(np.any(S > 2.0 ** 31 - 1)), float(S.max(initial=0.0))
    else:
        allowed, overflow, s_max = np.zeros_like(diff), False, float("nan")
    return {"diff": diff, "allowed": allowed, "bad": int(np.count_nonzero(diff > allowed)), "overflow": overflow,
            "abs_sum_max": s_max}


def _dequant_figures(sl: SimLayer, deploy_out: np.ndarray, fq_out: np.ndarray, acc_allowed: np.ndarray,
                     tol: Tolerances) -> dict:
    """Dequantized outputs: |deploy - fake-quant| <= deploy_dequant_rtol |fake-quant| + deq_scale x the
    accumulator's slack."""
    od, of = deploy_out.astype(np.float64), fq_out.astype(np.float64)
    if od.shape != of.shape:
        return {"bad": int(of.size or 1), "max_abs": float("nan"), "max_rel": float("nan"), "size": int(of.size)}
    deq = sl.deq_scale.astype(np.float64)
    if deq.size > 1:
        shape = [1] * od.ndim
        shape[sl.channel_axis] = deq.size
        deq = deq.reshape(shape)
    ddiff = np.abs(od - of)
    d_allowed = tol.deploy_dequant_rtol * np.abs(of) + deq * acc_allowed + 1e-30
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(of != 0, ddiff / np.abs(of), np.where(ddiff == 0, 0.0, np.inf))
    return {"bad": int(np.count_nonzero(ddiff > d_allowed)), "max_abs": float(ddiff.max(initial=0.0)),
            "max_rel": float(rel.max(initial=0.0)), "size": int(of.size)}


def _shape_mismatch(sl: SimLayer, acc_d, acc_f, grid_mis: int, static: dict) -> DeployLayerResult:
    n, nan = int(acc_f.size), float("nan")
    return DeployLayerResult(
        name=sl.name, kind=sl.kind, ok=False, failed_figure="accumulator_shape",
        message=f"int32 accumulator shape {list(acc_d.shape)} vs fake-quant pre-dequant shape {list(acc_f.shape)}",
        elements=n, input_grid_mismatches=grid_mis, acc_mismatches=n, acc_exact_fraction=0.0,
        acc_max_abs_diff=nan, acc_max_abs=nan, acc_allowed_slack=0.0, acc_int32_overflow_risk=False,
        acc_abs_sum_max=nan, dequant_max_abs_diff=nan, dequant_max_rel_diff=nan, dequant_violations=n,
        static=static)


def simulate_deploy(deploy_model, inputs=None, *, seed: int = 0, dims=None, accumulators: bool = False,
                    quant_rounding: str = "device") -> dict[str, np.ndarray]:
    """Run a deploy model on the CPU as the device defines it. Returns the graph outputs by name (and,
    with ``accumulators``, each quantized layer's int32 accumulator under the key ``'<layer>:acc'``).
    ``quant_rounding``: see :func:`build_simulation`."""
    model = load_model(deploy_model)
    sim = build_simulation(model, with_bounds=False, quant_rounding=quant_rounding)
    feeds = feeds_for(model, inputs) if inputs is not None else generate_inputs(model, seed=seed, dims=dims)
    names = [o.name for o in sim.model.graph.output]
    extra = [l.acc for l in sim.layers] if accumulators else []
    m = with_extra_outputs(sim.model, extra, {l.acc: TensorProto.INT32 for l in sim.layers})
    with explain_size_failure(model, dims, generated=inputs is None):
        outs = run(m, remap_feeds(feeds, m), "disabled")
    res = {n: outs[n] for n in names}
    if accumulators:
        for l in sim.layers:
            res[f"{l.name}:acc"] = outs[l.acc]
    return res
