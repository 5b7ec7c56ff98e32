"""The record file (FORMATS.md section 2): schema, text-format read/write, validation."""
from .io import (
    DEFAULT_RECORD_FILE,
    LayerInfo,
    LayerRecord,
    format_record,
    parse_record,
    read_record,
    record_message,
    records_from_message,
    validate_record,
    write_record,
)

__all__ = [
    "LayerInfo",
    "LayerRecord",
    "read_record",
    "parse_record",
    "format_record",
    "records_from_message",
    "record_message",
    "validate_record",
    "write_record",
    "DEFAULT_RECORD_FILE",
]
