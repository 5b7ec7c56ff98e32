"""The batch file of distill-export-batch: expansion of targets, per-export directories, and whole-file checks
whose errors name the item and the key. No cluster starts here."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.batch_spec import BatchSpecError, load_batch


@pytest.fixture(scope="module")
def mlp_checkpoint(tmp_path_factory) -> dict:
    """tests.models' MLP, QAT-wrapped and calibrated, saved as a state_dict: an item's parameters."""
    import torch

    from tests import models

    d = tmp_path_factory.mktemp("mlp-ck")
    torch.save(models.make_qat("mlp", d).state_dict(), d / "mlp.pt")
    return {"checkpoint": str(d / "mlp.pt"), "model": "tests.models:build", "model_kwargs": {"name": "mlp"},
            "distill_config": str(d / "mlp_distill_config.json"), "input_shape": [1, 20]}


def _spec(tmp_path, ck, *items, **defaults) -> dict:
    return {"defaults": {"output_dir": str(tmp_path / "out"), **defaults},
            "exports": [{**ck, **item} for item in items]}


def test_targets_make_one_export_per_target_each_in_name_target_directory(tmp_path, mlp_checkpoint):
    items = load_batch(_spec(tmp_path, mlp_checkpoint, {"name": "mlp", "targets": ["A2", "A3", "950"]},
                             {"name": "other"}))
    assert [(i.index, i.key) for i in items] == [(0, "mlp-A2"), (0, "mlp-A3"), (0, "mlp-950"), (1, "other-A2")]
    assert [Path(i.output_dir) for i in items] == [tmp_path / "out" / k for k in
                                                   ("mlp-A2", "mlp-A3", "mlp-950", "other-A2")]
    assert [i.plan.graph.target for i in items] == ["A2", "A3", "950"] + ["A2"]


def test_output_dir_argument_replaces_the_defaults_but_not_an_items_own(tmp_path, mlp_checkpoint):
    spec = _spec(tmp_path, mlp_checkpoint, {"name": "a"}, {"name": "b", "output_dir": str(tmp_path / "own")})
    a, b = load_batch(spec, output_dir=str(tmp_path / "given"))
    assert Path(a.output_dir) == tmp_path / "given" / "a-A2"
    assert Path(b.output_dir) == tmp_path / "own" / "b-A2"


def test_yaml_and_json_files_give_the_same_exports(tmp_path, mlp_checkpoint):
    import yaml

    spec = _spec(tmp_path, mlp_checkpoint, {"name": "mlp", "targets": ["A2", "950"]}, opset=13)
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(spec))
    (tmp_path / "b.json").write_text(json.dumps(spec))
    from_yaml, from_json = load_batch(tmp_path / "b.yaml"), load_batch(tmp_path / "b.json")
    assert [i.plan for i in from_yaml] == [i.plan for i in from_json]
    assert {i.plan.graph.opset for i in from_yaml} == {13}


def test_a_bad_value_in_an_item_names_the_item_index_and_key(tmp_path, mlp_checkpoint):
    spec = _spec(tmp_path, mlp_checkpoint, {"name": "ok"}, {"name": "bad", "checkpoint": str(tmp_path / "nope.pt")})
    with pytest.raises(BatchSpecError, match=r"exports\[1\]\.checkpoint: .*nope\.pt' does not exist") as e:
        load_batch(spec)
    assert e.value.where == "exports[1].checkpoint"


def test_a_bad_value_in_defaults_names_the_defaults_key_and_the_item(tmp_path, mlp_checkpoint):
    spec = _spec(tmp_path, mlp_checkpoint, {"name": "ok"}, opset=99)
    with pytest.raises(BatchSpecError, match=r"defaults\.opset \(in exports\[0\]\): opset_version 99 is outside"):
        load_batch(spec)


def test_a_target_outside_the_list_names_targets(tmp_path, mlp_checkpoint):
    with pytest.raises(BatchSpecError, match=r"exports\[0\]\.targets: .*B9"):
        load_batch(_spec(tmp_path, mlp_checkpoint, {"name": "m", "targets": ["A2", "B9"]}))


@pytest.mark.parametrize("item, where, words", [
    ({"name": "m", "target": "A2", "targets": ["A3"]}, "exports[0].targets", "both given"),
    ({"name": "m", "chekpoint": "x.pt"}, "exports[0].chekpoint", "not a parameter"),
    ({"name": "m", "targets": ["A2", "A2"]}, "exports[0].targets", "twice"),
    ({"name": "m", "mlflow_experiment": "other"}, "exports[0].mlflow_experiment", "one MLflow experiment"),
])
def test_malformed_items_are_refused_naming_the_key(tmp_path, mlp_checkpoint, item, where, words):
    with pytest.raises(BatchSpecError, match=words) as e:
        load_batch(_spec(tmp_path, mlp_checkpoint, item))
    assert e.value.where == where


def test_a_missing_required_key_is_named_for_its_item(tmp_path, mlp_checkpoint):
    ck = {k: v for k, v in mlp_checkpoint.items() if k != "input_shape"}
    with pytest.raises(BatchSpecError, match=r"exports\[0\]\.input_shape: is required"):
        load_batch({"exports": [{**ck, "name": "m"}]})


def test_two_exports_of_one_name_and_target_are_refused(tmp_path, mlp_checkpoint):
    spec = _spec(tmp_path, mlp_checkpoint, {"name": "m", "targets": ["A2", "A3"]}, {"name": "m", "target": "A3"})
    with pytest.raises(BatchSpecError, match=r"exports\[1\]\.name: 'm' for target A3 is also exports\[0\]'s"):
        load_batch(spec)


@pytest.mark.parametrize("data, where", [
    ({"exports": []}, "exports"),
    ({"defaults": {"bogus": 1}, "exports": [{}]}, "defaults.bogus"),
    ({"exprots": []}, "exprots"),
    ([1, 2], "file"),
])
def test_a_malformed_file_is_refused_naming_what_is_wrong(data, where):
    with pytest.raises(BatchSpecError) as e:
        load_batch(data)
    assert e.value.where == where


def test_a_file_that_is_not_yaml_names_the_file(tmp_path):
    f = tmp_path / "b.yaml"
    f.write_text("exports: [\n")
    with pytest.raises(BatchSpecError, match=r"b\.yaml: file: is not valid YAML"):
        load_batch(f)


def test_cli_refuses_a_bad_batch_file_with_exit_2_before_any_cluster_starts(tmp_path, mlp_checkpoint, capsys):
    from flows.cli import main

    spec = tmp_path / "b.json"
    spec.write_text(json.dumps(_spec(tmp_path, mlp_checkpoint, {"name": "m", "opset": 7})))
    assert main(["batch", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "exports[0].opset" in err and str(spec) in err
    assert not (tmp_path / "out").exists()



def test_shipped_example_batch_file_checks_once_its_checkpoints_exist(tmp_path, monkeypatch):
    """examples/batch.yaml, with checkpoints where scripts/run-example and examples.digits_mlp put them
    (here: untrained models of the same shapes, wrapped and saved the same way)."""
    import yaml

    from amct_core import create_distill_config, create_distill_model
    from examples import digits, digits_mlp

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)
    x = digits.load_digits_split(0).x_train[:16]
    for build, ck, cfg in ((digits.build_model, "digits_out/student.safetensors", "digits_out/distill_config.json"),
                           (digits_mlp.build_model, digits_mlp.STUDENT, digits_mlp.CONFIG)):
        Path(ck).parent.mkdir(parents=True, exist_ok=True)
        teacher = build().eval()
        create_distill_config(cfg, teacher, x)
        digits.save_state_dict(create_distill_model(cfg, teacher, x), ck)
    items = load_batch(repo / "examples" / "batch.yaml")
    assert sorted(i.key for i in items) == sorted(f"{n}-{t}" for n in ("digits", "digits-mlp")
                                                  for t in ("A2", "A3", "950"))
    nightly = yaml.safe_load((repo / "prefect.yaml").read_text())
    batch = [d for d in nightly["deployments"] if d["entrypoint"].endswith(":distill_export_batch")]
    assert batch and batch[0]["parameters"]["spec"] == "examples/batch.yaml" and batch[0]["schedules"]


def test_batch_help_explains_the_file_the_options_and_the_exit_codes():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "flows.cli", "batch", "--help"], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[1], timeout=60)
    assert r.returncode == 0, r.stderr
    out = " ".join(r.stdout.split())
    for words in ("defaults:", "exports:", "targets:", "<output_dir>/<name>-<target>/", "--dask-address ADDR",
                  "--workers N", "--output-dir DIR", "--json", "exit codes: 0", "examples/batch.yaml"):
        assert words in out, words
