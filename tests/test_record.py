"""The record file: schema, text format, and every validation rule of FORMATS §2."""
import math
import os
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import descriptor_pb2

import amct_core.record as rec
from amct_core.errors import RecordError
from amct_core.record.schema import PROTO_FILE, ScaleOffsetRecord, file_descriptor_proto

PROTO = Path(rec.__file__).parent / "scale_offset_record.proto"

SPEC_EXAMPLE = """record {
  key: "layer1.0.conv1"
  value {
    scale_d: 0.0039215689
    offset_d: -128
    scale_w: 0.0010680739
    scale_w: 0.0010422443
    offset_w: 0
    offset_w: 0
  }
}
"""


def test_proto_file_and_builtin_descriptor_agree(tmp_path):
    grpc_tools = pytest.importorskip("grpc_tools.protoc")
    out = tmp_path / "set.pb"
    root = PROTO.parents[2]
    rc = grpc_tools.main(["protoc", f"-I{root}", f"--descriptor_set_out={out}", str(PROTO.relative_to(root))])
    assert rc == 0
    fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    compiled = fds.file[0]
    built = file_descriptor_proto()
    assert compiled.name == PROTO_FILE
    for a, b in zip(compiled.message_type, built.message_type, strict=True):
        assert a.name == b.name
        assert [(f.name, f.number, f.label, f.type, f.type_name, f.default_value) for f in a.field] == [
            (f.name, f.number, f.label, f.type, f.type_name, f.default_value) for f in b.field
        ]


def test_spec_example_parses_with_defaults():
    r = rec.records_from_message(rec.parse_record(SPEC_EXAMPLE))
    e = r["layer1.0.conv1"]
    assert e.offset_d == -128 and len(e.scale_w) == 2 and e.offset_w == [0, 0]
    assert e.dst_type == "INT8" and e.act_type == "INT8" and e.wts_type == "INT8"
    assert e.scale_d == pytest.approx(0.0039215689, rel=1e-7)


def test_write_then_read_round_trips_float32_exactly(tmp_path):
    scales = [float(np.float32(x)) for x in (0.0123456789, 3.3e-9, 1234.5)]
    records = {"a.conv": rec.LayerRecord(scales[0], -3, scales), "fc": rec.LayerRecord(scales[1], 127, [scales[2]])}
    p = tmp_path / "r.txt"
    rec.write_record(p, records)
    back = rec.read_record(p)
    assert back == records
    assert 'key: "a.conv"' in p.read_text()
    assert "dst_type" not in p.read_text()  # defaults are not written


def test_non_default_types_are_written(tmp_path):
    p = tmp_path / "r.txt"
    rec.write_record(p, {"a": rec.LayerRecord(0.1, 0, [0.1], act_type="INT16")})
    assert 'act_type: "INT16"' in p.read_text()


def _layers(**c_out):
    return {k: rec.LayerInfo(c_out=v) for k, v in c_out.items()}


def _valid():
    return {"conv": rec.LayerRecord(0.02, -128, [0.01, 0.02]), "fc": rec.LayerRecord(0.5, 3, [0.001])}


def test_valid_record_passes():
    rec.validate_record(_valid(), _layers(conv=2, fc=7))


def test_missing_and_unknown_layers_are_reported_together():
    r = _valid()
    r["ghost"] = r.pop("fc")
    with pytest.raises(RecordError) as e:
        rec.validate_record(r, _layers(conv=2, fc=7))
    assert "'fc'" in str(e.value) and "'ghost'" in str(e.value)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan, 1e-17, 1e16])
def test_scale_d_out_of_range_names_layer_and_field(bad):
    r = _valid()
    r["conv"].scale_d = bad
    with pytest.raises(RecordError, match=r"layer 'conv': field 'scale_d'"):
        rec.validate_record(r, _layers(conv=2, fc=7))


def test_scale_w_out_of_range_names_field():
    r = _valid()
    r["fc"].scale_w = [math.inf]
    with pytest.raises(RecordError, match=r"layer 'fc': field 'scale_w'"):
        rec.validate_record(r, _layers(conv=2, fc=7))


def test_offset_d_must_fit_int8():
    r = _valid()
    r["conv"].offset_d = 128
    with pytest.raises(RecordError, match=r"layer 'conv': field 'offset_d' = 128"):
        rec.validate_record(r, _layers(conv=2, fc=7))


