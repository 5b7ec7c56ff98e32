"""Write and read models atomically, embedding weights or streaming them to external data.

A model is written to a temporary file beside its final path and renamed into place, so a crash
leaves the old complete file or the new complete file. When its tensors reach the protobuf limit
(``EXTERNAL_DATA_THRESHOLD``), large tensors are streamed one by one into a data file named
``<model>.onnx.<token>.data`` (ONNX external data; ``location`` is relative to the model's
directory). The token is new for every write, so the new data never overwrites the data the old
model still points to; the old data file is removed only after the new model is in place.
"""
from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .._io import temp_path_for
from .store import OnnxModel, materialize

# Protobuf cannot serialize a message of 2 GiB or more; FORMATS §1 sends 2 GB and more to external data.
EXTERNAL_DATA_THRESHOLD = 1_900_000_000  # below 2 GB (2e9) with room for the graph itself
EXTERNAL_MIN_TENSOR_BYTES = 1024
_ALIGN = 64


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

    @property
    def files(self) -> list[Path]:
        return [self.final] + ([self.final.parent / self.data.name] if self.data else [])


def _little_endian(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return a.astype(a.dtype.newbyteorder("<")) if a.dtype.byteorder == ">" else a


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


def _write_embedded(model: OnnxModel, f) -> None:
    """Serialize ``model`` with its array tensors embedded, without copying them into protobuf.

    Protobuf readers merge a message's fields in any order, so the graph can be written as its
    small part followed by one initializer entry per array; each entry is a TensorProto header
    (name, dims, type) followed by its raw_data field, streamed from the array's own memory. The
    result parses exactly as if the tensors had been in ``graph.initializer``.
    """
    headers = []
    size = 0
    for name, t in model.tensors.items():
        dtype = np.dtype(t.dtype)
        head = TensorProto(name=name, dims=list(t.shape), data_type=helper.np_dtype_to_tensor_dtype(dtype))
        h = head.SerializeToString()
        raw_tag = _field(_TENSOR_RAW_DATA, t.nbytes)
        entry_len = len(h) + len(raw_tag) + t.nbytes
        entry_tag = _field(_GRAPH_INITIALIZER, entry_len)
        headers.append((entry_tag + h + raw_tag, name, t.nbytes))
        size += len(entry_tag) + entry_len
    graph_bytes = model.proto.graph.SerializeToString()
    rest = onnx.ModelProto()
    rest.CopyFrom(model.proto)
    rest.ClearField("graph")
    f.write(rest.SerializeToString())
    f.write(_field(_MODEL_GRAPH, len(graph_bytes) + size))
    f.write(graph_bytes)
    for head, name, nbytes in headers:
        arr = _little_endian(materialize(model.tensors[name]))
        if arr.nbytes != nbytes:
            raise AssertionError(f"tensor {name!r} has {arr.nbytes} bytes, declared {nbytes}")
        f.write(head)
        f.write(memoryview(arr).cast("B"))
        del arr  # a lazy tensor's array lives only while it is written


def prepare_write(model: OnnxModel, final, threshold: int | None = None) -> PendingWrite:
    """Serialize ``model`` to a temp file next to ``final`` (and a new external data file if large)."""
    final = Path(final)
    limit = EXTERNAL_DATA_THRESHOLD if threshold is None else threshold
    total = model.tensor_bytes() + sum(len(t.raw_data) for t in model.graph.initializer)
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


def _external_ref(name: str, dtype: int, dims, location: str, offset: int, length: int) -> TensorProto:
    t = TensorProto(name=name, data_type=dtype, dims=list(dims))
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = k, v
    return t


def _write_external(model: OnnxModel, data_path: Path) -> onnx.ModelProto:
    """Stream every large tensor to ``data_path``; return a proto that references them."""
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    inits = proto.graph.initializer
    offset = 0
    with open(data_path, "wb") as f:

        def put(buf: memoryview | bytes) -> tuple[int, int]:
            nonlocal offset
            pad = (-offset) % _ALIGN
            if pad:
                f.write(b"\0" * pad)
                offset += pad
            start = offset
            f.write(buf)
            offset += len(buf)
            return start, offset - start

        for t in inits:
            if t.HasField("raw_data") and len(t.raw_data) >= EXTERNAL_MIN_TENSOR_BYTES:
                start, length = put(t.raw_data)
                t.ClearField("raw_data")
                t.data_location = TensorProto.EXTERNAL
                for k, v in (("location", data_path.name), ("offset", str(start)), ("length", str(length))):
                    e = t.external_data.add()
                    e.key, e.value = k, v
        for name, t in model.tensors.items():
            arr = _little_endian(materialize(t))
            dtype = helper.np_dtype_to_tensor_dtype(arr.dtype)
            if arr.nbytes >= EXTERNAL_MIN_TENSOR_BYTES:
                start, length = put(memoryview(arr).cast("B"))
                inits.append(_external_ref(name, dtype, arr.shape, data_path.name, start, length))
            else:
                inits.append(numpy_helper.from_array(arr, name))
        f.flush()
        os.fsync(f.fileno())
    return proto


def load_model(path) -> OnnxModel:
    """Load a model; external tensors are memory-mapped into ``tensors`` rather than read into the proto."""
    path = Path(path)
    proto = onnx.load(str(path), load_external_data=False)
    om = OnnxModel(proto)
    inits = proto.graph.initializer
    for i in range(len(inits) - 1, -1, -1):
        t = inits[i]
        if t.data_location != TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
        count = int(np.prod(t.dims)) if len(t.dims) else 1
        arr = np.memmap(path.parent / info["location"], dtype=dtype, mode="r", offset=int(info.get("offset", 0)),
                        shape=(count,)).reshape(tuple(t.dims))
        om.tensors[t.name] = arr
        del inits[i]
    return om
