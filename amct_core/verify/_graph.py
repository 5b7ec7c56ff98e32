"""Read-only views of ONNX graphs used by the checks: producers, consumers, constants, and the
quantized layers of a deploy model (FORMATS §5) and of a fake-quant model (FORMATS §4).

Layers are found from the ops and attributes the spec defines, not from our exporter's internal
naming, so deploy files written by AMCT are understood as well.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from ..formats import ASCEND_DEQUANT, ASCEND_QUANT, LAYER_OPS
from ..onnx.mapped import is_external, open_model, tensor_array


def load_model(model) -> onnx.ModelProto:
    """``model``: a path (str/Path), serialized bytes or a ModelProto.

    A path is opened without reading its tensors (:func:`amct_core.onnx.mapped.open_model`): large
    initializers, embedded or external, stay in the file and are memory-mapped when a check reads them,
    so a model of any size costs only its graph until then."""
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, (bytes, bytearray)):
        return onnx.load_from_string(bytes(model))
    if isinstance(model, (str, Path)):
        return open_model(model)
    raise TypeError(f"expected an ONNX model path, bytes or onnx.ModelProto, got {type(model).__name__}")


def node_label(node: onnx.NodeProto) -> str:
    """How findings name a node: its name, else op type and first output."""
    if node.name:
        return node.name
    return f"<unnamed {node.op_type} -> {node.output[0] if node.output else '?'}>"


def attr_map(node: onnx.NodeProto) -> dict[str, onnx.AttributeProto]:
    return {a.name: a for a in node.attribute}


def attr_value(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


class GraphIndex:
    """Producers, consumers and constants (initializers and Constant nodes) of a model's main graph."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        g = model.graph
        self.graph = g
        self.initializers: dict[str, TensorProto] = {t.name: t for t in g.initializer}
        self.constant_nodes: dict[str, onnx.NodeProto] = {}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in g.node:
            for o in n.output:
                if o:
                    self.producer[o] = n
            for i in n.input:
                if i:
                    self.consumers.setdefault(i, []).append(n)
            if n.op_type == "Constant" and n.output:
                self.constant_nodes[n.output[0]] = n
        self.input_names = [i.name for i in g.input if i.name not in self.initializers]
        self.output_names = [o.name for o in g.output]
        self._arrays: dict[str, np.ndarray] = {}

    def nodes_named(self, name: str) -> list[onnx.NodeProto]:
        return [n for n in self.graph.node if n.name == name]

    def is_const(self, name: str) -> bool:
        return name in self.initializers or name in self.constant_nodes

    def const_tensor(self, name: str) -> TensorProto | None:
        if name in self.initializers:
            return self.initializers[name]
        n = self.constant_nodes.get(name)
        if n is not None:
            v = attr_value(n, "value")
            if isinstance(v, TensorProto):
                return v
        return None

    def const_dtype(self, name: str) -> int | None:
        t = self.const_tensor(name)
        return None if t is None else t.data_type

    def const_array(self, name: str) -> np.ndarray | None:
        """The constant's values (None if ``name`` is not a constant). External data is memory-mapped
        afresh on each call and not kept, so the pages a check reads are given back when it drops them."""
        if name in self._arrays:
            return self._arrays[name]
        t = self.const_tensor(name)
        if t is None:
            n = self.constant_nodes.get(name)
            if n is None:
                return None
            for key in ("value_float", "value_floats", "value_int", "value_ints"):
                v = attr_value(n, key)
                if v is not None:
                    arr = np.asarray(v, dtype=np.float32 if "float" in key else np.int64)
                    self._arrays[name] = arr
                    return arr
            return None
        arr = tensor_array(t)
        if not is_external(t):
            self._arrays[name] = arr
        return arr

    def sole_consumer(self, name: str) -> onnx.NodeProto | None:
        cs = self.consumers.get(name, [])
        return cs[0] if len(cs) == 1 else None

    def opset(self) -> int | None:
        for o in self.model.opset_import:
            if o.domain in ("", "ai.onnx"):
                return int(o.version)
        return None


def dtype_name(elem_type: int | None) -> str:
    if elem_type is None:
        return "none"
    try:
        return TensorProto.DataType.Name(elem_type)
    except ValueError:
        return f"type{elem_type}"


# ---------------------------------------------------------------------------------------------
# Deploy model layers (FORMATS §5)
# ---------------------------------------------------------------------------------------------
@dataclass
class DeployLayer:
    """One quantized layer of a deploy model as found in the graph (any part may be missing)."""

    name: str
    node: onnx.NodeProto
    kind: str  # Conv / Gemm / MatMul
    weight: str
    bias: str | None  # Conv/Gemm input 2, or the bias Add's constant input for MatMul
    bias_add: onnx.NodeProto | None  # MatMul only
    quant: onnx.NodeProto | None  # the AscendQuant feeding input 0
    dequant: onnx.NodeProto | None  # the AscendDequant on the (biased) output
    acc: str  # the int32 accumulator tensor: input 0 of the dequant (or the layer's last output)

    @property
    def channel_axis_of_weight(self) -> int:
        if self.kind == "Conv":
            return 0
        if self.kind == "Gemm" and attr_value(self.node, "transB", 0):
            return 0
        return -1  # Gemm transB=0 [in, out] and MatMul [.., in, out]

    def c_out(self, ix: GraphIndex) -> int | None:
        w = ix.const_array(self.weight)
        if w is None or w.ndim < 1:
            return None
        return int(w.shape[self.channel_axis_of_weight])


