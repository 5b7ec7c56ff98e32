"""amct-export: --help, exit codes, run (its options are the flow's parameters), verify, validate-record,
inspect."""
from __future__ import annotations

import json
import shlex
import subprocess
import sys

import pytest

from flows import cli
from tests import services


def _help(*args) -> str:
    r = subprocess.run([sys.executable, "-m", "flows.cli", *args, "--help"], capture_output=True, text=True,
                       cwd=services.REPO, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_help_lists_the_commands_and_exit_codes():
    out = _help()
    for word in ("run", "verify", "validate-record", "inspect", "fetch", "exit codes", "mlflow ui"):
        assert word in out, word


def test_run_has_one_option_per_flow_parameter_with_the_docstrings_help():
    from flows.parameters import flow_parameters

    out = " ".join(_help("run").split())  # argparse wraps lines
    for p in flow_parameters():
        assert f"--{p.name.replace('_', '-')}" in out, p.name
        assert " ".join(p.help.rstrip(".").split()[:6]) in out, p.name
    assert "--force, --no-force" in out and "(default: A2)" in out and "(required)" in out
    assert "comma-separated" in out and "KEY=VALUE" in out  # how lists and objects are written


@pytest.mark.parametrize("args, expected", [
    (["--input-shape", "1,3,224,224"], {"input_shape": [1, 3, 224, 224]}),
    (["--input-shape", "1,16;1,16"], {"input_shape": [[1, 16], [1, 16]]}),
    (["--input-shape", "[[1, 16], [1, 16]]"], {"input_shape": [[1, 16], [1, 16]]}),
    (["--input-dtype", "int64,float32"], {"input_dtype": ["int64", "float32"]}),
    (["--input-names", "a,b"], {"input_names": ["a", "b"]}),
    (["--dynamic-axes", '{"input": [0]}', "--dynamic-axes", 'output={"0": "batch"}'],
     {"dynamic_axes": {"input": [0], "output": {"0": "batch"}}}),
    (["--opset", "13", "--mlflow-retry-delay-seconds", "0.5", "--force"],
     {"opset": 13, "mlflow_retry_delay_seconds": 0.5, "force": True}),
])
def test_run_options_give_the_flow_parameters_in_their_types(args, expected):
    a = cli.build_parser().parse_args(["run", "--checkpoint", "c.pt", "--model", "m:f", "--input-shape", "1,4", *args])
    params = cli.collect_params(a)
    assert {k: params[k] for k in expected} == expected


def test_production_cli_imports_no_example():
    code = "import sys, flows.cli; flows.cli.build_parser(); print(any(m.startswith('examples') for m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=services.REPO, timeout=60)
    assert r.stdout.strip() == "False", r.stderr


def test_verify_is_amct_core_verify_under_amct_export(mlp_export, capsys):
    out = _help("verify")
    assert out.startswith("usage: amct-export verify") and "--dim NAME=N" in out and "--report-dir" in out
    assert cli.main(["verify", str(mlp_export / "mlp")]) == 0
    assert capsys.readouterr().out.startswith("PASS")
    assert cli.main(["verify", str(mlp_export / "nothing")]) == cli.EXIT_USAGE


def test_no_command_and_bad_arguments_exit_2(capsys):
    assert cli.main([]) == cli.EXIT_USAGE
    with pytest.raises(SystemExit) as e:
        cli.main(["run", "--input-shape", "1,x,3"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        cli.main(["run", "--model", "a:b", "--input-shape", "1,3"])  # no --checkpoint
    assert e.value.code == cli.EXIT_USAGE
    assert "--checkpoint is required" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["inspect", "m.onnx", "--nope"])
    assert e.value.code == cli.EXIT_USAGE


_RUN_AND_REPORT_IMPORTS = ("import sys; from flows import cli; rc = cli.main(sys.argv[1:]); "
                           "print(sorted(m for m in ('prefect', 'mlflow') if m in sys.modules)); sys.exit(rc)")


@pytest.mark.parametrize("flag, value, parameter", [
    ("--target", "B7", "target"),
    ("--opset", "30", "opset"),
    ("--input-shape", "1,3,8,8", "input_shape"),
    ("--checkpoint", "/no/such/checkpoint.pt", "checkpoint"),
    ("--dynamic-axes", '{"x": [0]}', "dynamic_axes"),
    ("--parity-tolerances", '{"nope": 1}', "parity_tolerances"),
])
def test_a_bad_run_parameter_exits_2_with_one_line_naming_it_before_any_flow_starts(tmp_path, flag, value, parameter):
    ck = tmp_path / "student.safetensors"
    ck.write_bytes(b"")
    args = ["run", "--checkpoint", str(ck), "--model", "examples.digits:build_model", "--input-shape", "1,1,8,8",
            "--output-dir", str(tmp_path / "out"), flag, value]
    r = subprocess.run([sys.executable, "-c", _RUN_AND_REPORT_IMPORTS, *args], capture_output=True, text=True,
                       cwd=services.REPO, timeout=120)
    assert r.returncode == cli.EXIT_USAGE, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"amct-export: error: parameter '{parameter}': "), r.stderr
    assert r.stdout.strip() == "[]"  # neither Prefect (no flow, no temporary server) nor MLflow was loaded
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("key, value", [("name", "a\x00b"), ("name", "n" * 230), ("output_dir", "out\x00")],
                         ids=["nul-name", "long-name", "nul-output_dir"])
def test_an_odd_path_string_in_the_params_file_exits_2_with_one_line_naming_it(tmp_path, key, value):
    ck = tmp_path / "student.safetensors"
    ck.write_bytes(b"")
    pf = tmp_path / "params.json"
    pf.write_text(json.dumps({"checkpoint": str(ck), "model": "examples.digits:build_model", "input_shape": [1, 1, 8, 8],
                              "output_dir": str(tmp_path / "out"), key: value}))
    r = subprocess.run([sys.executable, "-c", _RUN_AND_REPORT_IMPORTS, "run", "--params-file", str(pf)],
                       capture_output=True, text=True, cwd=services.REPO, timeout=120)
    assert r.returncode == cli.EXIT_USAGE, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"amct-export: error: parameter '{key}': "), r.stderr
    assert not (tmp_path / "out").exists()


