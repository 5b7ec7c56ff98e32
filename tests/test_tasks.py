"""Stage helpers without a Prefect server: the model memo and its errors as flow parameters, the
content-hash cache key, file records, and the layering rules (no mlflow/prefect in amct_core, no private
module imported across packages)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from tasks.files import FileRef
from tasks.model import build_model, release_models, release_weights
from tasks.specs import ModelSpec, ParameterError, import_callable
from tasks.stage import FileContentInputs

REPO = Path(__file__).resolve().parents[1]


# ---- the model (amct_core.checkpoint, tests/test_checkpoint.py), errors as flow parameters ---------------

def _spec(tmp_path, name="mlp", shape=(1, 20)):
    from tests import models

    qat = models.make_qat(name, tmp_path)
    torch.save(qat.state_dict(), tmp_path / f"{name}.pt")
    return ModelSpec(str(tmp_path / f"{name}.pt"), "tests.models:build", {"name": name},
                     str(tmp_path / f"{name}_distill_config.json"), list(shape)), qat


def test_build_model_loads_the_distilled_weights_once_per_process(tmp_path):
    spec, qat = _spec(tmp_path)
    model = build_model(spec)
    assert not model.training
    x = torch.randn(4, 20)
    assert torch.equal(model(x), qat(x))
    assert build_model(spec) is model
    release_models()
    assert build_model(spec) is not model


def test_release_weights_maps_the_weights_afresh_and_keeps_the_model(tmp_path):
    spec, qat = _spec(tmp_path)
    model = build_model(spec)
    x = torch.randn(4, 20)
    before = {n: p.data_ptr() for n, p in model.named_parameters()}
    release_weights()
    assert build_model(spec) is model
    assert all(p.data_ptr() != before[n] for n, p in model.named_parameters())  # new mappings, old ones dropped
    assert torch.equal(model(x), qat(x))
    release_models()


def test_releasing_a_model_whose_checkpoint_is_gone_just_forgets_it(tmp_path):
    (tmp_path / "a").mkdir()
    spec, qat = _spec(tmp_path / "a")
    build_model(spec)
    Path(spec.checkpoint).unlink()
    release_models()  # must not try to map the deleted file
    spec2, _ = _spec(tmp_path)
    assert torch.equal(build_model(spec2)(torch.ones(1, 20)), qat(torch.ones(1, 20)))
    release_models()


@pytest.mark.parametrize("change, parameter", [
    ({"checkpoint": "float"}, "checkpoint"),
    ({"model_kwargs": {"nam": "mlp"}}, "model_kwargs"),
    ({"model": "tests.models:nope"}, "model"),
    ({"distill_config": "bad"}, "distill_config"),
])
def test_load_errors_name_the_flow_parameter(tmp_path, change, parameter):
    from dataclasses import replace

    from tests import models

    spec, _ = _spec(tmp_path)
    if change.get("checkpoint") == "float":
        torch.save(models.build("mlp").state_dict(), tmp_path / "float.pt")
        change = {"checkpoint": str(tmp_path / "float.pt")}
    if change.get("distill_config") == "bad":
        (tmp_path / "bad.json").write_text('{"nope": {}}')
        change = {"distill_config": str(tmp_path / "bad.json")}
    with pytest.raises(ParameterError) as e:
        build_model(replace(spec, **change))
    assert str(e.value).startswith(f"parameter {parameter!r}: ")


def test_the_default_distill_config_leaves_no_temporary_file(tmp_path, monkeypatch):
    import tempfile

    spec, qat = _spec(tmp_path)  # tests.models wraps with the default config too
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    model = build_model(ModelSpec(spec.checkpoint, spec.model, spec.model_kwargs, None, spec.input_shape))
    assert list(model.state_dict()) == list(qat.state_dict())
    assert list(tmp.iterdir()) == []


def test_import_callable_errors_name_the_parameter():
    with pytest.raises(ParameterError) as e:
        import_callable("nope_pkg.mod:fn")
    assert str(e.value).startswith("parameter 'model'") and "does not import" in str(e.value)


# ---- cache key -------------------------------------------------------------------------------

def _key(policy, **inputs):
    return policy.compute_key(None, inputs, {})


def test_cache_key_follows_input_file_content_not_its_mtime(tmp_path):
    p = FileContentInputs(outputs=("out_path",))
    f = tmp_path / "in.onnx"
    f.write_bytes(b"one")
    k1 = _key(p, traced_path=str(f), out_path=str(tmp_path / "o.onnx"), opset=11)
    f.write_bytes(b"one")  # same content, new mtime
    assert _key(p, traced_path=str(f), out_path=str(tmp_path / "o.onnx"), opset=11) == k1
    f.write_bytes(b"two")
    assert _key(p, traced_path=str(f), out_path=str(tmp_path / "o.onnx"), opset=11) != k1


def test_cache_key_ignores_what_the_stage_writes_but_not_where(tmp_path):
    p = FileContentInputs(outputs=("out_path",))
    out = tmp_path / "o.onnx"
    k1 = _key(p, out_path=str(out), opset=11)
    out.write_bytes(b"written by the stage")
    assert _key(p, out_path=str(out), opset=11) == k1
    assert _key(p, out_path=str(tmp_path / "other.onnx"), opset=11) != k1
    assert _key(p, out_path=str(out), opset=13) != k1


def test_cache_key_hashes_files_inside_a_spec(tmp_path):
    p = FileContentInputs()
    ck = tmp_path / "c.pt"
    ck.write_bytes(b"a")
    spec = ModelSpec(str(ck), "m:f", {}, None, [1, 2])
    k1 = _key(p, spec=spec)
    ck.write_bytes(b"b")
    assert _key(p, spec=spec) != k1


# ---- files -----------------------------------------------------------------------------------

def test_file_ref_detects_changes(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(b"abc")
    ref = FileRef.of(f)
    assert ref.intact() and ref.size == 3 and len(ref.sha256) == 64
    f.write_bytes(b"abd")
    assert not ref.intact()
    f.unlink()
    assert not ref.intact()


def test_onnx_files_are_the_model_and_its_external_data_files(tmp_path):
    import onnx

    from tasks.files import onnx_files
    from tests import broken_models as bm

    src = bm.export("mlp").fake_quant
    assert [r.path for r in onnx_files(src)] == [str(src.resolve())]  # embedded: one file
    ext = tmp_path / "m.onnx"
    onnx.save_model(onnx.load(str(src)), str(ext), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.onnx.data", size_threshold=1024)
    refs = onnx_files(ext)
    assert [Path(r.path).name for r in refs] == ["m.onnx", "m.onnx.data"]
    assert refs[1].size == (tmp_path / "m.onnx.data").stat().st_size


# ---- layering --------------------------------------------------------------------------------

def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


def test_layering_mlflow_in_one_task_module_prefect_only_in_tasks_and_flows():
    lib = list((REPO / "amct_core").rglob("*.py"))
    assert lib
    for f in lib:
        assert not _imports(f) & {"prefect", "mlflow"}, f"{f} imports prefect/mlflow"
    users = sorted(str(f.relative_to(REPO)) for d in ("tasks", "flows") for f in (REPO / d).rglob("*.py")
                   if "mlflow" in _imports(f))
    assert users == ["tasks/tracking.py"]


def test_no_module_imports_a_private_module_of_another_package():
    """amct_core, tasks and flows meet through public modules only (an underscore module is its package's own)."""
    ours = ("amct_core", "tasks", "flows", "examples", "bench")
    for d in ours:
        for f in (REPO / d).rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules = [node.module]
                elif isinstance(node, ast.Import):
                    modules = [a.name for a in node.names]
                else:
                    continue
                for m in modules:
                    top, *rest = m.split(".")
                    if top in ours and top != d:
                        assert not any(x.startswith("_") and not x.startswith("__") for x in rest), \
                            f"{f.relative_to(REPO)} imports {m}"


def test_flow_parameters_are_exactly_the_documented_ones():
    """docs/PIPELINE.md documents every parameter of the flow."""
    from flows.parameters import flow_parameters

    doc = (REPO / "docs" / "PIPELINE.md").read_text()
    for p in flow_parameters():
        assert f"`{p.name}`" in doc, f"parameter {p.name} is not documented in docs/PIPELINE.md"


def test_prefect_parity_table_lists_layers_in_the_reports_order_with_local_figures(tmp_path):
    from amct_core.verify import verify
    from tasks.parity import summarize
    from tests import broken_models as bm

    e = bm.export("cnn")
    report, _ = verify(deploy=e.deploy, fake_quant=e.fake_quant, torch_model=e.model, example_inputs=e.example,
                       report_dir=tmp_path)
    _, rows = summarize(report)
    layer_rows = [r for r in rows if r["check"] == "parity layer"]
    assert [r["name"] for r in layer_rows] == [l["name"] for l in report["parity"]["layers"]]
    assert [r["local_sqnr_db"] for r in layer_rows] == sorted(r["local_sqnr_db"] for r in layer_rows)
