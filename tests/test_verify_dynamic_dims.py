"""Verifying models exported with the seed's dynamic-axes form (N, H, W dynamic): generated inputs take
the export's sizes recorded in the files, ``dims=`` / ``--dim NAME=N`` override them, and files without
the record (AMCT's) keep the default size 1."""
from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from amct_core import save_distill_model
from amct_core.onnx import metadata
from amct_core.verify import InputSizeError, check_parity, compare_deploy, simulate_deploy, verify
from amct_core.verify._run import generate_inputs
from amct_core.verify.cli import main
from tests import models

SEED_AXES = dict(input_names=["inputs"], output_names=["outputs"],
                 dynamic_axes={"inputs": [0, 2, 3], "outputs": [0]})
N, H, W = "inputs_dynamic_axes_1", "inputs_dynamic_axes_2", "inputs_dynamic_axes_3"
EXPORT_SHAPE = {"unet": [2, 3, 32, 32], "cnn": [2, 3, 16, 16]}
SECOND = {N: 3, H: 48, W: 40}


@dataclass
class Exported:
    name: str
    qat: torch.nn.Module
    dir: Path
    prefix: str
    fake_quant: Path
    deploy: Path


@pytest.fixture(scope="module")
def export_of(tmp_path_factory):
    """tests.models' net exported in the seed's form, once per module and name."""
    done: dict[str, Exported] = {}

    def get(name: str) -> Exported:
        if name not in done:
            d = tmp_path_factory.mktemp(name)
            qat = models.make_qat(name, d)
            save_distill_model(qat, str(d / name), models.example_inputs(name), record_file=str(d / "r.txt"),
                               **SEED_AXES)
            done[name] = Exported(name, qat, d, str(d / name), d / f"{name}_fake_quant_model.onnx",
                                  d / f"{name}_deploy_model.onnx")
        return done[name]

    return get


@pytest.fixture(scope="module", params=["unet", "cnn"])
def exported(request, export_of) -> Exported:
    """The UNet-style net (stride-2 conv, ConvTranspose2d, concat with the skip) and the CNN with
    global pooling."""
    return export_of(request.param)


@pytest.fixture(scope="module")
def unet(export_of) -> Exported:
    return export_of("unet")


def _without_record(src: Path, dst: Path) -> Path:
    """The same model as AMCT writes it: no amct.input_shapes in metadata_props."""
    m = onnx.load(str(src))
    del m.metadata_props[:]
    onnx.save(m, str(dst))
    return dst


def _shape(report: dict, check: str) -> list[int]:
    return report[check]["inputs"]["inputs"]["shape"]


# ---- Python API ------------------------------------------------------------------------------

def test_verify_runs_at_the_export_size_by_default(exported):
    report, _ = verify(deploy=exported.deploy, fake_quant=exported.fake_quant, torch_model=exported.qat)
    assert report["verdict"] == "pass", report["summary"]
    assert _shape(report, "deploy_simulation") == _shape(report, "parity") == EXPORT_SHAPE[exported.name]


def test_verify_runs_at_a_second_size_given_with_dims(exported):
    report, _ = verify(deploy=exported.deploy, fake_quant=exported.fake_quant, torch_model=exported.qat, dims=SECOND)
    assert report["verdict"] == "pass", report["summary"]
    assert _shape(report, "deploy_simulation") == _shape(report, "parity") == [3, 3, 48, 40]


def test_dims_override_only_the_dimensions_they_name(exported):
    r = compare_deploy(exported.deploy, exported.fake_quant, dims={N: 1})
    assert r.ok, r.message
    assert r.inputs["inputs"]["shape"] == [1] + EXPORT_SHAPE[exported.name][1:]


def test_check_parity_sizes_generated_inputs_with_dims(exported):
    r = check_parity(exported.qat, exported.fake_quant, dims={H: 24, W: 8})
    assert r.ok, r.message
    assert r.inputs["inputs"]["shape"] == EXPORT_SHAPE[exported.name][:2] + [24, 8]


def test_a_file_without_the_record_keeps_the_default_size_1(exported, tmp_path):
    amct_style = _without_record(exported.fake_quant, tmp_path / "m_fake_quant_model.onnx")
    assert generate_inputs(onnx.load(str(amct_style)))["inputs"].shape == (1, 3, 1, 1)


def test_dims_naming_no_symbolic_dimension_are_refused_with_the_known_names(exported):
    with pytest.raises(ValueError, match=rf"no input dimension is named 'batch'.*{H} \(input 'inputs', axis 2\)"):
        generate_inputs(onnx.load(str(exported.fake_quant)), dims={"batch": 4})


