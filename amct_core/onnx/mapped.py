"""Open an ONNX file without reading its tensors, and run it in ONNX Runtime without copying them.

:func:`open_model` returns the model's ``ModelProto`` in which every graph initializer of at least
``min_bytes`` is an external-data reference (ONNX's ``data_location = EXTERNAL``) whose ``location``
is an **absolute** path: a tensor the file already stores as external data keeps its data file, and a
tensor embedded in the ``.onnx`` file (its ``raw_data``) points at its own bytes inside the ``.onnx``
file. The file is walked at the protobuf wire level, so the tensors are never read, parsed or copied;
the proto holds the graph only, however large the model (even past protobuf's 2 GB limit, FORMATS §1).

* :func:`tensor_array` gives an initializer's values: a read-only memory map for external data (the
  pages are read when touched and given back when the array is dropped), else the proto's own values.
* :func:`runtime_model` gives what ONNX Runtime needs to run such a proto from memory: the serialized
  graph with locations relative to one folder, and that folder (session config entry
  ``session.model_external_initializers_file_folder_path``). ONNX Runtime then maps the weights from
  the files instead of receiving a serialized copy of them.

The absolute locations make the proto an in-memory view: do not save it as a model file.
"""
from __future__ import annotations

import mmap
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .io import EXTERNAL_MIN_TENSOR_BYTES, ExternalDataLocationError, _varint, contained_location

# Field numbers of onnx.proto (ModelProto.graph, .metadata_props, GraphProto.initializer, TensorProto.*).
_MODEL_GRAPH, _MODEL_METADATA, _GRAPH_INITIALIZER = 7, 14, 5
_TENSOR_RAW_DATA, _TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 9, 13, 14
_WIRE_VARINT, _WIRE_I64, _WIRE_LEN, _WIRE_I32 = 0, 1, 2, 5

FOLDER_CONFIG_KEY = "session.model_external_initializers_file_folder_path"


class MappedModelError(ValueError):
    """The file is not a readable ONNX model, or an external reference cannot be resolved; the message
    names the file or the tensor."""


# ---- protobuf wire format --------------------------------------------------------------------------

