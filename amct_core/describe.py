"""What is inside an ONNX file, as plain facts (``amct-export inspect`` prints them): opsets, graph inputs
and outputs, op counts, the Ascend quant/dequant nodes, the fake-quant layers, initializer types.

Reads the graph only: tensors stored as external data are not loaded, and a model whose external data
lies outside its directory is refused (:func:`amct_core.onnx.io.contained_location`).
"""
from __future__ import annotations

import collections
from pathlib import Path

ASCEND_QUANT, ASCEND_DEQUANT = "AscendQuant", "AscendDequant"  # FORMATS §5
FAKE_QUANT_MARK = ".quant.fakequant."  # in the names of a layer's fake-quant chain nodes (FORMATS §4)


def describe_model(path) -> dict:
    """Facts of the ONNX file at ``path``. ``kind`` is ``deploy`` (Ascend quant nodes), ``fake_quant``
    (fake-quant chains) or ``float``. Raises what onnx raises for a file that is not a readable model."""
    import onnx
    from onnx import helper

    from .onnx.io import contained_location

    given = Path(path)
    path = given.resolve()
    m = onnx.load(str(path), load_external_data=False)
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    for t in inits.values():
        if t.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in t.external_data if e.key == "location"), "")
            contained_location(given, location, t.name)

    def shape(vi):
        return [d.dim_param or (d.dim_value if d.HasField("dim_value") else "?") for d in vi.type.tensor_type.shape.dim]

    def dtype(vi):
        return onnx.TensorProto.DataType.Name(vi.type.tensor_type.elem_type)

    ops = collections.Counter((n.domain or "") + ("::" if n.domain else "") + n.op_type for n in g.node)
    ascend = []
    for n in g.node:
        if n.op_type == ASCEND_QUANT:
            attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            dst = attrs.get("dst_type")
            ascend.append({"node": n.name, "op": ASCEND_QUANT, "scale": attrs.get("scale"), "offset": attrs.get("offset"),
                           "dst_type": dst.decode() if isinstance(dst, bytes) else dst})
        elif n.op_type == ASCEND_DEQUANT:
            ascend.append({"node": n.name, "op": ASCEND_DEQUANT, "param": n.input[1] if len(n.input) > 1 else None})
    fake_quant = sorted({n.name.split(FAKE_QUANT_MARK)[0] for n in g.node if FAKE_QUANT_MARK in n.name})
    kind = "deploy" if any(q["op"] == ASCEND_QUANT for q in ascend) else "fake_quant" if fake_quant else "float"
    return {
        "path": str(path),
        "kind": kind,
        "ir_version": m.ir_version,
        "producer": f"{m.producer_name} {m.producer_version}".strip(),
        "opset_import": [{"domain": o.domain or "", "version": o.version} for o in m.opset_import],
        "inputs": [{"name": i.name, "dtype": dtype(i), "shape": shape(i)} for i in g.input if i.name not in inits],
        "outputs": [{"name": o.name, "dtype": dtype(o), "shape": shape(o)} for o in g.output],
        "nodes": len(g.node),
        "op_counts": dict(sorted(ops.items())),
        "ascend_nodes": ascend,
        "fake_quant_layers": fake_quant,
        "initializer_types": dict(collections.Counter(onnx.TensorProto.DataType.Name(t.data_type)
                                                      for t in inits.values())),
        "external_data_tensors": sum(t.data_location == onnx.TensorProto.EXTERNAL for t in inits.values()),
        "metadata": {p.key: p.value for p in m.metadata_props},
    }


def export_set(path, record=None) -> list[tuple[str, Path]]:
    """The files of the export the model at ``path`` belongs to, as (role, path), by the naming rule of
    FORMATS §1: the model itself, its sibling model (``<prefix>_fake_quant_model.onnx`` /
    ``<prefix>_deploy_model.onnx``) when present, and ``record`` or else the flow's record file
    ``<prefix>_scale_offset_record.txt`` when present."""
    from .formats import DEPLOY_MODEL, FAKE_QUANT_MODEL, RECORD_FILE

    path = Path(path)
    roles = {FAKE_QUANT_MODEL: "fake-quant model", DEPLOY_MODEL: "deploy model"}
    out = []
    for suffix, other in ((FAKE_QUANT_MODEL, DEPLOY_MODEL), (DEPLOY_MODEL, FAKE_QUANT_MODEL)):
        if path.name.endswith(suffix):
            stem = path.name[: -len(suffix)]
            out = [(roles[suffix], path)]
            sibling = path.with_name(stem + other)
            if sibling.is_file():
                out.append((roles[other], sibling))
            flow_record = path.with_name(stem + RECORD_FILE)
            if record is None and flow_record.is_file():
                record = flow_record
            break
    else:
        out = [("model", path)]
    if record is not None:
        out.append(("record file", Path(record)))
    return out