def _bias_add_of(ix: GraphIndex, node: onnx.NodeProto) -> tuple[onnx.NodeProto | None, str | None]:
    """For a MatMul: its sole consumer if that is an Add with one constant operand (the bias)."""
    c = ix.sole_consumer(node.output[0])
    if c is None or c.op_type != "Add" or len(c.input) != 2:
        return None, None
    other = c.input[1] if c.input[0] == node.output[0] else c.input[0]
    if ix.is_const(other):
        return c, other
    return None, None


def find_deploy_layers(ix: GraphIndex) -> list[DeployLayer]:
    """Every Conv/Gemm/MatMul that is, or is meant to be, a quantized layer: it has a constant weight and
    either the weight is integer or the layer touches an AscendQuant / AscendDequant."""
    layers = []
    for node in ix.graph.node:
        if node.op_type not in LAYER_OPS or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        w = node.input[1]
        if not ix.is_const(w):
            continue
        prod = ix.producer.get(node.input[0])
        quant = prod if prod is not None and prod.op_type == ASCEND_QUANT else None
        bias_add, bias = None, None
        if node.op_type == "MatMul":
            bias_add, bias = _bias_add_of(ix, node)
        elif len(node.input) > 2 and node.input[2]:
            bias = node.input[2]
        last_out = (bias_add or node).output[0]
        c = ix.sole_consumer(last_out)
        dequant = c if c is not None and c.op_type == ASCEND_DEQUANT else None
        if dequant is None:
            # a dequant directly on the MatMul output, bias Add after it, is a structural error we report
            c2 = ix.sole_consumer(node.output[0])
            if bias_add is not None and c2 is not None and c2.op_type == ASCEND_DEQUANT:
                dequant, bias_add, bias, last_out = c2, None, None, node.output[0]
        wtype = ix.const_dtype(w)
        integer_weight = wtype in (TensorProto.INT8, TensorProto.UINT8, TensorProto.INT4)
        if not (integer_weight or quant is not None or dequant is not None):
            continue
        layers.append(DeployLayer(
            name=node.name, node=node, kind=node.op_type, weight=w, bias=bias, bias_add=bias_add,
            quant=quant, dequant=dequant, acc=last_out,
        ))
    return layers


# ---------------------------------------------------------------------------------------------
# Fake-quant model layers (FORMATS §4)
# ---------------------------------------------------------------------------------------------
_CHAIN_OPS = ("Mul", "Div", "Round", "Add", "Sub", "Clip", "Floor", "Ceil", "Cast", "Max", "Min")


@dataclass
class FakeQuantLayer:
    name: str
    node: onnx.NodeProto
    kind: str
    grid_input: str  # input 0 of the layer node: the integer grid q - offset_d
    float_input: str | None  # the float tensor the quant chain starts from (None if not recognised)
    acc: str  # pre-dequant output: the layer's output, after the bias Add for MatMul
    dequant_mul: onnx.NodeProto | None
    deq_scale: np.ndarray | None  # the dequant Mul's constant
    output: str  # the layer's float output (dequant Mul output, else acc)
    weight: str | None = None
    bias: str | None = None
    chain: list[str] = field(default_factory=list)


def _walk_chain(ix: GraphIndex, tensor: str) -> tuple[str | None, list[str]]:
    """From a layer's data input, walk back through the fake-quant chain (ops with one non-constant
    input: Sub <- Clip <- Add <- Round <- Mul) to the float tensor it starts from: the input of the
    first Mul/Div met after a Round. (None, chain) if no such chain is found."""
    chain: list[str] = []
    t = tensor
    seen_round = False
    for _ in range(8):
        p = ix.producer.get(t)
        if p is None or p.op_type not in _CHAIN_OPS:
            break
        data = [i for i in p.input if i and not ix.is_const(i)]
        if len(data) != 1:
            break
        chain.append(p.name)
        t = data[0]
        if p.op_type in ("Round", "Floor", "Ceil"):
            seen_round = True
        elif seen_round and p.op_type in ("Mul", "Div"):
            return t, chain
    return None, chain


def fake_quant_layer(ix: GraphIndex, name: str) -> FakeQuantLayer | None:
    """The fake-quant layer whose Conv/Gemm/MatMul node is named ``name`` (None if there is none)."""
    nodes = [n for n in ix.nodes_named(name) if n.op_type in LAYER_OPS]
    if not nodes:
        return None
    node = nodes[0]
    acc = node.output[0]
    bias = node.input[2] if node.op_type != "MatMul" and len(node.input) > 2 and node.input[2] else None
    if node.op_type == "MatMul":
        badd, b = _bias_add_of(ix, node)
        if badd is not None:
            acc, bias = badd.output[0], b
    mul = ix.sole_consumer(acc)
    deq = None
    if mul is not None and mul.op_type == "Mul" and len(mul.input) == 2:
        other = mul.input[1] if mul.input[0] == acc else mul.input[0]
        deq = ix.const_array(other)
        if deq is None:
            mul = None
    else:
        mul = None
    float_input, chain = _walk_chain(ix, node.input[0])
    return FakeQuantLayer(
        name=name, node=node, kind=node.op_type, grid_input=node.input[0], float_input=float_input,
        acc=acc, dequant_mul=mul, deq_scale=None if deq is None else np.asarray(deq, np.float32),
        output=mul.output[0] if mul is not None else acc,
        weight=node.input[1] if len(node.input) > 1 else None, bias=bias, chain=chain,
    )


def with_extra_outputs(model: onnx.ModelProto, names: list[str],
                       types: dict[str, int] | None = None) -> onnx.ModelProto:
    """A copy of ``model`` (in memory) whose graph also outputs ``names`` (existing outputs are kept)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for n in names:
        if n and n not in have:
            vi = m.graph.output.add()
            vi.name = n
            t = (types or {}).get(n)
            if t is not None:
                vi.type.tensor_type.elem_type = t
            have.add(n)
    return m