def test_offset_w_must_be_zero_and_as_long_as_scale_w():
    r = _valid()
    r["conv"].offset_w = [0, 1]
    with pytest.raises(RecordError, match="'offset_w' must be all 0"):
        rec.validate_record(r, _layers(conv=2, fc=7))
    r["conv"].offset_w = [0]
    with pytest.raises(RecordError, match="'offset_w' has 1 entries, must have 2"):
        rec.validate_record(r, _layers(conv=2, fc=7))


def test_scale_w_length_is_one_or_c_out():
    r = _valid()
    r["conv"].scale_w = [0.1, 0.1, 0.1]
    r["conv"].offset_w = [0, 0, 0]
    with pytest.raises(RecordError, match="C_out = 2"):
        rec.validate_record(r, _layers(conv=2, fc=7))


def test_shift_bit_rules():
    r = _valid()
    r["conv"].shift_bit = [0, 3]
    with pytest.raises(RecordError, match="'shift_bit'"):
        rec.validate_record(r, _layers(conv=2, fc=7))
    r["conv"].shift_bit = [1, 16]
    rec.validate_record(r, _layers(conv=2, fc=7))


def test_types_must_be_supported_by_target():
    r = _valid()
    r["fc"].wts_type = "INT4"
    with pytest.raises(RecordError, match=r"'wts_type' = 'INT4' is not supported by target A2"):
        rec.validate_record(r, _layers(conv=2, fc=7), "A2")


def test_bias_that_overflows_int32_names_the_layer():
    r = _valid()
    layers = _layers(conv=2, fc=7)
    layers["conv"].bias = np.array([1.0, 1e9], np.float32)
    with pytest.raises(RecordError, match=r"layer 'conv': bias overflows int32.*channel 1.*exclude"):
        rec.validate_record(r, layers)


def test_duplicate_and_empty_keys_are_errors():
    text = SPEC_EXAMPLE + SPEC_EXAMPLE
    with pytest.raises(RecordError, match="appears more than once"):
        rec.records_from_message(rec.parse_record(text))
    with pytest.raises(RecordError, match="'key' is empty"):
        rec.records_from_message(rec.parse_record('record { value { scale_d: 1 offset_d: 0 } }'))


def test_garbage_is_a_parse_error_naming_the_file(tmp_path):
    p = tmp_path / "bad.txt"
    p.write_text("record { key: 3 ")
    with pytest.raises(RecordError, match="bad.txt"):
        rec.read_record(p)


def test_message_class_uses_the_real_field_spelling():
    assert ScaleOffsetRecord.DESCRIPTOR.fields_by_name["record"].message_type.name == "MapFiledEntry"


def test_a_non_utf8_byte_is_a_record_error_naming_the_file_the_byte_offset_and_the_line(tmp_path):
    p = tmp_path / "latin1.txt"
    data = SPEC_EXAMPLE.encode().replace(b"layer1.0.conv1", b"layer1.0.conv\x80")
    p.write_bytes(data)
    offset = data.index(b"\x80")
    with pytest.raises(RecordError, match=rf"latin1.txt'.*byte {offset} \(line 2, column 22\).*not UTF-8"):
        rec.read_record(p)


def test_a_directory_given_as_the_record_file_is_a_record_error_naming_it(tmp_path):
    with pytest.raises(RecordError, match=rf"record file '{tmp_path}' is a directory"):
        rec.read_record(tmp_path)


def test_a_fifo_given_as_the_record_file_is_refused_without_reading_it(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)  # reading it would block until a writer came
    with pytest.raises(RecordError, match=r"record file '.*pipe' is not a regular file"):
        rec.read_record(fifo)


def test_a_missing_record_file_is_a_record_error_naming_it(tmp_path):
    with pytest.raises(RecordError, match=r"record file '.*nope.txt' does not exist"):
        rec.read_record(tmp_path / "nope.txt")


def test_an_unreadable_record_file_is_a_record_error_naming_it(tmp_path, monkeypatch):
    p = tmp_path / "r.txt"
    p.write_text(SPEC_EXAMPLE)

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)  # chmod does not stop root, who runs CI
    with pytest.raises(RecordError, match=r"record file '.*r.txt' cannot be read: permission denied"):
        rec.read_record(p)


@pytest.mark.parametrize("text", ["", "  \n\t\n", "# only a comment\n# and another\n"],
                         ids=["empty", "whitespace", "comments"])
def test_a_record_file_with_no_layer_record_is_invalid(tmp_path, text):
    p = tmp_path / "r.txt"
    p.write_text(text)
    with pytest.raises(RecordError, match=r"r.txt' holds no layer record"):
        rec.read_record(p)


def test_validating_no_records_is_an_error_even_for_a_model_with_no_layers():
    with pytest.raises(RecordError, match="no layer record"):
        rec.validate_record({}, {})

