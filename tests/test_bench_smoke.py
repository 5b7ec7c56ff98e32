"""Smoke runs of the bench/ scripts on tiny models, so they cannot rot. No timing assertions: only that
each script runs end to end, measures what it says (numbers present and positive) and writes its files."""
from __future__ import annotations

import json
import math

import pytest


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_export_bench_runs_all_three_exporters(tmp_path, capsys):
    from bench import export

    out = tmp_path / "export.json"
    assert export.main(["--model", "tiny", "--smoke", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    for kind in export.KINDS:
        assert export.LABELS[kind] in text
    res = json.loads(out.read_text())
    for kind in export.KINDS:
        m = res["median"][kind]
        assert "error" not in m, m
        assert _positive(m["seconds"]) and _positive(m["peak_rss_mb"]) and m["files_mb"] > 0
    stages = res["median"]["ours"]["stages"]
    assert set(stages) >= {"trace", "fake_quant_build", "deploy_build", "write"}
    ours_files = res["runs"]["ours"][0]["files"]
    assert any(n.endswith("_deploy_model.onnx") for n in ours_files)
    assert any(n.endswith("_fake_quant_model.onnx") for n in ours_files)
    assert "qdq.onnx" in res["runs"]["ort"][0]["files"]
    check = res["runs"]["ours"][0]["check"]
    assert check["checks"] == "verify" and check["passed"], check


def test_export_bench_measures_another_checkout_side_by_side(tmp_path, capsys):
    from bench import export

    out = tmp_path / "export.json"
    assert export.main(["--model", "tiny", "--kinds", "ours", "--baseline", str(export.ROOT), "--repeats", "1",
                        "--json", str(out)]) == 0
    assert export.LABELS["baseline"] in capsys.readouterr().out
    res = json.loads(out.read_text())
    assert _positive(res["median"]["baseline"]["seconds"]) and res["baseline"]["root"] == str(export.ROOT)
    ratios = res["ratio_vs_baseline"]
    assert ratios["pairs"] == 1 and _positive(ratios["seconds"]) and _positive(ratios["job_peak_mb"])


def test_export_bench_rejects_unknown_kind():
    import pytest

    from bench import export

    with pytest.raises(SystemExit):
        export.main(["--model", "tiny", "--smoke", "--kinds", "ours,nope"])


def test_sweep_bench_reports_per_parameter_cost(capsys):
    from bench import sweep

    assert sweep.main(["--smoke", "--kinds", "ours"]) == 0
    text = capsys.readouterr().out
    assert "per-parameter time varies" in text
    assert "s/Mparam" in text


def test_profile_bench_finds_the_stages(capsys):
    from bench import profile_export

    assert profile_export.main(["--model", "tiny", "--smoke", "--passes", "cprofile,rss"]) == 0
    text = capsys.readouterr().out
    assert "own time by area" in text and "amct_core" in text
    for stage in ("trace", "fake_quant_build", "deploy_build", "write"):
        assert stage in text


@pytest.mark.integration
def test_flow_overhead_plain_call_path(capsys):
    """The flow's whole recipe, every stage and the MLflow logging, with the Prefect tasks as plain calls."""
    from bench import flow_overhead

    assert flow_overhead.main(["--smoke"]) == 0
    assert "_deploy_model.onnx" in capsys.readouterr().out


def test_models_sizes():
    from bench import models

    m, x = models.by_name("tx64")
    assert models.param_count(m) > 0 and tuple(x.shape) == (1, models.SWEEP_SEQ)
    a, _ = models.transformer_w(64, layers=1)
    b, _ = models.transformer_w(64, layers=1)
    # the seeded fill is deterministic (the calibration of every exporter sees the same weights)
    assert all((p == q).all() for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_zoo_bench_times_both_exporters_and_verifies_every_file(tmp_path, capsys):
    from bench import zoo

    out = tmp_path / "zoo.json"
    assert zoo.main(["--models", "conv_called_twice,gru", "--repeats", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| conv_called_twice | " in text and "| gru | " in text
    rows = {r["model"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["conv_called_twice"]["quantized"] == 2 and rows["conv_called_twice"]["skipped"] == 1
    for r in rows.values():
        assert _positive(r["bare_s"]) and _positive(r["ours_s"]) and _positive(r["ratio"])
        assert r["ours_files"] == 2 and r["ours_failed"] == [] and r["bare_files"] == 2 and r["bare_failed"] == []


def test_zoo_bench_rejects_an_unknown_model():
    import pytest

    from bench import zoo

    with pytest.raises(SystemExit):
        zoo.main(["--models", "alexnet"])


def test_cli_errors_bench_times_a_refused_parameter(capsys):
    from bench import cli_errors

    assert cli_errors.main(["--smoke"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| checkpoint |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert _positive(float(cells[1])) and cells[4] == "2" and cells[5] == "1"
    assert "parameter 'checkpoint'" in cells[6]


def test_distill_bench_reports_the_ratio_the_depth_sweep_memory_and_quality(tmp_path, capsys):
    from bench import distill

    out = tmp_path / "distill.json"
    assert distill.main(["--smoke", "--part", "all", "--variants", "distill,slow", "--save", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "AMCT's distill on this setup: 21.5x" in text and "seconds per block, max / min over depths" in text
    res = json.loads(out.read_text())
    ratio = res["ratio"]["variants"]
    assert _positive(ratio["distill"]["ratio"]) and _positive(ratio["slow"]["ratio"])
    assert all(_positive(v) for v in res["sweep"]["per_block_s"].values())
    mem = res["memory"]["distill"]
    assert _positive(mem["added_mb"]) and mem["cache"]["cached_batches"] == 2
    assert mem["export"] == {"checker": "ok", "verify_passed": True, "verdict": "pass", "errors": []}
    q = res["quality"]["distill"]
    assert q["transformer"]["mse_distilled"] < q["transformer"]["mse_calibration_only"]
    assert q["digits"][0]["int8_distilled_ort"] is not None


@pytest.mark.integration
def test_large_bench_measures_verify_and_the_flow_against_the_export(prefect_api, tmp_path, capsys):
    from bench import large

    out = tmp_path / "large.json"
    assert large.main(["--model", "tiny", "--smoke", "--prefect-api-url", prefect_api, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "x export" in text and "flow stage parity" in text
    steps = json.loads(out.read_text())["steps"]
    for step in large.STEPS[1:]:
        assert "error" not in steps[step], steps[step]
        assert _positive(steps[step]["seconds"]) and _positive(steps[step]["peak_rss_mb"])
    assert steps["verify"]["verdict"] == steps["verify+parity"]["verdict"] == "pass"
    assert steps["flow"]["completed"] and set(steps["flow"]["stages"]) == set(large.FLOW_STAGES)


def test_parity_noise_bench_prints_both_tables(capsys):
    from bench import parity_noise

    assert parity_noise.main(["--model", "deep_encoder", "--batches", "4", "--draws", "20"]) == 0
    text = capsys.readouterr().out
    assert "1. Where the difference comes from" in text and "2. One batch vs pooled batches" in text
    assert "| torch vs ONNX Runtime, optimizations off (parity) |" in text
    assert "| torch vs ORT off | 2 | 4 |" in text
