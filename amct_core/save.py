"""save_distill_model: the distilled QAT model to the fake-quant model, the deploy model and the record.

Nothing is written until every check has passed (the inputs, the record, and each built model's
post-conditions: sorted, every input defined, one opset entry, the ONNX checker for the fake-quant
model); then, holding the three files' writer locks, each file is written to a temporary file and
renamed into place (FORMATS §1). All three carry one export id (:mod:`amct_core.export_id`).
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch.nn as nn

from ._io import output_lock, temp_path_for
from ._modes import as_input_tuple
from .arguments import check_names, check_output_dir, check_output_file, check_path
from .errors import ConfigError, ExportError
from .export_id import new_export_id, record_content_sha256, record_header
from .formats import DEFAULT_RECORD_FILE, DEPLOY_MODEL, FAKE_QUANT_MODEL, dynamic_axis_name, output_file
from .onnx import metadata
from .onnx.build import build_deploy, build_fake_quant
from .onnx.check import check_before_write
from .onnx.io import PendingWrite, prepare_write
from .onnx.layers import layer_infos
from .onnx.trace import TracedModel, trace_quant_model
from .quant.modules import is_quant_module
from .record import LayerRecord, format_record, validate_record
from .targets import DEFAULT_OPSET, Target, check_opset, get_target

# Seconds per stage of the last save_distill_model call in this process (read by benchmarks and the flow).
last_stage_seconds: dict[str, float] = {}


@contextmanager
def _stage(name: str):
    t0 = time.perf_counter()
    try:
        yield
    finally:
        last_stage_seconds[name] = time.perf_counter() - t0


@dataclass(frozen=True)
class OutputPaths:
    fake_quant: Path
    deploy: Path
    record: Path


def output_paths(save_path, record_file=None) -> OutputPaths:
    """Where save_distill_model writes, from ``save_path`` (directory + name prefix) and ``record_file``."""
    if not isinstance(save_path, (str, Path)) or not str(save_path):
        raise ExportError(f"save_path must be a non-empty path string like './out/model', got {save_path!r}")
    check_path(save_path, "save_path")
    if record_file is not None:
        if not isinstance(record_file, (str, Path)) or not str(record_file):
            raise ExportError(f"record_file must be a non-empty path string or None, got {record_file!r}")
        check_path(record_file, "record_file")
    rec = Path(record_file) if record_file is not None else Path(DEFAULT_RECORD_FILE)
    if rec.is_dir():
        raise ExportError(f"record_file {str(rec)!r} is a directory; give a file path")
    paths = OutputPaths(output_file(save_path, FAKE_QUANT_MODEL), output_file(save_path, DEPLOY_MODEL), rec)
    check_output_file(paths.fake_quant, "save_path")
    check_output_file(paths.deploy, "save_path")
    check_output_file(paths.record, "record_file")
    return paths


def normalize_dynamic_axes(dynamic_axes, known_names: list[str], ranks: dict[str, int] | None = None) -> dict | None:
    """Accept both seed forms (``{"in": [0, 2]}`` and ``{"in": {0: "batch"}}``); names must be known, and
    the axes of a tensor whose rank ``ranks`` gives must lie within it. Returns the dict form."""
    if dynamic_axes is None:
        return None
    if not isinstance(dynamic_axes, dict):
        raise ExportError(f"dynamic_axes must be a dict, got {type(dynamic_axes).__name__}")
    out = {}
    for name, axes in dynamic_axes.items():
        if name not in known_names:
            raise ExportError(f"dynamic_axes names {name!r}, which is not an input or output name; known names: {known_names}")
        if isinstance(axes, (list, tuple)):
            if not all(isinstance(a, int) and not isinstance(a, bool) for a in axes):
                raise ExportError(f"dynamic_axes[{name!r}] must list axis indices (ints), got {axes!r}")
            out[name] = {int(a): dynamic_axis_name(name, i) for i, a in enumerate(axes)}
        elif isinstance(axes, dict):
            if not all(isinstance(a, int) and not isinstance(a, bool) for a in axes):
                raise ExportError(f"dynamic_axes[{name!r}] keys must be axis indices (ints), got {list(axes)}")
            out[name] = {int(a): str(v) for a, v in axes.items()}
        else:
            raise ExportError(f"dynamic_axes[{name!r}] must be a list of axes or a dict axis -> name, got {axes!r}")
        rank = (ranks or {}).get(name)
        if rank is not None and any(not 0 <= a < rank for a in out[name]):
            raise ExportError(f"dynamic_axes[{name!r}] = {sorted(out[name])} is out of range for an input of rank {rank}")
    return out


def _resolve_target(model: nn.Module, target, opset_version) -> tuple[Target, int]:
    tgt = get_target(target if target is not None else getattr(model, "amct_target", None))
    opset = DEFAULT_OPSET if opset_version is None else opset_version
    return tgt, check_opset(tgt, opset)


def export_quant_model(model: nn.Module, input_data, input_names=None, output_names=None, dynamic_axes=None,
                       target=None, opset_version=None) -> tuple[TracedModel, Target, int]:
    """Validate the inputs and trace; returns the traced model, target and opset. Writes nothing.

    The traced model records the example inputs' shapes and dtypes in its metadata
    (``amct.input_shapes``, :mod:`amct_core.onnx.metadata`), which both built models keep."""
    if not isinstance(model, nn.Module):
        raise ExportError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not any(is_quant_module(m) for m in model.modules()):
        raise ExportError("no layers to save: the model has no quantized layer (wrap it with create_distill_model)")
    tgt, opset = _resolve_target(model, target, opset_version)
    for name, m in model.named_modules():
        if is_quant_module(m) and not bool(m.act_initialized):
            raise ExportError(f"layer {name!r}: activation range is not initialised; calibrate or distill the model first")
    try:
        inputs = as_input_tuple(input_data)
    except ConfigError as e:
        raise ExportError(str(e)) from None
    input_names = check_names(input_names, "input_names", len(inputs), "inputs")
    output_names = check_names(output_names, "output_names", None)
    known = (input_names or []) + (output_names or [])
    ranks = {n: inputs[i].dim() for i, n in enumerate(input_names or [])}
    axes = normalize_dynamic_axes(dynamic_axes, known, ranks)
    traced = trace_quant_model(model, inputs, input_names, output_names, axes, opset)
    if not traced.records:
        raise ExportError("no layers to save: no quantized layer is called by forward() on input_data")
    return traced, tgt, opset


def save_distill_model(model, save_path, input_data, record_file=None, input_names=None, output_names=None,
                       dynamic_axes=None, *, target=None, opset_version=None) -> None:
    """Export a distilled QAT model: ``<save_path>_fake_quant_model.onnx``, ``<save_path>_deploy_model.onnx``
    and the record file (default ``amct_log/scale_offset_record.txt``).

    ``target`` (``"A2"``, ``"A3"``, ``"950"``; default the model's config target, else A2) and
    ``opset_version`` (default 11) are keyword-only additions to AMCT's signature. The model itself is
    not modified. On any error nothing is written or overwritten.
    """
    last_stage_seconds.clear()
    paths = output_paths(save_path, record_file)
    for p, what in ((paths.fake_quant, "save_path"), (paths.record, "record_file")):
        check_output_dir(p.parent, what)
    with _stage("trace"):
        traced, tgt, opset = export_quant_model(model, input_data, input_names, output_names, dynamic_axes,
                                                target, opset_version)
    with _stage("record"):
        validate_record(traced.records, layer_infos(traced.model, traced.records), tgt, source="record of the model")
        record_text = stamp_export(traced.model, traced.records)
    with _stage("fake_quant_build"):
        fake = build_fake_quant(traced.model, traced.records)
    with _stage("deploy_build"):
        deploy = build_deploy(traced.model, traced.records)
    with _stage("check"):
        check_before_write(fake, f"fake-quant model {str(paths.fake_quant)!r}", standard_ops=True)
        check_before_write(deploy, f"deploy model {str(paths.deploy)!r}", standard_ops=False)
    with _stage("write"):
        write_outputs(paths, fake, deploy, record_text)


def stamp_export(model, records: dict[str, LayerRecord], export_id: str | None = None) -> str:
    """Give the (traced) ``model`` a new export id and the hash of its record's content, in its metadata
    (the models built from it keep both); return the record file's text with the same id in its header."""
    export_id = export_id or new_export_id()
    content = format_record(records)
    metadata.write_prop(model, metadata.EXPORT_ID, export_id)
    metadata.write_prop(model, metadata.RECORD_SHA256, record_content_sha256(content.encode()))
    return record_header(export_id) + content


def write_outputs(paths: OutputPaths, fake, deploy, record_text: str) -> None:
    """Write the three files holding their writer locks (:func:`amct_core._io.output_lock`; temporaries a
    killed export left for them are removed first): all to temporaries first, then rename each into place."""
    finals = [p for p, m in ((paths.fake_quant, fake), (paths.deploy, deploy)) if m is not None] + [paths.record]
    with output_lock(finals):
        pending: list[PendingWrite] = []
        rec_tmp = None
        try:
            if fake is not None:
                pending.append(prepare_write(fake, paths.fake_quant))
            if deploy is not None:
                pending.append(prepare_write(deploy, paths.deploy))
            rec_tmp = temp_path_for(paths.record)
            with open(rec_tmp, "w") as f:
                f.write(record_text)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            for p in pending:
                p.abort()
            if rec_tmp is not None:
                rec_tmp.unlink(missing_ok=True)
            raise
        for p in pending:
            p.commit()
        rec_tmp.replace(paths.record)