def test_a_record_of_another_rank_than_the_graph_input_is_refused(exported):
    m = onnx.load(str(exported.fake_quant))
    metadata.write_prop(m, metadata.INPUT_SHAPES, json.dumps({"inputs": {"shape": [3, 32, 32], "dtype": "float32"}}))
    with pytest.raises(ValueError, match=r"'amct.input_shapes' gives input 'inputs' the shape \[3, 32, 32\], "
                                         r"but the graph input has rank 4"):
        generate_inputs(m)


@pytest.mark.parametrize("size", [0, -2, 2.5, True])
def test_dims_sizes_must_be_positive_ints(exported, size):
    with pytest.raises(ValueError, match=rf"size of symbolic dimension '{H}' must be a positive int"):
        generate_inputs(onnx.load(str(exported.fake_quant)), dims={H: size})


# ---- command line ----------------------------------------------------------------------------

def _cli_model_module(exported: Exported, tmp_path: Path, monkeypatch) -> list[str]:
    """--model / --checkpoint arguments that rebuild the distilled model from a state_dict."""
    torch.save(exported.qat.state_dict(), tmp_path / "distilled.pt")
    cfg = exported.dir / f"{exported.name}_distill_config.json"
    mod = f"build_{exported.name}"
    (tmp_path / f"{mod}.py").write_text(textwrap.dedent(f"""
        from amct_core import create_distill_model
        from tests import models

        def build():
            return create_distill_model({str(cfg)!r}, models.build({exported.name!r}),
                                        (models.example_inputs({exported.name!r}),))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    return ["--model", f"{mod}:build", "--checkpoint", str(tmp_path / "distilled.pt")]


def test_cli_verifies_at_the_export_size(exported, tmp_path, capsys, monkeypatch):
    rc = main([exported.prefix, "--json"] + _cli_model_module(exported, tmp_path, monkeypatch))
    report = json.loads(capsys.readouterr().out)
    assert rc == 0, report["summary"]
    assert _shape(report, "deploy_simulation") == _shape(report, "parity") == EXPORT_SHAPE[exported.name]


def test_cli_verifies_at_a_second_size_given_with_dim(exported, tmp_path, capsys, monkeypatch):
    dims = [a for k, v in SECOND.items() for a in ("--dim", f"{k}={v}")]
    rc = main([exported.prefix, "--json", *dims] + _cli_model_module(exported, tmp_path, monkeypatch))
    report = json.loads(capsys.readouterr().out)
    assert rc == 0, report["summary"]
    assert _shape(report, "deploy_simulation") == _shape(report, "parity") == [3, 3, 48, 40]


def test_cli_refuses_a_dim_that_names_no_symbolic_dimension(exported, capsys):
    assert main([exported.prefix, "--dim", "batch=4"]) == 2
    err = capsys.readouterr().err
    assert "--dim: no input dimension is named 'batch'" in err and f"{N} (input 'inputs', axis 0)" in err


@pytest.mark.parametrize("arg", ["batch", "batch=", "batch=0", "batch=x", "=3"])
def test_cli_refuses_a_dim_that_is_not_name_equals_positive_int(exported, capsys, arg):
    assert main([exported.prefix, "--dim", arg]) == 2
    assert f"--dim {arg!r}: expected NAME=N with N a positive integer" in capsys.readouterr().err


def test_cli_refuses_dim_together_with_given_inputs(exported, tmp_path, capsys):
    np.savez(tmp_path / "x.npz", inputs=np.zeros(EXPORT_SHAPE[exported.name], np.float32))
    assert main([exported.prefix, "--inputs", str(tmp_path / "x.npz"), "--dim", f"{H}=8"]) == 2
    assert "--dim sizes generated inputs" in capsys.readouterr().err


# ---- sizes the model cannot run at -------------------------------------------------------------

def _amct_style(e: Exported, tmp_path: Path) -> tuple[Path, Path]:
    return (_without_record(e.deploy, tmp_path / "amct_deploy_model.onnx"),
            _without_record(e.fake_quant, tmp_path / "amct_fake_quant_model.onnx"))


def test_default_sizes_that_cannot_run_are_named_in_one_line_with_the_dims_to_pass(unet, tmp_path):
    deploy, fake = _amct_style(unet, tmp_path)
    with pytest.raises(InputSizeError) as info:
        compare_deploy(deploy, fake)
    msg = str(info.value)
    assert "\n" not in msg and "Non concat axis" not in msg
    assert msg.startswith("generated inputs cannot run (ONNX Runtime failed in Concat node")
    assert (f"{N} (input 'inputs', axis 0), {H} (input 'inputs', axis 2), {W} (input 'inputs', axis 3) = 1, "
            "the default (the file does not record the sizes it was exported at)") in msg
    assert f"--dim {N}=N --dim {H}=N --dim {W}=N (Python: dims={{'{N}': N, '{H}': N, '{W}': N}})" in msg
    assert "Non concat axis" in str(info.value.__cause__)


def test_a_given_size_that_cannot_run_is_named_with_the_export_size(unet):
    with pytest.raises(InputSizeError) as info:
        compare_deploy(unet.deploy, unet.fake_quant, dims={H: 33})
    msg = str(info.value)
    assert f": {H} (input 'inputs', axis 2) = 33 as given (exported at 32); set sizes the model accepts: --dim {H}=32 " in msg
    assert N not in msg and W not in msg


def test_simulate_deploy_names_the_dimension_too(unet):
    with pytest.raises(InputSizeError, match=rf"{W} \(input 'inputs', axis 3\) = 7 as given"):
        simulate_deploy(unet.deploy, dims={W: 7})


def test_parity_names_the_dimension_when_generated_inputs_cannot_run(unet, tmp_path):
    # ONNX Runtime runs before torch (so the two models' weights are never resident together): it fails first
    _, fake = _amct_style(unet, tmp_path)
    with pytest.raises(InputSizeError, match=r"^generated inputs cannot run \(ONNX Runtime failed in Concat node "
                                             r".*--dim inputs_dynamic_axes_2=N"):
        check_parity(unet.qat, fake)


class _RunsOnlyAtTheExportSize(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        if x.shape[-2:] != (32, 32):
            raise RuntimeError("Sizes of tensors must match (this model runs at 32x32 only)")
        return self.inner(x)


def test_parity_names_the_dimension_when_only_the_torch_model_cannot_run(unet):
    # ONNX Runtime runs the file at 48x40; the torch model refuses: its error is the one named
    with pytest.raises(InputSizeError, match=r"^generated inputs cannot run \(the torch model raised RuntimeError: "
                                             r"Sizes of tensors must match.*--dim inputs_dynamic_axes_2=32"):
        check_parity(_RunsOnlyAtTheExportSize(unet.qat), unet.fake_quant, dims=SECOND)


def test_given_inputs_that_cannot_run_keep_the_runtime_error(unet):
    with pytest.raises(Exception, match="Non concat axis") as info:
        compare_deploy(unet.deploy, unet.fake_quant, inputs={"inputs": np.zeros((1, 3, 33, 33), np.float32)})
    assert not isinstance(info.value, InputSizeError)


def test_a_failure_at_the_recorded_sizes_keeps_the_runtime_error(unet, tmp_path):
    m = onnx.load(str(unet.fake_quant))
    metadata.write_prop(m, metadata.INPUT_SHAPES, json.dumps({"inputs": {"shape": [1, 3, 33, 33], "dtype": "float32"}}))
    onnx.save(m, str(tmp_path / "odd_fake_quant_model.onnx"))
    with pytest.raises(Exception, match="Non concat axis") as info:
        compare_deploy(unet.deploy, tmp_path / "odd_fake_quant_model.onnx")
    assert not isinstance(info.value, InputSizeError)


def test_cli_prints_one_line_naming_the_dimensions_and_exits_1(unet, tmp_path, capfd):
    deploy, fake = _amct_style(unet, tmp_path)
    assert main(["--deploy", str(deploy), "--fake-quant", str(fake)]) == 1
    out, err = capfd.readouterr()
    assert out.count("\n") == 1 and err == ""
    assert out.startswith("FAIL: deploy simulation could not run: InputSizeError: generated inputs cannot run ")
    assert f"--dim {H}=N" in out


# ---- the flow's stages and parity task ----------------------------------------------------------

def test_the_flow_stages_and_parity_task_check_a_seed_form_export_at_its_size(tmp_path):
    from tasks.export import deploy_build, fake_quant_build, trace
    from tasks.parity import parity
    from tasks.specs import GraphSpec, ModelSpec

    qat = models.make_qat("unet", tmp_path)
    torch.save(qat.state_dict(), tmp_path / "unet.pt")
    spec = ModelSpec(str(tmp_path / "unet.pt"), "tests.models:build", {"name": "unet"},
                     str(tmp_path / "unet_distill_config.json"), [1, 3, 24, 32])
    tr = trace.fn(spec, GraphSpec(target="A2", opset=11, **SEED_AXES), str(tmp_path / "t.onnx"),
                  str(tmp_path / "r.txt"))
    fq = fake_quant_build.fn(tr.path, str(tmp_path / "r.txt"), str(tmp_path / "unet_fake_quant_model.onnx"), "A2")
    dp = deploy_build.fn(tr.path, str(tmp_path / "r.txt"), str(tmp_path / "unet_deploy_model.onnx"), "A2")
    res = parity.fn(spec, fq.path, dp.path, str(tmp_path / "parity"), None, "A2")
    assert res.passed, res.summary
    report = json.loads((tmp_path / "parity" / "report.json").read_text())
    assert _shape(report, "deploy_simulation") == _shape(report, "parity") == [1, 3, 24, 32]
