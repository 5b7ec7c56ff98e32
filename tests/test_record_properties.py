"""Property tests of the record parser (amct_core.record) on mutations of a valid record file.

Text mutations (characters of the format's own vocabulary deleted, inserted, replaced, duplicated) and byte
mutations (bytes flipped, inserted, deleted, the file cut short) of the record the SmallMLP's trace wrote.
Whatever the mutation, reading and validating it ends in records or in our own RecordError, never in
another exception; and the stages that read a record (publish, build) leave their output as it was when the
record is refused: no new file, no temporary file, an earlier output untouched.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from amct_core.errors import RecordError
from amct_core.export_id import MixedSetError
from amct_core.record import read_record
from amct_core.stages import build_fake_quant_file, publish_record_file, trace_to_file, validate_record_file
from tests import models

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# the format's own vocabulary, so that many mutations stay close to parsable text
TOKENS = ["record", "key", "value", "scale_d", "offset_d", "scale_w", "offset_w", "shift_bit", "dst_type",
          "act_type", "wts_type", "INT8", "INT16", "{", "}", ":", '"', "\\", "#", "\n", " ", "-", ".", "e", "1e39",
          "nan", "inf", "0", "127", "-129", "4294967296", "0x10", "fc1", "fc2", "<", ">", "[", "]", ",", ";", "\t",
          "é", "\u2028", "\x00"]


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    """The SmallMLP traced to a file, with its record: (traced model path, record bytes)."""
    d = tmp_path_factory.mktemp("record-properties")
    qat = models.make_qat("mlp", d)
    trace_to_file(qat, models.example_inputs("mlp", 1), d / "mlp_traced.onnx", d / "mlp_record.txt")
    return str(d / "mlp_traced.onnx"), (d / "mlp_record.txt").read_bytes()


@st.composite
def text_mutations(draw, text: str) -> str:
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(text)))
        j = draw(st.integers(i, min(len(text), i + 40)))
        piece = "".join(draw(st.lists(st.one_of(st.sampled_from(TOKENS), st.text(max_size=3)), max_size=4)))
        op = draw(st.sampled_from(["delete", "insert", "replace", "duplicate"]))
        if op == "delete":
            text = text[:i] + text[j:]
        elif op == "insert":
            text = text[:i] + piece + text[i:]
        elif op == "replace":
            text = text[:i] + piece + text[j:]
        else:
            text = text[:j] + text[i:j] + text[j:]
    return text


@st.composite
def byte_mutations(draw, data: bytes) -> bytes:
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        if op == "flip" and i < len(data):
            data = data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1:]
        elif op == "insert":
            data = data[:i] + draw(st.binary(min_size=1, max_size=6)) + data[i:]
        elif op == "delete":
            data = data[:i] + data[i + draw(st.integers(1, 20)):]
        else:
            data = data[:i]
    return data


def _read_and_validate(path: Path, traced_path: str) -> bool:
    """True when the file reads and validates; False when either is a RecordError (anything else propagates)."""
    try:
        read_record(path)
        validate_record_file(path, traced_path)
    except RecordError:
        return False
    return True


def _ours_left(directory: Path) -> list[str]:
    """The files in ``directory`` but the writers' lock files (empty, they stay by design: README, Guarantees)."""
    return sorted(p.name for p in directory.iterdir() if not p.name.endswith(".amct.lock"))


def _check_publish(record: bytes, traced_path: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        given_file, out = Path(d) / "given.txt", Path(d) / "out" / "mlp_record.txt"
        given_file.write_bytes(record)
        out.parent.mkdir()
        out.write_bytes(b"an earlier export's record\n")
        valid = _read_and_validate(given_file, traced_path)
        try:
            publish_record_file(given_file, traced_path, out)
        except RecordError:
            assert not valid
            assert out.read_bytes() == b"an earlier export's record\n"
        except MixedSetError:  # a valid record, but not the one the traced model was exported with
            assert valid
            assert out.read_bytes() == b"an earlier export's record\n"
        else:
            assert valid
            assert out.read_bytes() == record
        assert _ours_left(out.parent) == ["mlp_record.txt"]  # no temporary file left


def test_text_mutations_of_a_record_read_as_records_or_as_a_record_error(traced):
    traced_path, record = traced

    @SETTINGS
    @given(text_mutations(record.decode()))
    def check(text):
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / "r.txt"
            p.write_text(text, encoding="utf-8", errors="surrogatepass")
            _read_and_validate(p, traced_path)

    check()


def test_byte_mutations_of_a_record_read_as_records_or_as_a_record_error(traced):
    traced_path, record = traced

    @SETTINGS
    @given(byte_mutations(record))
    def check(data):
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / "r.txt"
            p.write_bytes(data)
            _read_and_validate(p, traced_path)

    check()


def test_publishing_a_mutated_record_writes_it_whole_or_leaves_the_earlier_output(traced):
    traced_path, record = traced

    @SETTINGS
    @given(st.one_of(byte_mutations(record), text_mutations(record.decode()).map(
        lambda t: t.encode("utf-8", errors="surrogatepass"))))
    def check(data):
        _check_publish(data, traced_path)

    check()


def test_a_build_from_a_refused_record_writes_nothing_and_keeps_the_earlier_model(traced):
    traced_path, record = traced

    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(byte_mutations(record))
    def check(data):
        with tempfile.TemporaryDirectory() as d:
            given_file, out = Path(d) / "given.txt", Path(d) / "out" / "mlp_fake_quant_model.onnx"
            given_file.write_bytes(data)
            if _read_and_validate(given_file, traced_path):
                return  # a record that validates is built like any other (tests/test_stages.py)
            out.parent.mkdir()
            out.write_bytes(b"an earlier export's model")
            with pytest.raises(RecordError):
                build_fake_quant_file(traced_path, given_file, out)
            assert out.read_bytes() == b"an earlier export's model"
            assert _ours_left(out.parent) == [out.name]

    check()
