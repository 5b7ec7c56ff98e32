"""Kills and concurrent writers, with real processes (tests/export_worker.py): no corrupt file, no
unnoticed mixed set, no temporary file left after the next export, writers of one save_path serialized."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest

from amct_core._io import stale_temps
from amct_core.export_id import check_set, model_stamp, record_stamp
from amct_core.formats import DEPLOY_MODEL, FAKE_QUANT_MODEL, output_file
from amct_core.verify import check_file_set
from amct_core.verify.cli import main as verify_main
from tests.export_worker import check_one_export
from tests.services import REPO, base_env

pytestmark = pytest.mark.integration
EXTERNAL = {"AMCT_EXTERNAL_DATA_THRESHOLD": str(100 << 20)}  # the 201 MB fake-quant model to external data


def _worker(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.export_worker", *args], cwd=str(REPO),
                            env=base_env(**(env or {})), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: killed by its pid below


def _go(proc: subprocess.Popen) -> None:
    """Wait until the wide worker has loaded its model, then let it export."""
    _wait_ready(proc)
    proc.stdin.write("go\n")
    proc.stdin.flush()


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def _wait_ready(proc: subprocess.Popen) -> None:
    line = proc.stdout.readline()
    if line.strip() != "ready":
        _kill(proc)
        raise AssertionError(f"worker did not start: {line!r} {proc.stderr.read()}")


def _leftovers(files: list[Path]) -> list[Path]:
    """Temporaries of our files and data files no model references."""
    temps = [t for f in files for t in stale_temps(f)]
    referenced = set()
    for f in files[:2]:
        if f.is_file():
            m = onnx.load(str(f), load_external_data=False)
            referenced |= {e.value for t in m.graph.initializer for e in t.external_data if e.key == "location"}
    data = [p for p in files[0].parent.glob("*.data") if p.name not in referenced]
    return temps + data


def _ids(files: list[Path]) -> set[str | None]:
    """Each present file's export id, read directly (not through check_set)."""
    out = set()
    for f in files:
        if f.suffix == ".onnx":
            out.add({p.key: p.value for p in onnx.load(str(f), load_external_data=False).metadata_props}
                    .get("amct.export_id"))
        else:
            first = f.read_text().splitlines()[0]
            out.add(first.split(": ")[1] if first.startswith("# amct.export_id: ") else None)
    return out


@pytest.mark.slow
def test_sigkill_at_random_points_of_a_save_leaves_no_corrupt_file_and_no_unnoticed_mixed_set(tmp_path, capsys):
    import torch

    from tests.export_worker import wide_qat

    qat, _ = wide_qat(tmp_path)
    torch.save(qat.state_dict(), tmp_path / "wide_state.pt")
    del qat
    save_path, record = str(tmp_path / "out" / "wide"), str(tmp_path / "out" / "wide_record.txt")
    files = [output_file(save_path, FAKE_QUANT_MODEL), output_file(save_path, DEPLOY_MODEL), Path(record)]
    args = ("wide", str(tmp_path), save_path, record)

    first = _worker(*args)  # a complete export to start from; its stages' times place the kills
    _go(first)
    t0 = time.monotonic()
    out, err = first.communicate(timeout=600)
    duration = time.monotonic() - t0
    assert first.returncode == 0 and out.startswith("done "), err
    stages = json.loads(out.split(" ", 1)[1])
    write, before_write = stages.pop("write"), sum(stages.values())
    assert files[0].stat().st_size > 200e6  # a model whose write takes long enough to be hit at random points

    # Kills drawn over the whole save would mostly land in the trace and builds, which write nothing:
    # draw them over the write (the temporaries, the renames) and a quarter of it before and after.
    rng = random.Random(10)
    mixed = consistent = temps_seen = 0
    lo, hi = max(0.0, before_write - write / 4), before_write + write * 5 / 4
    proc = _worker(*args)  # each worker loads its model while the last kill's files are checked
    try:
        for i in range(20):
            _go(proc)
            time.sleep(rng.uniform(lo, hi))
            _kill(proc)
            # every other export puts the fake-quant model's weights in an external data file
            proc = _worker(*args, *(["1"] if i == 19 else []), env=EXTERNAL if i % 2 == 0 else None)
            temps_seen += bool(_leftovers(files))
            for f in files[:2]:  # every model present loads, the fake-quant model is checker clean
                onnx.load(str(f))
            onnx.checker.check_model(str(files[0]), full_check=True)
            report = check_file_set(fake_quant=files[0], deploy=files[1], record=record)
            if len(_ids(files)) > 1:
                mixed += 1
                assert not report["ok"] and "different exports" in report["message"], report
            else:
                consistent += 1
                assert report["ok"], report
        # The kill between two renames (a 2 ms window a random kill rarely hits) always leaves a mixed set:
        # after the fake-quant model's rename (new fake-quant model, old deploy model and record), and
        # after the deploy model's (both models new, the record old).
        for renames in (1, 2):
            if renames == 2:
                proc = _worker(*args, str(renames))
            _go(proc)
            assert proc.wait(timeout=600) == -signal.SIGKILL
            assert len(_ids(files)) == 2
            for f in files[:2]:
                onnx.load(str(f))
            assert verify_main([save_path, "--record", record]) == 1  # the whole verify command
            assert "different exports" in capsys.readouterr().out
        with capsys.disabled():
            print(f"20 kills {lo:.1f}-{hi:.1f} s into {duration:.1f} s saves ({write:.1f} s write): {consistent} consistent "
                  f"sets, {mixed} mixed sets detected, {temps_seen} left temporary or orphan data files")
    finally:
        _kill(proc)

    last = _worker(*args)
    _go(last)
    out, err = last.communicate(timeout=600)
    assert last.returncode == 0, err
    assert _leftovers(files) == []
    check_one_export(save_path, record)


@pytest.mark.parametrize("threshold", [None, "10000"], ids=["embedded", "external_data"])
def test_concurrent_writers_of_one_save_path_are_serialized(tmp_path, threshold):
    env = {"AMCT_EXTERNAL_DATA_THRESHOLD": threshold} if threshold else {}
    save_path, record = str(tmp_path / "out" / "m"), str(tmp_path / "out" / "m_record.txt")
    rounds = 4
    workers = []
    for i in range(2):
        (tmp_path / f"w{i}").mkdir()
        workers.append(_worker("rounds", str(tmp_path / f"w{i}"), save_path, record, str(rounds), env=env))
    try:
        results = [w.communicate(timeout=600) for w in workers]
    finally:
        for w in workers:
            _kill(w)
    for w, (out, err) in zip(workers, results, strict=True):
        assert w.returncode == 0, err
        assert len([line for line in out.splitlines() if line.startswith("round ")]) == rounds
    final_id = check_one_export(save_path, record)
    files = [output_file(save_path, FAKE_QUANT_MODEL), output_file(save_path, DEPLOY_MODEL), Path(record)]
    assert _leftovers(files) == []
    assert check_set([model_stamp("fake-quant model", files[0]), model_stamp("deploy model", files[1])],
                     record_stamp(record)).export_id == final_id
    data_files = list((tmp_path / "out").glob("*.data"))
    assert bool(data_files) == bool(threshold)  # the external-data path was taken when the threshold is low
