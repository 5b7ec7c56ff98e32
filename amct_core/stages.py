"""The export as separate, file-to-file stages (trace -> record -> fake-quant build -> deploy build).

``save_distill_model`` runs them in memory in one call. These functions run each stage alone, reading
and writing files only, so an orchestrator can run them in different processes, cache them, and re-run
one without the others. The traced model is a float ONNX file whose quantized layers are standard
Conv/Gemm/MatMul nodes named after their modules, with dequantized weights; its metadata lists the
quantized layers, the opset and the target (``amct_core.onnx.metadata``); of these keys the built
models keep only the export's input shapes.

One export id (:mod:`amct_core.export_id`) runs through the stages: :func:`trace_to_file` picks it and
stamps it into the traced file and the model's record file; the builds carry it from the traced file
to the models, with the hash of the record they were built from, and refuse a record of another export.
Every stage holds the writer locks of the files it writes (:func:`amct_core._io.output_lock`).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import onnx_ir as ir

from ._io import atomic_write_bytes, output_lock
from .arguments import check_output_dir, check_output_file, check_path
from .errors import ExportError
from .export_id import check_set, model_stamp, record_stamp
from .onnx import metadata
from .onnx.build import build_deploy, build_fake_quant
from .onnx.check import check_before_write
from .onnx.io import load_model, prepare_write
from .onnx.layers import layer_infos
from .record import LayerRecord, read_record, validate_record
from .save import export_quant_model, stamp_export
from .targets import Target, check_opset, get_target


@dataclass
class TraceResult:
    traced_path: str
    record_path: str
    layers: list[str]
    target: str
    opset: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TracedFile:
    """A traced model read back from its file: the graph, its quantized layers, target and opset."""

    model: ir.Model
    layers: list[str]
    target: str
    opset: int


def _get_meta(model: ir.Model, key: str, path) -> str:
    value = metadata.read_prop(model, key)
    if value is None:
        raise ExportError(f"traced model {str(path)!r} has no metadata {key!r}: it was not written by trace_to_file")
    return value


def trace_to_file(model, input_data, traced_path, record_path, input_names=None, output_names=None,
                  dynamic_axes=None, target=None, opset_version=None) -> TraceResult:
    """Trace the QAT model to a float ONNX file and write the record file of its factors."""
    check_output_file(traced_path, "traced_path")
    check_output_file(record_path, "record_path")
    traced_path, record_path = Path(traced_path), Path(record_path)
    check_output_dir(traced_path.parent, "traced_path")
    check_output_dir(record_path.parent, "record_path")
    traced, tgt, opset = export_quant_model(model, input_data, input_names, output_names, dynamic_axes,
                                            target, opset_version)
    validate_record(traced.records, layer_infos(traced.model, traced.records), tgt, source="record of the model")
    metadata.write_prop(traced.model, metadata.QUANT_LAYERS, json.dumps(list(traced.records)))
    metadata.write_prop(traced.model, metadata.TARGET, tgt.name)
    metadata.write_prop(traced.model, metadata.OPSET, str(opset))
    record_text = stamp_export(traced.model, traced.records)
    check_before_write(traced.model, f"traced model {str(traced_path)!r}", standard_ops=True)
    with output_lock([traced_path, record_path]):
        pending = prepare_write(traced.model, traced_path)
        try:
            atomic_write_bytes(record_path, record_text.encode())
        except BaseException:
            pending.abort()
            raise
        pending.commit()
    return TraceResult(str(traced_path), str(record_path), list(traced.records), tgt.name, opset)


def load_traced(traced_path) -> TracedFile:
    """Read a traced model written by :func:`trace_to_file` (large tensors stay in their files)."""
    check_path(traced_path, "traced_path")
    model = load_model(traced_path)
    return TracedFile(model, json.loads(_get_meta(model, metadata.QUANT_LAYERS, traced_path)),
                      _get_meta(model, metadata.TARGET, traced_path), int(_get_meta(model, metadata.OPSET, traced_path)))


def _validated_records(record_path, traced: TracedFile, target: Target) -> dict[str, LayerRecord]:
    check_path(record_path, "record_path")
    records = read_record(record_path)
    validate_record(records, layer_infos(traced.model, traced.layers), target,
                    source=f"record file {str(record_path)!r}")
    return records


def publish_record_file(model_record_path, traced_path, out_path, target=None) -> dict:
    """Validate the model's own record file (written by :func:`trace_to_file`) against the traced model and
    write it to ``out_path`` (a temporary file renamed into place). Returns the records."""
    check_output_file(out_path, "out_path")
    out_path = Path(out_path)
    check_output_dir(out_path.parent, "out_path")
    records = validate_record_file(model_record_path, traced_path, target)
    check_set([model_stamp("traced model", traced_path)], record_stamp(model_record_path))
    data = Path(model_record_path).read_bytes()
    with output_lock([out_path]):
        atomic_write_bytes(out_path, data)
    return records


def validate_record_file(record_path, traced_path, target=None) -> dict[str, LayerRecord]:
    """Validate a record file against a traced model (every rule of FORMATS §2). Returns the records."""
    traced = load_traced(traced_path)
    return _validated_records(record_path, traced, get_target(target or traced.target))


def _build_file(kind, traced_path, record_path, out_path, target=None, record_given=False) -> str:
    check_output_file(out_path, "out_path")
    out_path = Path(out_path)
    check_output_dir(out_path.parent, "out_path")
    traced = load_traced(traced_path)
    tgt = get_target(target or traced.target)
    check_opset(tgt, traced.opset)
    records = _validated_records(record_path, traced, tgt)  # an invalid record is a RecordError first
    record = record_stamp(record_path)
    # ids only: the record may be an edited copy of the model's own (its content is then another one)
    traced_stamp = replace(model_stamp("traced model", traced_path), record_sha256=None)
    check_set([traced_stamp], record, record_given=record_given)
    metadata.drop_stage_props(traced.model)  # the outputs keep only the keys of metadata.OUTPUT_KEYS
    metadata.write_prop(traced.model, metadata.RECORD_SHA256, record.record_sha256)
    built = (build_fake_quant if kind == "fake_quant" else build_deploy)(traced.model, records)
    what = "fake-quant model" if kind == "fake_quant" else "deploy model"
    check_before_write(built, f"{what} {str(out_path)!r}", standard_ops=kind == "fake_quant")
    with output_lock([out_path]):
        prepare_write(built, out_path).commit()
    return str(out_path)


def build_fake_quant_file(traced_path, record_path, out_path, target=None, *, record_given=False) -> str:
    """Traced model + record -> fake-quant model file (FORMATS §4), with the traced file's export id.

    The record must come from the same export as the traced file (its ``# amct.export_id`` header, when
    it has one), else :class:`amct_core.export_id.MixedSetError` names both files and ids;
    ``record_given=True`` accepts a record of another export (a user's own record file)."""
    return _build_file("fake_quant", traced_path, record_path, out_path, target, record_given)


def build_deploy_file(traced_path, record_path, out_path, target=None, *, record_given=False) -> str:
    """Traced model + record -> deploy model file (FORMATS §5); the export id as :func:`build_fake_quant_file`."""
    return _build_file("deploy", traced_path, record_path, out_path, target, record_given)