def _read_varint(buf, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise MappedModelError("truncated or malformed varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf, start: int, end: int):
    """(field number, wire type, value start, value end, field start) of each field in buf[start:end]."""
    pos = start
    while pos < end:
        field_start = pos
        key, pos = _read_varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == _WIRE_VARINT:
            _, value_end = _read_varint(buf, pos, end)
        elif wire == _WIRE_I64:
            value_end = pos + 8
        elif wire == _WIRE_I32:
            value_end = pos + 4
        elif wire == _WIRE_LEN:
            length, pos = _read_varint(buf, pos, end)
            value_end = pos + length
        else:  # groups (3, 4) are not used by onnx.proto
            raise MappedModelError(f"unsupported protobuf wire type {wire} (field {number})")
        if value_end > end:
            raise MappedModelError(f"field {number} runs past the end of its message")
        yield number, wire, pos, value_end, field_start
        pos = value_end


def _len_field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | _WIRE_LEN) + _varint(len(payload)) + payload


def _external_entries(location: str, offset: int, length: int) -> bytes:
    out = b""
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = _len_field(1, key.encode()) + _len_field(2, value.encode())
        out += _len_field(_TENSOR_EXTERNAL_DATA, entry)
    return out + _varint(_TENSOR_DATA_LOCATION << 3 | _WIRE_VARINT) + _varint(TensorProto.EXTERNAL)


def _tensor(buf, start: int, end: int, location: str, min_bytes: int) -> bytes:
    """A TensorProto's bytes with a large raw_data replaced by a reference to where it lies in the file."""
    kept, raw = [], None
    for number, wire, vs, ve, fs in _fields(buf, start, end):
        if number == _TENSOR_RAW_DATA and wire == _WIRE_LEN and ve - vs >= min_bytes:
            raw = (vs, ve - vs)
        else:
            kept.append(buf[fs:ve])
    if raw is None:
        return buf[start:end]
    return b"".join(kept) + _external_entries(location, *raw)


def _graph(buf, start: int, end: int, location: str, min_bytes: int) -> bytes:
    parts = []
    for number, wire, vs, ve, fs in _fields(buf, start, end):
        if number == _GRAPH_INITIALIZER and wire == _WIRE_LEN:
            parts.append(_len_field(_GRAPH_INITIALIZER, _tensor(buf, vs, ve, location, min_bytes)))
        else:
            parts.append(buf[fs:ve])
    return b"".join(parts)


@contextmanager
def _mapped(path):
    """The file at ``path`` memory-mapped, as (buffer, size); a wire-format error inside the block becomes
    a MappedModelError naming the file."""
    p = Path(path).resolve()
    if not p.is_file():
        raise FileNotFoundError(f"ONNX model {str(path)!r} does not exist or is not a file")
    with open(p, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise MappedModelError(f"ONNX model {str(p)!r} is empty")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            try:
                yield buf, size
            except MappedModelError as e:
                raise MappedModelError(f"{str(p)!r} is not a valid ONNX model file: {e}") from None


# ---- the public functions ------------------------------------------------------------------------

def open_model(path, min_bytes: int = EXTERNAL_MIN_TENSOR_BYTES, *, map_embedded: bool = True) -> onnx.ModelProto:
    """The model at ``path`` with its large initializers as absolute external-data references.

    ``map_embedded=False`` leaves tensors embedded in the ``.onnx`` in the proto (read, as onnx.load
    reads them) and gives only the file's own external data absolute locations.

    Raises FileNotFoundError naming the path, or MappedModelError when the file is not an ONNX model or
    names an external data file that does not exist."""
    if not map_embedded:
        min_bytes = 1 << 62  # larger than any raw_data
    p = Path(path).resolve()
    with _mapped(path) as (buf, size):
        parts = []
        for number, wire, vs, ve, fs in _fields(buf, 0, size):
            if number == _MODEL_GRAPH and wire == _WIRE_LEN:
                parts.append(_len_field(_MODEL_GRAPH, _graph(buf, vs, ve, str(p), min_bytes)))
            else:
                parts.append(buf[fs:ve])
    model = onnx.ModelProto()
    try:
        model.ParseFromString(b"".join(parts))
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError
        raise MappedModelError(f"{str(p)!r} is not a valid ONNX model file: {e}") from None
    for t in model.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            info = _info(t)
            loc = info.get("location", "")
            if not loc:
                raise MappedModelError(f"{str(p)!r}: initializer {t.name!r} is external data without a location")
            if loc == str(p):  # an embedded tensor, pointed at its bytes in the .onnx itself above
                continue
            try:
                full = contained_location(path, loc, t.name)
            except ExternalDataLocationError as e:
                raise MappedModelError(str(e)) from None
            if not full.is_file():
                raise MappedModelError(f"{str(p)!r}: initializer {t.name!r} refers to external data file "
                                       f"{str(full)!r}, which does not exist (keep the data files beside the .onnx)")
            _set_info(t, "location", str(full))
    return model


def read_metadata(path) -> dict[str, str]:
    """The model's ``metadata_props`` as a dict, read without parsing its graph or touching its tensors
    (the top-level fields of the file are walked; the graph is skipped by its length)."""
    out: dict[str, str] = {}
    with _mapped(path) as (buf, size):
        for number, wire, vs, ve, _ in _fields(buf, 0, size):
            if number == _MODEL_METADATA and wire == _WIRE_LEN:
                entry = onnx.StringStringEntryProto()
                try:
                    entry.ParseFromString(buf[vs:ve])
                except Exception as e:  # noqa: BLE001 - protobuf's DecodeError
                    raise MappedModelError(f"metadata_props entry: {e}") from None
                out[entry.key] = entry.value
    return out


def _info(t: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def _set_info(t: TensorProto, key: str, value: str) -> None:
    for e in t.external_data:
        if e.key == key:
            e.value = value
            return
    t.external_data.add(key=key, value=value)


def is_external(t: TensorProto) -> bool:
    return t.data_location == TensorProto.EXTERNAL


def tensor_array(t: TensorProto) -> np.ndarray:
    """The values of an initializer: a read-only memory map of its external data (absolute location, as
    :func:`open_model` gives), else the proto's own values."""
    if not is_external(t):
        return numpy_helper.to_array(t)
    info = _info(t)
    loc = info.get("location", "")
    if not os.path.isabs(loc):
        raise MappedModelError(f"initializer {t.name!r} is external data at relative location {loc!r}; open the "
                               "model with amct_core.onnx.mapped.open_model(path) so it can be found")
    offset, length = int(info.get("offset", 0) or 0), info.get("length")
    shape = tuple(int(d) for d in t.dims)
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    plain = dtype.kind in "biuf" and t.data_type not in _PACKED_TYPES
    if plain and (length is None or int(length) == count * dtype.itemsize):
        if count == 0:
            return np.zeros(shape, dtype)
        return np.memmap(loc, dtype=dtype.newbyteorder("<"), mode="r", offset=offset, shape=shape)
    # sub-byte or exotic types: read the bytes and let onnx decode them
    with open(loc, "rb") as f:
        f.seek(offset)
        raw = f.read(int(length)) if length is not None else f.read()
    copy = TensorProto(name=t.name, data_type=t.data_type, dims=list(t.dims), raw_data=raw)
    return numpy_helper.to_array(copy)


_PACKED_TYPES = {getattr(TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(TensorProto, n)}


def external_files(model: onnx.ModelProto) -> set[str]:
    """The files the model's external initializers live in (absolute paths; a model opened with
    :func:`open_model` names its own ``.onnx`` too when it embeds large tensors)."""
    return {_info(t).get("location", "") for t in model.graph.initializer if is_external(t)}


def runtime_model(model: onnx.ModelProto) -> tuple[bytes, str | None]:
    """The serialized model for ONNX Runtime and the folder its external data lies in (None if none).

    Every external file must lie in one folder (what :func:`open_model` of one file gives)."""
    files = external_files(model)
    if not files:
        return model.SerializeToString(), None
    if any(not os.path.isabs(f) for f in files):
        raise MappedModelError("the model has external data at relative locations; open it with "
                               "amct_core.onnx.mapped.open_model(path)")
    folders = {os.path.dirname(f) for f in files}
    if len(folders) != 1:
        raise MappedModelError(f"the model's external data lies in several folders {sorted(folders)}; "
                               "ONNX Runtime resolves it from one")
    return relocated(model, "").SerializeToString(), folders.pop()


def relocated(model: onnx.ModelProto, folder: str) -> onnx.ModelProto:
    """A copy whose external data locations are ``<folder>/<file name>``, relative (``folder`` "" : the file
    name alone): for the graph saved or run somewhere its data files are copied to, or found from."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in m.graph.initializer:
        if is_external(t):
            name = os.path.basename(_info(t)["location"])
            _set_info(t, "location", f"{folder}/{name}" if folder else name)
    return m