def test_object_options_add_to_the_params_files_objects(tmp_path):
    pf = tmp_path / "params.json"
    pf.write_text(json.dumps({"metrics": {"accuracy.fp32": 98.0, "accuracy.int8": 90.0}, "name": "file"}))
    a = cli.build_parser().parse_args(["run", "--checkpoint", "c.pt", "--model", "m:f", "--input-shape", "1,4",
                                       "--params-file", str(pf), "--metrics", "accuracy.int8=98.9",
                                       "--metrics", "latency_ms=3", "--name", "flag"])
    params = cli.collect_params(a)
    assert params["metrics"] == {"accuracy.fp32": 98.0, "accuracy.int8": 98.9, "latency_ms": 3}
    assert params["name"] == "flag"
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(["run", "--metrics", "accuracy"])
    assert e.value.code == cli.EXIT_USAGE


def test_an_unknown_parameter_in_the_params_file_exits_2_naming_it(tmp_path, capsys):
    pf = tmp_path / "params.json"
    pf.write_text(json.dumps({"checkpoint": str(pf), "model": "m:f", "input_shape": [1, 4], "input_shapes": [1]}))
    assert cli.main(["run", "--params-file", str(pf)]) == cli.EXIT_USAGE
    assert capsys.readouterr().err.startswith("amct-export: error: parameter 'input_shapes': is not a parameter")


def test_validate_record_ok_and_invalid(mlp_export, tmp_path, capsys):
    rec = mlp_export / "mlp_record.txt"
    assert cli.main(["validate-record", str(rec)]) == cli.EXIT_OK
    assert "OK" in capsys.readouterr().out
    bad = tmp_path / "bad_record.txt"
    bad.write_text(rec.read_text().replace("scale_d: ", "scale_d: -", 1))  # first layer (fc1): negative scale
    assert cli.main(["validate-record", str(bad)]) == cli.EXIT_INVALID
    err = capsys.readouterr().err
    assert "INVALID" in err and "scale_d" in err and "fc1" in err
    assert cli.main(["validate-record", str(mlp_export / "missing.txt")]) == cli.EXIT_INVALID


def _paren_depth(text: str) -> int:
    depth = deepest = 0
    for c in text:
        depth += {"(": 1, ")": -1}.get(c, 0)
        deepest = max(deepest, depth)
    return deepest


def test_validate_record_ok_line_has_no_nested_parentheses(mlp_export, capsys):
    assert cli.main(["validate-record", str(mlp_export / "mlp_record.txt")]) == cli.EXIT_OK
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("OK: ") and "3 layer record(s) valid for target A2: syntax and values only" in first
    assert _paren_depth(first) <= 1, first


def test_validate_record_against_the_model_names_missing_layers(mlp_export, tmp_path, capsys):
    import torch

    from amct_core.record import read_record, write_record
    from tests import models

    qat = models.make_qat("mlp", tmp_path)
    ck = tmp_path / "mlp.pt"
    torch.save(qat.state_dict(), ck)
    args = ["--model", "tests.models:build", "--model-kwargs", '{"name": "mlp"}', "--checkpoint", str(ck),
            "--distill-config", str(tmp_path / "mlp_distill_config.json"), "--input-shape", "1,20"]
    good = tmp_path / "good.txt"
    write_record(good, read_record(mlp_export / "mlp_record.txt"))
    # the record of another calibration still names the same layers, so it validates
    assert cli.main(["validate-record", str(good), *args]) == cli.EXIT_OK
    recs = read_record(mlp_export / "mlp_record.txt")
    recs.pop("fc2")
    partial = tmp_path / "partial.txt"
    write_record(partial, recs)
    assert cli.main(["validate-record", str(partial), *args]) == cli.EXIT_INVALID
    assert "fc2" in capsys.readouterr().err


