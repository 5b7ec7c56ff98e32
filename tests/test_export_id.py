"""One export id in the three files of an export; every reader of a set refuses a mixed one (issue 10, item 8)."""
from __future__ import annotations

import shutil

import onnx
import pytest
from google.protobuf import text_format

from amct_core import save_distill_model
from amct_core.export_id import MixedSetError, check_set, model_stamp, record_content_sha256, record_stamp, split_record
from amct_core.onnx.mapped import read_metadata
from amct_core.record import read_record
from amct_core.record.schema import ScaleOffsetRecord
from amct_core.stages import build_deploy_file, build_fake_quant_file, publish_record_file, trace_to_file
from amct_core.verify.cli import main as verify_main
from flows.cli import main as cli_main
from tests import models


@pytest.fixture(scope="module")
def qat(tmp_path_factory):
    return models.make_qat("mlp", tmp_path_factory.mktemp("qat"))


def _export(qat, tmp_path, name="a"):
    save_distill_model(qat, str(tmp_path / name / "m"), models.example_inputs("mlp"),
                       record_file=str(tmp_path / name / "m_scale_offset_record.txt"))
    d = tmp_path / name
    return d / "m_fake_quant_model.onnx", d / "m_deploy_model.onnx", d / "m_scale_offset_record.txt"


def _id(path):
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}.get("amct.export_id")


def test_one_export_stamps_one_id_into_both_models_and_the_record(qat, tmp_path):
    fake, deploy, record = _export(qat, tmp_path)
    export_id = _id(fake)
    assert len(export_id) == 32 and int(export_id, 16) >= 0
    assert _id(deploy) == export_id
    assert record.read_text().splitlines()[0] == f"# amct.export_id: {export_id}"


def test_two_exports_get_different_ids(qat, tmp_path):
    assert _id(_export(qat, tmp_path, "a")[0]) != _id(_export(qat, tmp_path, "b")[0])


def test_the_record_header_is_a_comment_protobuf_text_format_skips(qat, tmp_path):
    _, _, record = _export(qat, tmp_path)
    msg = text_format.Parse(record.read_text(), ScaleOffsetRecord())  # as AMCT's reader parses it
    header, content = split_record(record.read_bytes())
    assert msg == text_format.Parse(content.decode(), ScaleOffsetRecord())
    assert list(header) == ["amct.export_id"]
    assert set(read_record(record)) == {e.key for e in msg.record}


def test_models_carry_the_sha256_of_the_record_content_they_were_built_from(qat, tmp_path):
    fake, deploy, record = _export(qat, tmp_path)
    content = split_record(record.read_bytes())[1]
    import hashlib
    for m in (fake, deploy):
        assert read_metadata(m)["amct.record_sha256"] == hashlib.sha256(content).hexdigest()
    assert record_content_sha256(record.read_bytes()) == hashlib.sha256(content).hexdigest()


def test_metadata_is_read_without_parsing_the_graph(qat, tmp_path):
    fake, _, _ = _export(qat, tmp_path)
    assert read_metadata(fake) == {p.key: p.value for p in onnx.load(str(fake)).metadata_props}


def test_a_consistent_set_passes_with_its_id(qat, tmp_path):
    fake, deploy, record = _export(qat, tmp_path)
    result = check_set([model_stamp("fake-quant model", fake), model_stamp("deploy model", deploy)], record_stamp(record))
    assert result.export_id == _id(fake) and result.notes == []


def test_models_of_two_exports_are_refused_naming_both_files_and_ids(qat, tmp_path):
    fake, _, _ = _export(qat, tmp_path, "a")
    _, deploy_b, _ = _export(qat, tmp_path, "b")
    with pytest.raises(MixedSetError) as e:
        check_set([model_stamp("fake-quant model", fake), model_stamp("deploy model", deploy_b)])
    msg = str(e.value)
    assert str(fake) in msg and str(deploy_b) in msg and _id(fake) in msg and _id(deploy_b) in msg


def test_a_record_of_another_export_is_refused(qat, tmp_path):
    fake, deploy, _ = _export(qat, tmp_path, "a")
    _, _, record_b = _export(qat, tmp_path, "b")
    with pytest.raises(MixedSetError, match="different exports"):
        check_set([model_stamp("fake-quant model", fake), model_stamp("deploy model", deploy)], record_stamp(record_b))


def test_a_record_without_id_whose_content_differs_from_the_models_record_is_refused(qat, tmp_path):
    fake, deploy, record = _export(qat, tmp_path)
    records = read_record(record)
    first = next(iter(records.values()))
    first.scale_d *= 2
    from amct_core.record import format_record
    (tmp_path / "old.txt").write_text(format_record(records))  # an older export's record, no header
    with pytest.raises(MixedSetError, match="built from another record"):
        check_set([model_stamp("fake-quant model", fake)], record_stamp(tmp_path / "old.txt"))


def test_files_without_an_id_are_accepted_with_a_note(qat, tmp_path):
    fake, deploy, record = _export(qat, tmp_path)
    m = onnx.load(str(deploy))
    del m.metadata_props[:]
    onnx.save(m, str(tmp_path / "amct_deploy_model.onnx"))  # as AMCT writes it: no amct.* metadata
    result = check_set([model_stamp("fake-quant model", fake), model_stamp("deploy model", tmp_path / "amct_deploy_model.onnx")],
                       record_stamp(record))
    assert result.export_id == _id(fake)
    assert len(result.notes) == 1 and "amct_deploy_model.onnx" in result.notes[0] and "no export id" in result.notes[0]


