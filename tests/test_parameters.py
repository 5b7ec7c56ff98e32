"""The flow's parameters (flows/parameters.py): declared once by the flow's signature and docstring, checked
once into an export plan by rules the flow and the CLI share."""
from __future__ import annotations

import inspect
import json
import subprocess
import sys
import textwrap

import pytest

from flows.parameters import ExportPlan, default_names, flow_defaults, flow_parameters
from tasks.specs import ParameterError
from tests import services


@pytest.fixture
def params(tmp_path):
    ck = tmp_path / "ck.safetensors"
    ck.write_bytes(b"")  # the rules check that it exists; loading it is the first stage's job
    return {"checkpoint": str(ck), "model": "tests.models:build", "model_kwargs": {"name": "cnn"},
            "input_shape": [1, 3, 16, 16], "output_dir": str(tmp_path / "out")}


def _error(p) -> ParameterError:
    with pytest.raises(ParameterError) as e:
        ExportPlan.check(p)
    return e.value


def test_flow_defaults_are_the_flows_signature():
    from flows.distill_export import distill_export

    sig = inspect.signature(distill_export.fn).parameters
    assert flow_defaults() == {k: v.default for k, v in sig.items() if v.default is not inspect.Parameter.empty}
    assert [p.name for p in flow_parameters()] == list(sig)


def test_every_flow_parameter_has_its_own_entry_in_the_docstrings_args():
    for p in flow_parameters():
        assert len(p.help) > 10, f"parameter {p.name!r} has no Args entry in distill_export's docstring"
    assert flow_parameters()[0].help.startswith("the distilled model's state_dict")


def test_an_unknown_parameter_is_named_with_the_known_ones(params):
    e = _error({**params, "input_shapes": [1, 3, 16, 16]})
    assert e.parameter == "input_shapes" and "'input_shape'" in str(e)


def test_a_missing_required_parameter_is_named(params):
    del params["model"]
    assert _error(params).parameter == "model"


def test_the_plan_holds_what_each_stage_is_given(params, tmp_path):
    plan = ExportPlan.check({**params, "name": "cnn", "target": "a3", "dynamic_axes": {"input": [0]}})
    assert plan.graph.target == "A3" and plan.graph.opset == 11
    assert plan.graph.dynamic_axes == {"input": {0: "input_dynamic_axes_1"}}
    assert plan.model.checkpoint == str(tmp_path / "ck.safetensors") and len(plan.model.model_source_sha256) == 64
    assert plan.files.fake_quant == str(tmp_path / "out" / "cnn_fake_quant_model.onnx")
    assert plan.files.traced == str(tmp_path / "out" / ".amct_work" / "cnn_traced.onnx")
    assert plan.tracking.experiment == "amct-export" and plan.tracking.retries == 3
    assert "mlflow_retries" not in plan.parameters and plan.parameters["target"] == "A3"