def test_validate_record_of_a_non_utf8_file_exits_invalid_naming_the_file_and_the_byte(mlp_export, tmp_path, capsys):
    data = (mlp_export / "mlp_record.txt").read_bytes()
    bad = tmp_path / "bad.txt"
    bad.write_bytes(data[:5] + b"\x80" + data[5:])
    assert cli.main(["validate-record", str(bad)]) == cli.EXIT_INVALID
    err = capsys.readouterr().err
    assert err.startswith(f"INVALID: record file {str(bad)!r}: byte 5 (line 1, column 6)") and "not UTF-8" in err


def test_validate_record_of_a_directory_prints_one_line_naming_it_and_exits_invalid(tmp_path, capsys):
    assert cli.main(["validate-record", str(tmp_path)]) == cli.EXIT_INVALID
    err = capsys.readouterr().err
    assert err == f"INVALID: record file {str(tmp_path)!r} is a directory; give the path of the record file\n"


@pytest.mark.parametrize("text", ["", " \n\n", "# a comment\n"], ids=["empty", "whitespace", "comment"])
def test_validate_record_alone_refuses_a_file_with_no_layer_record(tmp_path, capsys, text):
    rec = tmp_path / "r.txt"
    rec.write_text(text)
    assert cli.main(["validate-record", str(rec)]) == cli.EXIT_INVALID
    assert "holds no layer record" in capsys.readouterr().err


def test_inspect_deploy_and_fake_quant(mlp_export, capsys):
    assert cli.main(["inspect", str(mlp_export / "mlp_deploy_model.onnx"), "--json"]) == cli.EXIT_OK
    facts = json.loads(capsys.readouterr().out)
    assert facts["kind"] == "deploy"
    assert facts["opset_import"] == [{"domain": "", "version": 11}]
    assert {q["node"] for q in facts["ascend_nodes"] if q["op"] == "AscendDequant"} == {"fc1.dequant", "fc2.dequant", "fc3.dequant"}
    assert facts["inputs"][0]["name"] == "x" and facts["outputs"][0]["name"] == "y"
    assert "INT8" in facts["initializer_types"] and "UINT64" in facts["initializer_types"]
    assert len(facts["files"][0]["sha256"]) == 64
    assert cli.main(["inspect", str(mlp_export / "mlp_fake_quant_model.onnx")]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert "fake_quant model" in out and "fc1, fc2, fc3" in out


def test_inspect_missing_and_garbage(mlp_export, tmp_path):
    assert cli.main(["inspect", str(tmp_path / "none.onnx")]) == cli.EXIT_USAGE
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00not a model" * 10)
    assert cli.main(["inspect", str(junk)]) == cli.EXIT_INVALID


def _cli(args, api_url, cwd):
    env = services.base_env(PREFECT_API_URL=api_url, PYTHONPATH=str(services.REPO))
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=300, stdin=subprocess.DEVNULL)


