"""Write models atomically, embedding weights or streaming them to external data.

A model (onnx-ir) is written to a temporary file beside its final path and renamed into place, so a
crash leaves the old complete file or the new complete file. Its graph is serialized without its
initializers (:mod:`.adapter`); the initializers are streamed one by one from their own memory,
without a copy into protobuf: embedded in the ``.onnx`` file, or, when they reach the protobuf limit
(``EXTERNAL_DATA_THRESHOLD``; the environment variable ``AMCT_EXTERNAL_DATA_THRESHOLD`` lowers it, for
tests and benchmarks), the large ones into a data file named ``<model>.onnx.<token>.data``
(ONNX external data; ``location`` is relative to the model's directory). The token is new for every
write, so the new data never overwrites the data the old model still points to; the old data file is
removed only after the new model is in place. A lazy tensor is computed when it is written, and its
array lives only while it is.
"""
from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

import onnx
import onnx_ir as ir
from onnx import TensorProto, numpy_helper

from .._io import temp_path_for
from ..errors import ExportError
from .adapter import graph_proto, initializers, tensor_array

# Protobuf cannot serialize a message of 2 GiB or more; FORMATS §1 sends 2 GB and more to external data.
EXTERNAL_DATA_THRESHOLD = 1_900_000_000  # below 2 GB (2e9) with room for the graph itself
# The knob for tests and benchmarks: models whose weights total this many bytes or more use external data.
THRESHOLD_ENV = "AMCT_EXTERNAL_DATA_THRESHOLD"
EXTERNAL_MIN_TENSOR_BYTES = 1024
_ALIGN = 64


class ExternalDataLocationError(ExportError):
    """A model's external data location lies outside the model's directory (absolute, ``..``, a symlink)."""


def contained_location(model_path, location: str, tensor: str | None = None) -> Path:
    """The file an external-data ``location`` of the model at ``model_path`` names, refused unless it lies
    inside the model's directory: as ``onnx.load`` rules, no absolute path, no ``..`` out of the
    directory, no symbolic link, and no path through a linked directory that ends outside it. Raises :class:`ExternalDataLocationError`
    naming the model file and the location."""
    model_path = Path(model_path)
    base = Path(os.path.realpath(os.path.dirname(os.path.abspath(model_path))))
    what = f"model {str(model_path)!r}" + (f": initializer {tensor!r}" if tensor else "")
    if not location or "\0" in location:
        raise ExternalDataLocationError(f"{what} has an empty or invalid external data location {location!r}")
    if os.path.isabs(location) or location.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", location):
        raise ExternalDataLocationError(f"{what} has external data at absolute location {location!r}; a location "
                                        "must be relative to the model's directory and inside it")
    norm = os.path.normpath(location)
    if norm == ".." or norm.startswith(".." + os.sep):
        raise ExternalDataLocationError(f"{what} has external data at {location!r}, outside the model's directory "
                                        f"{str(base)!r}; a location must stay inside it")
    if (base / norm).is_symlink():
        raise ExternalDataLocationError(f"{what} has external data at {location!r}, which is a symbolic link; as "
                                        "onnx.load, the data must be a regular file in the model's directory")
    full = Path(os.path.realpath(base / norm))
    if full != base and base not in full.parents:
        raise ExternalDataLocationError(f"{what} has external data at {location!r}, which resolves (through a "
                                        f"symlink) to {str(full)!r}, outside the model's directory {str(base)!r}")
    return full


def load_model(path) -> ir.Model:
    """Read an ONNX file into onnx-ir, large tensors left in their files; every external data location
    must lie inside the model's directory (:func:`contained_location`)."""
    path = Path(path)
    model = ir.load(str(path))
    for value in model.graph.initializers.values():
        t = value.const_value
        if isinstance(t, ir.ExternalTensor):
            contained_location(path, t.location, value.name)
    return model


def _threshold() -> int:
    raw = os.environ.get(THRESHOLD_ENV, "").strip()
    if not raw:
        return EXTERNAL_DATA_THRESHOLD
    if not raw.isdigit():
        raise ExportError(f"environment variable {THRESHOLD_ENV}={raw!r} must be a number of bytes")
    return int(raw)


def _data_files_of(final: Path) -> list[Path]:
    pat = re.compile(re.escape(final.name) + r"\.[0-9a-f]{8}\.data$")
    return [p for p in final.parent.glob(final.name + ".*.data") if pat.match(p.name)]


