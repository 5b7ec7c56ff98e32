"""Read, write and validate record files with protobuf's own text_format over the schema."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from google.protobuf import text_format

from .._io import atomic_write_bytes
from ..errors import RecordError
from ..formats import (
    DEFAULT_RECORD_FILE,
    OFFSET_RANGE,
    QUANT_TYPE,
    SCALE_MAX,
    SCALE_MIN,
    SHIFT_BIT_RANGE,
    deq_scale,
    quantize_bias,
)
from ..targets import Target, get_target
from .schema import ScaleOffsetRecord

__all__ = ["DEFAULT_RECORD_FILE", "LayerInfo", "LayerRecord", "decode_record", "format_record", "parse_record",
           "read_record", "read_record_bytes", "record_message", "records_from_message", "validate_record",
           "write_record"]


@dataclass
class LayerRecord:
    """One record entry, as plain Python values."""

    scale_d: float
    offset_d: int
    scale_w: list[float]
    offset_w: list[int] = field(default_factory=list)
    shift_bit: list[int] = field(default_factory=list)
    dst_type: str = QUANT_TYPE
    act_type: str = QUANT_TYPE
    wts_type: str = QUANT_TYPE

    def __post_init__(self):
        if not self.offset_w:
            self.offset_w = [0] * len(self.scale_w)


@dataclass
class LayerInfo:
    """What validation needs to know of a quantized layer of the model."""

    c_out: int
    bias: np.ndarray | None = None  # float bias (after any BN fold), for the int32 check


def record_message(records: dict[str, LayerRecord]) -> ScaleOffsetRecord:
    msg = ScaleOffsetRecord()
    for key, r in records.items():
        e = msg.record.add()
        e.key = key
        v = e.value
        v.scale_d = float(r.scale_d)
        v.offset_d = int(r.offset_d)
        v.scale_w.extend(float(s) for s in r.scale_w)
        v.offset_w.extend(int(o) for o in r.offset_w)
        if r.shift_bit:
            v.shift_bit.extend(int(s) for s in r.shift_bit)
        # Defaults are not written, as in AMCT's files; other values are.
        for name in ("dst_type", "act_type", "wts_type"):
            if getattr(r, name) != QUANT_TYPE:
                setattr(v, name, getattr(r, name))
    return msg


def format_record(records: dict[str, LayerRecord]) -> str:
    return text_format.MessageToString(record_message(records))


def parse_record(text: str, source: str = "<record>") -> ScaleOffsetRecord:
    """The record's text (protobuf text format) as a message; anything unparsable is a RecordError naming
    ``source`` (a syntax error with its line and column)."""
    try:
        return text_format.Parse(text, ScaleOffsetRecord())
    except text_format.ParseError as e:
        raise RecordError(f"record file {source}: not a valid ScaleOffsetRecord in text format: {_short(e)}") from None


def _short(e: BaseException, limit: int = 300) -> str:
    """An error's message cut to ``limit`` characters (a parse error quotes its whole line)."""
    text = str(e)
    return text if len(text) <= limit else text[:limit] + "..."


