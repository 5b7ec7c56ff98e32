"""``python -m amct_core.verify``: preflight + deploy simulation (+ parity with a model reference) on files."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import torch

from amct_core.verify.cli import main
from tests import broken_models as bm


def test_cli_passes_on_a_save_path_prefix_and_writes_the_report(tmp_path, capsys):
    e = bm.export("mlp")
    prefix = str(e.deploy).replace("_deploy_model.onnx", "")
    rc = main([prefix, "--report-dir", str(tmp_path / "rep")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert out.startswith("PASS: preflight passed") and "deploy simulation matches" in out
    data = json.loads((tmp_path / "rep" / "verify_report.json").read_text())
    assert data["verdict"] == "pass" and data["checks_run"] == ["preflight", "deploy_simulation"]


def test_cli_fails_with_exit_1_on_a_corrupted_deploy_model(tmp_path, capsys):
    e = bm.export("encoder")
    bad = tmp_path / "enc_deploy_model.onnx"
    onnx.save(bm.corrupt_bias(bm.load(e.deploy), "ff1", index=2), str(bad))
    rc = main(["--deploy", str(bad), "--fake-quant", str(e.fake_quant)])
    out = capsys.readouterr().out
    assert rc == 1
    assert "worst layer 'ff1'" in out and "int32 accumulators differ" in out


def test_cli_preflight_only_reports_findings_and_fails(tmp_path, capsys):
    e = bm.export("cnn")
    bad = tmp_path / "x_deploy_model.onnx"
    onnx.save(bm.nonzero_high_bits(bm.load(e.deploy), "conv1"), str(bad))
    rc = main([str(bad)])
    out = capsys.readouterr().out
    assert rc == 1 and "deq_scale.high_bits" in out and "conv1.dequant.param" in out


def test_cli_usage_errors_exit_2(tmp_path, capsys):
    assert main([]) == 2
    assert main(["--deploy", str(tmp_path / "missing.onnx")]) == 2
    assert main([str(bm.export("mlp").deploy), "--target", "Ascend310"]) == 2
    assert main([str(bm.export("mlp").deploy), "--tol", "no_such=1"]) == 2
    assert "error:" in capsys.readouterr().err


def test_cli_uses_given_inputs(tmp_path, capsys):
    e = bm.export("mlp")
    npz = tmp_path / "in.npz"
    np.savez(npz, np.full((2, 20), 0.5, np.float32))
    rc = main(["--deploy", str(e.deploy), "--fake-quant", str(e.fake_quant), "--inputs", str(npz), "--json"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 0 and data["deploy_simulation"]["inputs"]
    assert list(data["deploy_simulation"]["inputs"].values())[0]["shape"] == [2, 20]


def test_cli_runs_parity_with_a_model_reference_and_checkpoint(tmp_path, capsys, monkeypatch):
    e = bm.export("mlp")
    ckpt = tmp_path / "distilled.pt"
    torch.save(e.model.state_dict(), ckpt)
    cfg = e.deploy.parent / "distill.json"
    (tmp_path / "mymodels.py").write_text(textwrap.dedent(f"""
        from amct_core import create_distill_model
        from tests import models

        def build():
            m = models.build("mlp")
            return create_distill_model({str(cfg)!r}, m, (models.example_inputs("mlp"),))
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    prefix = str(e.deploy).replace("_deploy_model.onnx", "")
    rc = main([prefix, "--model", "mymodels:build", "--checkpoint", str(ckpt), "--json"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 0, data["summary"]
    assert data["checks_run"] == ["preflight", "parity", "deploy_simulation"]
    # the same reference against a perturbed fake-quant file fails
    bad = tmp_path / "p_fake_quant_model.onnx"
    onnx.save(bm.perturb_fake_quant(bm.load(e.fake_quant), "fc3.fakedequant.deq_scale", 1.2), str(bad))
    rc = main(["--fake-quant", str(bad), "--model", "mymodels:build", "--checkpoint", str(ckpt)])
    assert rc == 1 and "worst layer 'fc3'" in capsys.readouterr().out


def test_cli_loads_the_flows_checkpoint_with_the_float_callable_and_the_distill_config(tmp_path, capsys):
    """#14: the distill-export flow's inputs (float model callable, distill config, safetensors state_dict,
    here with DataParallel's 'module.' prefixes) are what verify takes for parity."""
    from safetensors.torch import save_file

    e = bm.export("mlp")
    ckpt = tmp_path / "student.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in e.model.state_dict().items()}, str(ckpt))
    prefix = str(e.deploy).replace("_deploy_model.onnx", "")
    rc = main([prefix, "--model", "tests.models:build", "--model-kwargs", '{"name": "mlp"}',
               "--distill-config", str(e.deploy.parent / "distill.json"), "--checkpoint", str(ckpt), "--json"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 0, data["summary"]
    assert "parity" in data["checks_run"] and data["parity"]["layers"]


def test_cli_names_the_option_whose_input_does_not_load(tmp_path, capsys):
    from tests import models

    e = bm.export("mlp")
    prefix = str(e.deploy).replace("_deploy_model.onnx", "")
    torch.save(models.build("mlp").state_dict(), tmp_path / "float.pt")
    common = [prefix, "--model", "tests.models:build", "--model-kwargs", '{"name": "mlp"}']
    cfg = str(e.deploy.parent / "distill.json")
    assert main(common + ["--distill-config", cfg, "--checkpoint", str(tmp_path / "float.pt")]) == 2
    err = capsys.readouterr().err
    assert "--checkpoint:" in err and "missing keys" in err and "float model" in err
    (tmp_path / "bad.json").write_text('{"nope": {}}')
    assert main(common + ["--distill-config", str(tmp_path / "bad.json"), "--checkpoint", str(tmp_path / "float.pt")]) == 2
    assert "--distill-config:" in capsys.readouterr().err
    assert main(common + ["--distill-config", cfg]) == 2
    assert "needs --checkpoint" in capsys.readouterr().err


def test_python_dash_m_entry_point_exit_codes(tmp_path):
    e = bm.export("mlp")
    ok = subprocess.run([sys.executable, "-m", "amct_core.verify", "--deploy", str(e.deploy), "--fake-quant",
                         str(e.fake_quant)], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = tmp_path / "m_deploy_model.onnx"
    onnx.save(bm.corrupt_deq_scale(bm.load(e.deploy), "fc1", factor=1.5), str(bad))
    fail = subprocess.run([sys.executable, "-m", "amct_core.verify", str(bad), str(e.fake_quant)],
                          capture_output=True, text=True, timeout=120)
    assert fail.returncode == 1 and "fc1" in fail.stdout


def test_help_explains_usage_and_exit_status(capsys):
    import pytest
    with pytest.raises(SystemExit) as ex:
        main(["--help"])
    assert ex.value.code == 0
    out = capsys.readouterr().out
    assert "exit status" in out and "--deploy" in out and "--model" in out


def test_a_file_named_neither_deploy_nor_fake_quant_model_is_a_usage_error(tmp_path, capsys):
    e = bm.export("mlp")
    odd = tmp_path / "model.onnx"
    odd.write_bytes(e.deploy.read_bytes())
    assert main([str(odd)]) == 2
    err = capsys.readouterr().err
    assert "'deploy_model.onnx'" in err and "'fake_quant_model.onnx'" in err and "--deploy" in err
