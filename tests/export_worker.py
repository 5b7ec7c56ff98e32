"""A separate process that exports, for the tests of kills and concurrent writers (tests/test_write_safety.py).

``python -m tests.export_worker wide <work> <save_path> <record_file>``: loads the wide QAT model the test
saved in ``<work>`` (``wide_state.pt`` + ``wide_distill_config.json``, weights_only), prints ``ready``,
waits for a line on stdin and runs one save_distill_model, then prints ``done`` and the seconds of its stages as JSON. A fifth argument
``n`` makes it SIGKILL itself right after the ``n``-th model's rename: the kill between renames that
leaves a mixed set. The test kills it with SIGKILL at a random moment.

``python -m tests.export_worker rounds <work> <save_path> <record_file> <n>``: exports the small CNN ``n``
times; after each export it takes the three files' writer locks, checks they form one readable export
(same export id in all three, fake-quant model checker clean, record the one the models were built
from) and prints ``round <i> <export id>``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

WIDE = {"d": 1536, "ff": 8192, "blocks": 2}  # 50M weights: a 201 MB fake-quant model and a 50 MB deploy model
WIDE_INPUT = (1, 4, WIDE["d"])


def wide_qat(work: Path):
    """The wide test model, wrapped and calibrated (run once by the test, in its own process)."""
    import torch

    from amct_core import create_distill_config, create_distill_model
    from amct_core.distill import calibrate
    from tests.models import build_wide

    model = build_wide(**WIDE)
    x = torch.randn(*WIDE_INPUT, generator=torch.Generator().manual_seed(0))
    cfg = work / "wide_distill_config.json"
    create_distill_config(str(cfg), model, x)
    qat = create_distill_model(str(cfg), model, x)
    calibrate(qat, [(x,)])
    return qat.eval(), x


def _die_after_renames(n: int) -> None:
    """SIGKILL this process right after the ``n``-th model is renamed into place (between two renames)."""
    import os
    import signal

    from amct_core.onnx import io

    commit, done = io.PendingWrite.commit, []

    def commit_then_die(self):
        commit(self)
        done.append(self.final)
        if len(done) == n:
            os.kill(os.getpid(), signal.SIGKILL)

    io.PendingWrite.commit = commit_then_die


def _wide(work: Path, save_path: str, record: str) -> None:
    import torch

    from amct_core import save, save_distill_model
    from amct_core.checkpoint import load_distilled_model

    x = torch.randn(*WIDE_INPUT, generator=torch.Generator().manual_seed(0))
    model = load_distilled_model("tests.models:build_wide", work / "wide_state.pt", work / "wide_distill_config.json",
                                 x, model_kwargs=WIDE)
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":  # the test starts the next worker while it checks the files
        return
    save_distill_model(model, save_path, x, record_file=record)
    print(f"done {json.dumps(save.last_stage_seconds)}", flush=True)


def check_one_export(save_path: str, record: str) -> str:
    """The files of ``save_path`` and ``record`` form one readable export; returns its id."""
    import onnx

    from amct_core.export_id import check_set, model_stamp, record_stamp
    from amct_core.formats import DEPLOY_MODEL, FAKE_QUANT_MODEL, output_file
    from amct_core.onnx.mapped import open_model
    from amct_core.record import read_record

    fake, deploy = output_file(save_path, FAKE_QUANT_MODEL), output_file(save_path, DEPLOY_MODEL)
    onnx.checker.check_model(str(fake), full_check=True)  # by path: external data files are read too
    open_model(deploy)
    open_model(fake)
    read_record(record)
    result = check_set([model_stamp("fake-quant model", fake), model_stamp("deploy model", deploy)],
                       record_stamp(record))
    assert result.export_id, "no export id in the files"
    return result.export_id


def _rounds(work: Path, save_path: str, record: str, n: int) -> None:
    from amct_core import save_distill_model
    from amct_core._io import output_lock
    from amct_core.formats import DEPLOY_MODEL, FAKE_QUANT_MODEL, output_file
    from tests import models

    qat = models.make_qat("cnn", work)
    x = models.example_inputs("cnn")
    finals = [output_file(save_path, FAKE_QUANT_MODEL), output_file(save_path, DEPLOY_MODEL), Path(record)]
    print("ready", flush=True)
    for i in range(n):
        save_distill_model(qat, save_path, x, record_file=record)
        with output_lock(finals):  # no writer is between its renames while we hold the locks
            print(f"round {i} {check_one_export(save_path, record)}", flush=True)


def main(argv: list[str]) -> int:
    mode, work, save_path, record = argv[0], Path(argv[1]), argv[2], argv[3]
    if mode == "wide":
        if len(argv) > 4:
            _die_after_renames(int(argv[4]))
        _wide(work, save_path, record)
    elif mode == "rounds":
        _rounds(work, save_path, record, int(argv[4]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