def test_verify_fails_on_a_mixed_set_naming_the_files_and_ids(qat, tmp_path, capsys):
    fake, deploy, record = _export(qat, tmp_path, "a")
    _, deploy_b, _ = _export(qat, tmp_path, "b")
    shutil.copyfile(deploy_b, deploy)  # a kill after the deploy model's rename of export b
    assert verify_main([str(tmp_path / "a" / "m")]) == 1
    out = capsys.readouterr().out
    assert "different exports" in out and _id(fake) in out and _id(deploy_b) in out and str(deploy) in out


def test_verify_finds_the_flow_record_beside_a_prefix_and_checks_it(qat, tmp_path, capsys):
    _, _, record = _export(qat, tmp_path, "a")
    _, _, record_b = _export(qat, tmp_path, "b")
    assert verify_main([str(tmp_path / "a" / "m")]) == 0
    assert "one export: id" in capsys.readouterr().out
    shutil.copyfile(record_b, record)
    assert verify_main([str(tmp_path / "a" / "m")]) == 1
    assert str(record) in capsys.readouterr().out


def test_inspect_refuses_a_model_whose_sibling_comes_from_another_export(qat, tmp_path, capsys):
    fake, deploy, _ = _export(qat, tmp_path, "a")
    assert cli_main(["inspect", str(deploy)]) == 0
    assert f"export id: {_id(deploy)}" in capsys.readouterr().out
    _, _, record_b = _export(qat, tmp_path, "b")
    assert cli_main(["inspect", str(deploy), "--record", str(record_b)]) == 5
    err = capsys.readouterr().err
    assert "different exports" in err and str(record_b) in err and _id(deploy) in err


def _trace(qat, tmp_path, name):
    return trace_to_file(qat, models.example_inputs("mlp"), tmp_path / name / "t.onnx", tmp_path / name / "r.txt")


def test_the_stages_carry_the_trace_id_into_both_models_and_the_published_record(qat, tmp_path):
    res = _trace(qat, tmp_path, "a")
    trace_id = read_metadata(res.traced_path)["amct.export_id"]
    publish_record_file(res.record_path, res.traced_path, tmp_path / "out" / "r.txt")
    build_fake_quant_file(res.traced_path, tmp_path / "out" / "r.txt", tmp_path / "out" / "f.onnx")
    build_deploy_file(res.traced_path, tmp_path / "out" / "r.txt", tmp_path / "out" / "d.onnx")
    assert _id(tmp_path / "out" / "f.onnx") == _id(tmp_path / "out" / "d.onnx") == trace_id
    assert record_stamp(tmp_path / "out" / "r.txt").export_id == trace_id


@pytest.mark.parametrize("build", [build_fake_quant_file, build_deploy_file])
def test_a_build_refuses_a_record_of_another_trace_and_writes_nothing(qat, tmp_path, build):
    a, b = _trace(qat, tmp_path, "a"), _trace(qat, tmp_path, "b")
    with pytest.raises(MixedSetError) as e:
        build(a.traced_path, b.record_path, tmp_path / "out.onnx")
    assert a.traced_path in str(e.value) and b.record_path in str(e.value)
    assert not (tmp_path / "out.onnx").exists()


def test_a_build_accepts_a_given_record_of_another_export_and_binds_it_by_hash(qat, tmp_path):
    a, b = _trace(qat, tmp_path, "a"), _trace(qat, tmp_path, "b")
    out = build_deploy_file(a.traced_path, b.record_path, tmp_path / "d.onnx", record_given=True)
    assert _id(out) == read_metadata(a.traced_path)["amct.export_id"]
    assert read_metadata(out)["amct.record_sha256"] == record_stamp(b.record_path).record_sha256


def test_the_flow_set_check_refuses_a_mixed_set(qat, tmp_path):
    from tasks.export import check_export_set

    fake, deploy, record = _export(qat, tmp_path, "a")
    _, _, record_b = _export(qat, tmp_path, "b")
    assert check_export_set(str(fake), str(deploy), str(record), False) == _id(fake)
    with pytest.raises(MixedSetError):
        check_export_set(str(fake), str(deploy), str(record_b), False)


def test_reading_the_metadata_of_a_file_that_is_not_onnx_names_the_file(tmp_path):
    from amct_core.onnx.mapped import MappedModelError

    bad = tmp_path / "x_deploy_model.onnx"
    bad.write_bytes(b"\xff\xff\xff\xff not protobuf")
    with pytest.raises(MappedModelError, match="x_deploy_model.onnx"):
        read_metadata(bad)


def test_verify_says_when_the_files_cannot_be_checked_for_one_export(qat, tmp_path):
    from amct_core.verify import check_file_set

    fake, _, record = _export(qat, tmp_path)
    bad = tmp_path / "x_deploy_model.onnx"
    bad.write_bytes(b"\xff\xff\xff\xff not protobuf")
    result = check_file_set(fake_quant=fake, deploy=bad, record=record)
    assert not result["ok"] and "could not be checked" in result["message"] and str(bad) in result["message"]