def decode_record(data: bytes, source: str = "<record>") -> str:
    """A record file's bytes as text: UTF-8 (protobuf's text format), else a RecordError naming ``source`` and
    the first bad byte's offset, line and column."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise RecordError(f"record file {source}: byte {e.start} (line {line}, column {column}) is "
                          f"{data[e.start:e.start + 1]!r}, which is not UTF-8 text ({e.reason}); a record file is "
                          "protobuf text format in UTF-8") from None


def read_record_bytes(path) -> bytes:
    """The bytes of the record file at ``path``; a missing, unreadable or non-file path is a RecordError
    naming it."""
    p = Path(path)
    name = repr(str(p))
    try:
        if p.exists() and not p.is_dir() and not p.is_file():  # a FIFO or a device: reading could block or not end
            raise RecordError(f"record file {name} is not a regular file; give the path of the record file")
        return p.read_bytes()
    except FileNotFoundError:
        raise RecordError(f"record file {name} does not exist") from None
    except IsADirectoryError:
        raise RecordError(f"record file {name} is a directory; give the path of the record file") from None
    except PermissionError:
        raise RecordError(f"record file {name} cannot be read: permission denied") from None
    except OSError as e:
        raise RecordError(f"record file {name} cannot be read: {e.strerror or e}") from None


def records_from_message(msg: ScaleOffsetRecord, source: str = "<record>") -> dict[str, LayerRecord]:
    """Convert to plain records; duplicate and empty keys are errors (named)."""
    out: dict[str, LayerRecord] = {}
    problems = []
    for i, e in enumerate(msg.record):
        if not e.key:
            problems.append(f"record #{i}: field 'key' is empty")
            continue
        if e.key in out:
            problems.append(f"layer {e.key!r}: field 'key' appears more than once")
            continue
        if not e.HasField("value"):
            problems.append(f"layer {e.key!r}: field 'value' is missing")
            continue
        v = e.value
        missing = [f for f in ("scale_d", "offset_d") if not v.HasField(f)]
        if missing:
            problems.append(f"layer {e.key!r}: field(s) {missing} missing")
            continue
        out[e.key] = LayerRecord(
            scale_d=v.scale_d, offset_d=v.offset_d, scale_w=list(v.scale_w), offset_w=list(v.offset_w),
            shift_bit=list(v.shift_bit), dst_type=v.dst_type, act_type=v.act_type, wts_type=v.wts_type,
        )
        out[e.key].offset_w = list(v.offset_w)  # keep as read (validation checks the length)
    if problems:
        raise RecordError(f"record file {source}:\n  " + "\n  ".join(problems))
    if not out:
        raise RecordError(f"record file {source} holds no layer record (empty, or only whitespace and comments); a "
                          "record file has one 'record { key: \"<layer>\" value { ... } }' per quantized layer")
    return out


def read_record(path) -> dict[str, LayerRecord]:
    """The records of the record file at ``path``. Every way it can be wrong - missing, a directory,
    unreadable, not UTF-8, not the text format, no layer record, a duplicate or empty key, a missing
    field - is a RecordError naming the file (then the byte, line or layer)."""
    source = repr(str(Path(path)))
    data = read_record_bytes(path)
    return records_from_message(parse_record(decode_record(data, source), source), source)


def _scale_ok(s: float) -> bool:
    return math.isfinite(s) and SCALE_MIN <= s <= SCALE_MAX


def validate_record(records: dict[str, LayerRecord], layers: dict[str, LayerInfo], target: Target | str | None = None,
                    source: str = "record") -> None:
    """Check every rule of FORMATS.md section 2; raise one RecordError listing every failure by layer and field."""
    tgt = target if isinstance(target, Target) else get_target(target)
    problems: list[str] = []
    if not records:
        problems.append("no layer record: a record has one entry per quantized layer")
    missing = [n for n in layers if n not in records]
    unknown = [n for n in records if n not in layers]
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"quantized layers with no record: {missing}")
        if unknown:
            parts.append(f"records naming no quantized layer of the model: {unknown}")
        problems.append("; ".join(parts))
    for name, r in records.items():
        where = f"layer {name!r}"
        if not _scale_ok(r.scale_d):
            problems.append(f"{where}: field 'scale_d' = {r.scale_d!r} must be finite and within [{SCALE_MIN}, {SCALE_MAX}]")
        bad_w = [(i, s) for i, s in enumerate(r.scale_w) if not _scale_ok(s)]
        if bad_w:
            problems.append(f"{where}: field 'scale_w' entries {bad_w[:4]} must be finite and within [{SCALE_MIN}, {SCALE_MAX}]")
        if not r.scale_w:
            problems.append(f"{where}: field 'scale_w' is empty (needs 1 or C_out values)")
        if r.act_type not in tgt.act_types:
            problems.append(f"{where}: field 'act_type' = {r.act_type!r} is not supported by target {tgt.name} (supports {list(tgt.act_types)})")
        if r.wts_type not in tgt.wts_types:
            problems.append(f"{where}: field 'wts_type' = {r.wts_type!r} is not supported by target {tgt.name} (supports {list(tgt.wts_types)})")
        if r.dst_type not in tgt.dst_types:
            problems.append(f"{where}: field 'dst_type' = {r.dst_type!r} is not supported by target {tgt.name} (supports {list(tgt.dst_types)})")
        lo, hi = OFFSET_RANGE.get(r.act_type, OFFSET_RANGE[QUANT_TYPE])
        if not lo <= r.offset_d <= hi:
            problems.append(f"{where}: field 'offset_d' = {r.offset_d} must be within [{lo}, {hi}] for {r.act_type} activations")
        if len(r.offset_w) != len(r.scale_w):
            problems.append(f"{where}: field 'offset_w' has {len(r.offset_w)} entries, must have {len(r.scale_w)} (as 'scale_w')")
        if any(o != 0 for o in r.offset_w):
            problems.append(f"{where}: field 'offset_w' must be all 0 (symmetric weights)")
        lo_sb, hi_sb = SHIFT_BIT_RANGE
        if r.shift_bit and not (all(s == 0 for s in r.shift_bit) or all(lo_sb <= s <= hi_sb for s in r.shift_bit)):
            problems.append(f"{where}: field 'shift_bit' must be all 0 or each within [{lo_sb}, {hi_sb}], "
                            f"got {r.shift_bit}")
        info = layers.get(name)
        if info is None:
            continue
        if len(r.scale_w) not in (1, info.c_out):
            problems.append(f"{where}: field 'scale_w' has {len(r.scale_w)} entries, must have 1 or C_out = {info.c_out}")
            continue
        if info.bias is not None and _scale_ok(r.scale_d) and not bad_w and r.scale_w:
            try:
                quantize_bias(info.bias, deq_scale(r.scale_d, r.scale_w), name)
            except RecordError as e:
                problems.append(str(e))
    if problems:
        raise RecordError(f"{source} failed validation:\n  " + "\n  ".join(problems))


def write_record(path, records: dict[str, LayerRecord]) -> None:
    p = Path(path)
    atomic_write_bytes(p, format_record(records).encode())
