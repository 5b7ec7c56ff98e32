"""Writers of one output file are serialized by its lock; temporaries of killed writers are removed, and only
those (issue 10, items 7 and 9). The kill and concurrency tests with real exports: tests/test_write_safety.py."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from amct_core import save_distill_model
from amct_core._io import OutputLockedError, is_temp_of, lock_path_for, output_lock, temp_path_for
from amct_core.errors import ExportError
from tests import models
from tests.services import REPO, base_env

HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from amct_core._io import output_lock, temp_path_for
    final = Path(sys.argv[1])
    with output_lock([final]):
        tmp = temp_path_for(final)  # a live writer's temporary file
        print(tmp, flush=True)
        time.sleep(float(sys.argv[2]))
""")


@pytest.fixture(scope="module")
def qat(tmp_path_factory):
    return models.make_qat("mlp", tmp_path_factory.mktemp("qat"))


def _save(qat, save_path, record):
    save_distill_model(qat, str(save_path), models.example_inputs("mlp"), record_file=str(record))


def _holder(final, seconds: float) -> tuple[subprocess.Popen, str]:
    """Another process holding ``final``'s lock for ``seconds``, with a temporary file of it; returns it and
    the temporary's path once the lock is held."""
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(final), str(seconds)], cwd=str(REPO), env=base_env(),
                         stdout=subprocess.PIPE, text=True, start_new_session=True)
    return p, p.stdout.readline().strip()


def _stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
    p.wait(timeout=30)


def test_an_export_removes_the_temporaries_a_killed_export_left(qat, tmp_path):
    stale = [tmp_path / ".m_fake_quant_model.onnx.ab_cd123.tmp", tmp_path / ".m_deploy_model.onnx.0123abcd.tmp",
             tmp_path / ".r.txt.zzzzzzzz.tmp"]
    for p in stale:
        p.write_bytes(b"partial")
    _save(qat, tmp_path / "m", tmp_path / "r.txt")
    assert [p for p in stale if p.exists()] == []


def test_an_export_keeps_files_that_only_look_like_its_temporaries(qat, tmp_path):
    (tmp_path / "sub").mkdir()
    kept = [
        tmp_path / ".m_fake_quant_model.onnx.abc.tmp",           # random part not 8 characters
        tmp_path / ".m_fake_quant_model.onnx.ABCDEFGH.tmp",      # not mkstemp's alphabet
        tmp_path / "m_fake_quant_model.onnx.abcdefgh.tmp",       # not hidden
        tmp_path / ".other_fake_quant_model.onnx.abcdefgh.tmp",  # another export's file
        tmp_path / ".m_fake_quant_model.onnx.abcdefgh.tmp.bak",  # another suffix
        tmp_path / "sub" / ".m_fake_quant_model.onnx.abcdefgh.tmp",  # another directory
        tmp_path / "notes.txt",
    ]
    for p in kept:
        p.write_bytes(b"user data")
    _save(qat, tmp_path / "m", tmp_path / "r.txt")
    assert all(p.read_bytes() == b"user data" for p in kept)


def test_the_temporary_pattern_is_exactly_the_one_temp_path_for_makes(tmp_path):
    final = tmp_path / "a[1]*.onnx"
    tmp = temp_path_for(final)
    assert is_temp_of(final, tmp)
    assert not is_temp_of(tmp_path / "a.onnx", tmp)
    assert not is_temp_of(final, tmp_path / "x" / tmp.name)


def test_a_second_writer_waits_for_the_first_to_release_the_lock(qat, tmp_path):
    holder, live_tmp = _holder(tmp_path / "m_deploy_model.onnx", 2.0)
    try:
        _save(qat, tmp_path / "m", tmp_path / "r.txt")  # blocks until the holder has released the lock
        assert holder.poll() is not None
        assert holder.returncode == 0
    finally:
        _stop(holder)
    assert not os.path.exists(live_tmp)  # the holder ended without renaming it: a dead writer's leftover
    assert (tmp_path / "m_deploy_model.onnx").is_file()


def test_past_the_lock_timeout_the_error_names_the_lock_and_its_holder_and_nothing_is_written(qat, tmp_path, monkeypatch):
    holder, live_tmp = _holder(tmp_path / "m_fake_quant_model.onnx", 60)
    monkeypatch.setenv("AMCT_LOCK_TIMEOUT", "0.5")
    try:
        with pytest.raises(OutputLockedError) as e:
            _save(qat, tmp_path / "m", tmp_path / "r.txt")
    finally:
        _stop(holder)
    assert str(lock_path_for(tmp_path / "m_fake_quant_model.onnx")) in str(e.value)
    assert f"pid {holder.pid}" in str(e.value)
    assert os.path.exists(live_tmp)
    assert not (tmp_path / "m_fake_quant_model.onnx").exists() and not (tmp_path / "r.txt").exists()


def test_a_lock_is_free_again_when_its_holder_is_killed(tmp_path, monkeypatch):
    holder, _ = _holder(tmp_path / "f.onnx", 60)
    _stop(holder)  # SIGKILL: the kernel releases the flock
    monkeypatch.setenv("AMCT_LOCK_TIMEOUT", "0")
    with output_lock([tmp_path / "f.onnx"]) as removed:
        assert [p.name.startswith(".f.onnx.") for p in removed] == [True]  # the killed holder's temporary


def test_a_bad_lock_timeout_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("AMCT_LOCK_TIMEOUT", "soon")
    with pytest.raises(ExportError, match="AMCT_LOCK_TIMEOUT='soon'"):
        with output_lock([tmp_path / "f.onnx"]):
            pass


def test_the_external_data_threshold_is_lowered_by_its_environment_variable(qat, tmp_path, monkeypatch):
    monkeypatch.setenv("AMCT_EXTERNAL_DATA_THRESHOLD", "1000")
    _save(qat, tmp_path / "m", tmp_path / "r.txt")
    assert len(list(tmp_path.glob("m_fake_quant_model.onnx.*.data"))) == 1


def test_a_bad_external_data_threshold_names_the_variable(qat, tmp_path, monkeypatch):
    monkeypatch.setenv("AMCT_EXTERNAL_DATA_THRESHOLD", "2GB")
    with pytest.raises(ExportError, match="AMCT_EXTERNAL_DATA_THRESHOLD='2GB'"):
        _save(qat, tmp_path / "m", tmp_path / "r.txt")
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".amct.lock")] == []