def test_the_rules_load_without_prefect_or_torch():
    code = ("import sys; import flows.parameters, flows.cli; flows.cli.build_parser(); "
            "print(sorted(m for m in ('prefect', 'torch', 'mlflow') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=services.REPO, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


@pytest.mark.parametrize("key, value", [
    ("target", "B7"), ("opset", 30), ("name", "a/b"), ("input_names", ["a", "a"]), ("output_dir", "/proc/version/x"),
    ("input_dtype", "int4"), ("metrics", {"bad name!": 1.0}),
])
def test_a_bad_target_opset_name_or_path_is_refused_without_importing_torch(params, key, value):
    code = ("import json, sys; from flows.parameters import ExportPlan; from tasks.specs import ParameterError\n"
            "try:\n    ExportPlan.check(json.loads(sys.argv[1]))\nexcept ParameterError as e:\n"
            "    print(e.parameter, 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code, json.dumps({**params, key: value})], capture_output=True,
                       text=True, cwd=services.REPO, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [key, "False"]


def test_a_wrong_input_shape_is_blamed_on_input_shape(params):
    e = _error({**params, "input_shape": [1, 1, 16, 16]})
    assert e.parameter == "input_shape"
    assert "[1, 1, 16, 16]" in str(e) and "channels" in str(e)


def test_one_input_and_one_output_are_named_input_and_output(params):
    g = ExportPlan.check({**params, "model_kwargs": {"name": "mlp"}, "input_shape": [1, 20]}).graph
    assert g.input_names == ["input"] and g.output_names == ["output"]


def test_several_outputs_are_numbered_from_0(params):
    g = ExportPlan.check({**params, "model_kwargs": {"name": "two"}, "input_shape": [1, 3, 8, 8]}).graph
    assert g.output_names == ["output_0", "output_1"]
    assert default_names("input", 3) == ["input_0", "input_1", "input_2"]


def test_given_names_are_kept(params):
    g = ExportPlan.check({**params, "input_names": ["pixels"], "output_names": ["logits"]}).graph
    assert g.input_names == ["pixels"] and g.output_names == ["logits"]


def test_more_output_names_than_outputs_is_an_error_naming_output_names(params):
    e = _error({**params, "output_names": ["a", "b"]})
    assert e.parameter == "output_names" and "has 2 names but the model has 1 outputs" in str(e)


def test_dynamic_axes_may_name_the_default_names(params):
    g = ExportPlan.check({**params, "dynamic_axes": {"input": [0], "output": {"0": "batch"}}}).graph
    assert g.dynamic_axes == {"input": {0: "input_dynamic_axes_1"}, "output": {0: "batch"}}
    e = _error({**params, "dynamic_axes": {"x": [0]}})
    assert e.parameter == "dynamic_axes" and "['input', 'output']" in str(e)


def test_dynamic_axes_beyond_an_inputs_rank_are_refused(params):
    e = _error({**params, "dynamic_axes": {"input": [4]}})
    assert e.parameter == "dynamic_axes" and "out of range for an input of rank 4" in str(e)


def test_a_small_model_is_checked_on_the_cpu_and_a_large_one_on_the_meta_device(tmp_path):
    from flows.parameters import _devices

    src = tmp_path / "big.py"
    src.write_text("import torch\n\ndef build():\n    return torch.nn.Linear(8192, 8192)  # 256 MiB of weights\n")
    assert _devices("tests.models:build", {"name": "cnn"}) == ("cpu",)
    assert _devices(f"{src}:build", {}) == ("meta", "cpu")


def test_a_model_whose_callable_cannot_build_on_the_meta_device_is_checked_on_the_cpu(params, tmp_path):
    from flows.parameters import _devices

    src = tmp_path / "filled.py"
    src.write_text(textwrap.dedent("""
        import torch

        def build():  # built empty, then filled from tensors it makes (as bench.models does)
            with torch.device("meta"):
                m = torch.nn.Linear(4, 2)
            m = m.to_empty(device="cpu")
            with torch.no_grad():
                m.weight.copy_(torch.randn(2, 4))
                m.bias.zero_()
            return m
    """))
    assert _devices(f"{src}:build", {}) == ("cpu",)
    assert ExportPlan.check({**params, "model": f"{src}:build", "model_kwargs": {}, "input_shape": [1, 4]})
    e = _error({**params, "model": f"{src}:build", "model_kwargs": {"width": 3}, "input_shape": [1, 4]})
    assert e.parameter == "model_kwargs" and "width" in str(e)


def test_a_model_that_cannot_run_on_meta_tensors_is_checked_on_the_cpu(params, tmp_path, monkeypatch):
    monkeypatch.setattr("flows.parameters.SMALL_MODEL_BYTES", 0)  # every model counts as large: meta first
    src = tmp_path / "datadep.py"
    src.write_text(textwrap.dedent("""
        import torch

        class DataDependent(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = torch.nn.Linear(4, 2)

            def forward(self, x):
                scale = float(x.abs().max().item()) + 1.0  # needs real values
                return self.fc(x / scale), x.sum(1)

        def build():
            return DataDependent()
    """))
    plan = ExportPlan.check({**params, "model": f"{src}:build", "model_kwargs": {}, "input_shape": [1, 4]})
    assert plan.graph.output_names == ["output_0", "output_1"]
    e = _error({**params, "model": f"{src}:build", "model_kwargs": {}, "input_shape": [1, 5]})
    assert e.parameter == "input_shape"


@pytest.mark.parametrize("key, value, words", [
    ("checkpoint", "/no/such/file.pt", "does not exist"),
    ("name", "a/b", "without '/'"),
    ("target", "B7", "'B7' is unknown"),
    ("opset", 30, "outside target A2's range"),
    ("parity_tolerances", {"nope": 1.0}, "unknown tolerance(s) ['nope']"),
    ("parity_tolerances", {"output_cosine_min": "high"}, "tolerance 'output_cosine_min' must be a number"),
    ("input_names", ["a", "a"], "has duplicates"),
    ("output_dir", "/proc/version/out", "is not a directory"),
    ("distill_config", "not-json", "is not valid JSON"),
    ("mlflow_retries", -1, ">= 0"),
    ("mlflow_artifact_location", "", "directory or an artifact URI"),
    ("model", "tests.models:nope", "no attribute 'nope'"),
    ("model_kwargs", {"name": "nope"}, "failed: KeyError"),
    ("metrics", {"accuracy (%)": 98.9}, "letters, digits"),
    ("metrics", {"accuracy": float("nan")}, "finite number"),
])
def test_each_bad_parameter_is_named(params, key, value, words, tmp_path):
    if value == "not-json":
        (tmp_path / "cfg.json").write_text("{not json")
        value = str(tmp_path / "cfg.json")
    e = _error({**params, key: value})
    assert e.parameter == key and words in str(e), str(e)


@pytest.mark.parametrize("content, words", [(b"record {\n  key: \"fc\x80\"\n}\n", "byte 19 (line 2, column 11)"),
                                            (b"# nothing\n", "holds no layer record")], ids=["non-utf8", "no-layer"])
def test_a_record_file_that_does_not_read_as_records_is_named_before_the_flow_starts(params, tmp_path, content, words):
    rec = tmp_path / "given_record.txt"
    rec.write_bytes(content)
    e = _error({**params, "record_file": str(rec)})
    assert e.parameter == "record_file" and words in str(e) and "given_record.txt" in str(e), str(e)


def test_a_distill_config_with_a_bad_value_is_named_with_its_key(params, tmp_path):
    cfg = tmp_path / "distill.json"
    cfg.write_text('{"batch_num": 0, "conv1": {"quant_enable": true}}')
    e = _error({**params, "distill_config": str(cfg)})
    assert e.parameter == "distill_config" and "key 'batch_num' must be a positive integer" in str(e), str(e)


def test_a_parameter_error_survives_pickling_with_its_parameter_and_message():
    import pickle

    e = pickle.loads(pickle.dumps(ParameterError("checkpoint", "'x.safetensors' is cut short")))
    assert type(e) is ParameterError and e.parameter == "checkpoint"
    assert str(e) == "parameter 'checkpoint': 'x.safetensors' is cut short"



@pytest.mark.parametrize("key, value, words", [
    ("name", "a\x00b", "'a\\x00b' holds a NUL byte"),
    ("name", "n" * 230, "the output file name 'nnn"),  # fine alone, too long with '_fake_quant_model.onnx'
    ("name", "n" * 216, "_scale_offset_record.txt' has 240 bytes"),  # the longest suffix decides
    ("output_dir", "out\x00dir", "holds a NUL byte"),
    ("output_dir", "o" * 256, "the path component 'ooo"),
    ("record_file", "rec\x00.txt", "holds a NUL byte"),
    ("checkpoint", "ck\x00.pt", "holds a NUL byte"),
], ids=["nul-name", "long-name", "long-name-record-suffix", "nul-output_dir", "long-output_dir", "nul-record_file",
        "nul-checkpoint"])
def test_an_odd_path_string_is_refused_naming_the_parameter(params, key, value, words):
    e = _error({**params, key: value})
    assert e.parameter == key and words in str(e), str(e)



@pytest.mark.parametrize("key", ["record_file", "checkpoint", "distill_config"])
def test_a_directory_given_for_a_file_parameter_is_named_as_a_directory(params, tmp_path, key):
    e = _error({**params, key: str(tmp_path)})
    assert e.parameter == key and f"{str(tmp_path)!r} is a directory" in str(e), str(e)