@pytest.mark.integration
def test_run_exports_and_bad_target_exits_2(prefect_api, cnn_checkpoint, tmp_path):
    params = tmp_path / "params.json"
    params.write_text(json.dumps({"model_kwargs": {"name": "cnn"}, "name": "cli"}))
    base = ["run", "--params-file", str(params), "--checkpoint", cnn_checkpoint.checkpoint, "--model",
            "tests.models:build", "--distill-config", cnn_checkpoint.distill_config, "--input-shape", "1,3,16,16",
            "--output-dir", str(tmp_path / "out"), "--mlflow-tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    r = _cli(base + ["--target", "B7"], prefect_api, tmp_path)
    assert r.returncode == cli.EXIT_USAGE, r.stdout[-2000:] + r.stderr[-2000:]
    assert "parameter 'target'" in r.stderr
    assert not (tmp_path / "out" / "cli_deploy_model.onnx").exists()
    r = _cli(base + ["--target", "950", "--opset", "17", "--json"], prefect_api, tmp_path)
    assert r.returncode == cli.EXIT_OK, r.stdout[-2000:] + r.stderr[-2000:]
    summary = json.loads(r.stdout[r.stdout.index("{\n"):])
    assert summary["parity_passed"] and summary["deploy_model"].endswith("cli_deploy_model.onnx")
    out = tmp_path / "out"
    assert (out / "cli_deploy_model.onnx").is_file() and (out / "cli_fake_quant_model.onnx").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"] == "950" and manifest["opset"] == 17
    assert "--soc_version=Ascend950" in manifest["atc_command"]


@pytest.mark.integration
def test_run_on_a_truncated_safetensors_checkpoint_exits_2_naming_the_checkpoint(prefect_api, cnn_checkpoint, tmp_path):
    from safetensors.torch import save_file

    from amct_core.checkpoint import read_state_dict

    ck = tmp_path / "student.safetensors"
    save_file(read_state_dict(cnn_checkpoint.checkpoint), str(ck))
    ck.write_bytes(ck.read_bytes()[:-100])
    args = ["run", "--checkpoint", str(ck), "--model", "tests.models:build", "--model-kwargs", '{"name": "cnn"}',
            "--distill-config", cnn_checkpoint.distill_config, "--input-shape", "1,3,16,16", "--output-dir",
            str(tmp_path / "out"), "--mlflow-tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    r = _cli(args, prefect_api, tmp_path)
    assert r.returncode == cli.EXIT_USAGE, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"parameter 'checkpoint': checkpoint {str(ck)!r} is not a readable safetensors file" in r.stderr


@pytest.fixture(scope="module")
def embedded(cnn_checkpoint, tmp_path_factory):
    """`amct-export run` with no PREFECT_API_URL and no MLFLOW_TRACKING_URI, in an empty working directory."""
    cwd = tmp_path_factory.mktemp("embedded")
    env = services.base_env(cwd.parent / f"{cwd.name}-prefect-home", PYTHONPATH=str(services.REPO))
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    args = ["run", "--checkpoint", cnn_checkpoint.checkpoint, "--model", "tests.models:build", "--model-kwargs",
            '{"name": "cnn"}', "--distill-config", cnn_checkpoint.distill_config, "--input-shape", "1,3,16,16",
            "--name", "emb"]
    r = subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, cwd=cwd, env=env,
                       timeout=300, stdin=subprocess.DEVNULL)
    assert r.returncode == cli.EXIT_OK, r.stdout[-2000:] + r.stderr[-3000:]
    return r, cwd


def _embedded_run(cwd):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{cwd / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["amct-export"], output_format="list")
    assert len(runs) == 1
    return runs[0]


@pytest.mark.integration
def test_embedded_defaults_ephemeral_prefect_and_sqlite_mlflow_in_the_working_directory(embedded):
    """No PREFECT_API_URL, no MLFLOW_TRACKING_URI: Prefect's ephemeral API, ./mlflow.db and ./mlruns."""
    r, cwd = embedded
    assert "temporary server" in (r.stdout + r.stderr).lower()  # Prefect's ephemeral API
    assert (cwd / "out" / "emb_deploy_model.onnx").is_file()  # default output_dir ./out
    assert (cwd / "mlflow.db").is_file() and (cwd / "mlruns").is_dir()
    assert _embedded_run(cwd).data.params["target"] == "A2"


@pytest.mark.integration
def test_a_run_on_the_ephemeral_api_has_no_prefect_ui_link(embedded):
    tags = _embedded_run(embedded[1]).data.tags
    assert tags["prefect.flow_run_id"] and "prefect.flow_run_url" not in tags


@pytest.mark.integration
def test_without_names_the_graph_has_input_and_output_and_the_atc_command_uses_them(embedded):
    import onnx

    out = embedded[1] / "out"
    for f in ("emb_deploy_model.onnx", "emb_fake_quant_model.onnx"):
        g = onnx.load(str(out / f), load_external_data=False).graph
        inits = {t.name for t in g.initializer}
        assert [i.name for i in g.input if i.name not in inits] == ["input"], f
        assert [o.name for o in g.output] == ["output"], f
    atc = json.loads((out / "manifest.json").read_text())["atc_command"]
    assert '--input_shape="input:1,3,16,16"' in atc


@pytest.mark.integration
def test_the_printed_mlflow_ui_command_runs_as_typed_and_shows_the_run(embedded, tmp_path):
    r, cwd = embedded
    line = next(l for l in r.stdout.splitlines() if l.startswith("open the MLflow UI: "))
    argv = shlex.split(line[len("open the MLflow UI: "):].split(", then ")[0])
    assert argv[1:3] == ["ui", "--backend-store-uri"]
    argv[argv.index("--port") + 1] = str(services.free_port())  # the one change: a port free on this machine
    ui = services.start_mlflow_ui(argv, cwd, tmp_path / "mlflow-ui.log")
    try:
        exp = services.api_json(f"{ui.url}/api/2.0/mlflow/experiments/get-by-name?experiment_name=amct-export")
        runs = services.api_json(f"{ui.url}/api/2.0/mlflow/runs/search",
                                 {"experiment_ids": [exp["experiment"]["experiment_id"]]})
        assert [x["info"]["run_id"] for x in runs["runs"]] == [_embedded_run(cwd).info.run_id]
    finally:
        ui.stop()