class PendingWrite:
    """A model written to temporary files, waiting for :meth:`commit` (rename) or :meth:`abort`."""

    def __init__(self, final: Path, tmp: Path, data: Path | None):
        self.final, self.tmp, self.data = final, tmp, data

    def commit(self) -> None:
        old_data = [p for p in _data_files_of(self.final) if p != self.data]
        os.replace(self.tmp, self.final)
        for p in old_data:
            p.unlink(missing_ok=True)

    def abort(self) -> None:
        self.tmp.unlink(missing_ok=True)
        if self.data is not None:
            self.data.unlink(missing_ok=True)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(number: int, length: int) -> bytes:
    """Tag and length of a length-delimited protobuf field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(length)


# Field numbers of onnx.proto used by the streaming writer.
_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_RAW_DATA = 7, 5, 9


def _header(name: str, tensor: ir.TensorProtocol) -> TensorProto:
    return TensorProto(name=name, dims=list(tensor.shape.numpy()), data_type=tensor.dtype.value)


def _write_embedded(model: ir.Model, f) -> None:
    """Serialize ``model`` with its initializers embedded, without copying them into protobuf.

    Protobuf readers merge a message's fields in any order, so the graph can be written as its
    initializer-free part followed by one initializer entry per tensor; each entry is a TensorProto
    header (name, dims, type) followed by its raw_data field, streamed from the tensor's own memory.
    The result parses exactly as if the tensors had been in ``graph.initializer``.
    """
    entries = []
    size = 0
    for name, t in initializers(model):
        nbytes = t.nbytes  # onnx-ir computes it from the shape: once per tensor
        h = _header(name, t).SerializeToString()
        raw_tag = _field(_TENSOR_RAW_DATA, nbytes)
        entry_len = len(h) + len(raw_tag) + nbytes
        entry_tag = _field(_GRAPH_INITIALIZER, entry_len)
        entries.append((entry_tag + h + raw_tag, name, t, nbytes))
        size += len(entry_tag) + entry_len
    proto = graph_proto(model)
    graph_bytes = proto.graph.SerializeToString()
    proto.ClearField("graph")
    f.write(proto.SerializeToString())
    f.write(_field(_MODEL_GRAPH, len(graph_bytes) + size))
    f.write(graph_bytes)
    for head, name, t, nbytes in entries:
        arr = tensor_array(t)
        if arr.nbytes != nbytes:
            raise AssertionError(f"tensor {name!r} has {arr.nbytes} bytes, declared {nbytes}")
        f.write(head)
        f.write(memoryview(arr).cast("B"))
        del arr  # a lazy tensor's array lives only while it is written


def _write_external(model: ir.Model, data_path: Path) -> onnx.ModelProto:
    """Stream every initializer of at least ``EXTERNAL_MIN_TENSOR_BYTES`` to ``data_path``; return the
    model's proto, whose initializers reference them (and embed the small ones)."""
    proto = graph_proto(model)
    inits = proto.graph.initializer
    offset = 0
    with open(data_path, "wb") as f:
        for name, t in initializers(model):
            arr = tensor_array(t)
            if arr.nbytes < EXTERNAL_MIN_TENSOR_BYTES:
                inits.append(numpy_helper.from_array(arr, name))
                continue
            pad = (-offset) % _ALIGN
            f.write(b"\0" * pad)
            start = offset + pad
            f.write(memoryview(arr).cast("B"))
            offset = start + arr.nbytes
            ref = _header(name, t)
            ref.data_location = TensorProto.EXTERNAL
            for k, v in (("location", data_path.name), ("offset", str(start)), ("length", str(arr.nbytes))):
                e = ref.external_data.add()
                e.key, e.value = k, v
            inits.append(ref)
            del arr
        f.flush()
        os.fsync(f.fileno())
    return proto


def prepare_write(model: ir.Model, final, threshold: int | None = None) -> PendingWrite:
    """Serialize ``model`` to a temp file next to ``final`` (and a new external data file if large)."""
    final = Path(final)
    limit = _threshold() if threshold is None else threshold
    total = sum(t.nbytes for _, t in initializers(model))
    tmp = temp_path_for(final)
    data_path = None
    try:
        if total < limit:
            with open(tmp, "wb") as f:
                _write_embedded(model, f)
                f.flush()
                os.fsync(f.fileno())
        else:
            data_path = final.parent / f"{final.name}.{uuid.uuid4().hex[:8]}.data"
            proto = _write_external(model, data_path)
            with open(tmp, "wb") as f:
                f.write(proto.SerializeToString())
                f.flush()
                os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        if data_path is not None:
            data_path.unlink(missing_ok=True)
        raise
    return PendingWrite(final, tmp, data_path)
