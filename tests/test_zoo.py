"""The conformance zoo: every architecture of tests/zoo_models.py, calibrated only and distilled,
exported for every target at a low and a high opset with a dynamic batch axis, gives valid files that
compute what the torch model computes.

Each model is distilled once per state and each file written once (cached on the module's Zoo); the
tests only read them. Inputs are tiny: structure is what is checked, not size.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from amct_core import create_distill_config, create_distill_model, distill, save_distill_model
from amct_core.distill import calibrate_distill_model
from amct_core.verify import preflight, verify
from tests.zoo_models import ZOO

TARGETS = (("A2", 11), ("A2", 13), ("A3", 11), ("A3", 13), ("950", 11), ("950", 17))
STATES = ("calibrated", "distilled")
CASES = [pytest.param(m, s, t, o, id=f"{m}-{s}-{t}-opset{o}") for m in ZOO for s in STATES for t, o in TARGETS]
CASE = "name,state,target,opset"
OTHER_BATCH = 3  # the files are exported at batch 2; every run uses batch 3 (the dynamic axis)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@dataclass(frozen=True)
class Exported:
    fake_quant: Path
    deploy: Path
    student: torch.nn.Module
    config: Path


class Zoo:
    def __init__(self, root: Path):
        self.root = root

    @functools.cache  # noqa: B019 - one Zoo per test session: the cache lives as long as it does
    def student(self, name: str, state: str) -> tuple[torch.nn.Module, Path]:
        """The QAT student of zoo model ``name``: calibrated on a tiny loader, or distilled on it with
        amct_core's distill() (which starts from that same calibration)."""
        z = ZOO[name]
        teacher = z.float_model()
        d = self.root / f"{name}-{state}"
        d.mkdir(parents=True)
        cfg = d / "distill_config.json"
        create_distill_config(cfg, teacher, z.inputs(2, 0))
        student = create_distill_model(cfg, teacher, z.inputs(2, 0))
        loader = [z.inputs(4, seed) for seed in range(1, 4)]
        if state == "calibrated":
            calibrate_distill_model(student, cfg, loader, model=teacher)
        else:
            distill(teacher, student, cfg, loader, epochs=1, lr=1e-3)
        return student.eval(), cfg

    @functools.cache  # noqa: B019 - one Zoo per test session: the cache lives as long as it does
    def export(self, name: str, state: str, target: str, opset: int) -> Exported:
        z = ZOO[name]
        student, cfg = self.student(name, state)
        d = self.root / f"{name}-{state}-{target}-opset{opset}"
        save_distill_model(student, str(d / "m"), z.inputs(2, 0), record_file=str(d / "record.txt"),
                           input_names=list(z.input_names), output_names=list(z.output_names),
                           dynamic_axes=z.dynamic_axes, target=target, opset_version=opset)
        return Exported(d / "m_fake_quant_model.onnx", d / "m_deploy_model.onnx", student, cfg)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Zoo:
    return Zoo(tmp_path_factory.mktemp("zoo"))


def _feeds(name: str) -> dict[str, np.ndarray]:
    z = ZOO[name]
    return {n: t.numpy() for n, t in zip(z.input_names, z.inputs(OTHER_BATCH, 7), strict=True)}


def _assert_sorted(model: onnx.ModelProto) -> None:
    """Every node input is a graph input, an initializer or the output of an earlier node."""
    known = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        missing = [i for i in node.input if i and i not in known]
        assert not missing, f"{node.op_type} {node.name!r} reads {missing} before they are defined"
        known.update(node.output)
    assert {o.name for o in model.graph.output} <= known


@pytest.mark.parametrize(CASE, CASES)
def test_fake_quant_model_passes_the_full_onnx_checker_with_one_opset(zoo, name, state, target, opset):
    m = onnx.load(zoo.export(name, state, target, opset).fake_quant)
    onnx.checker.check_model(m, full_check=True)
    assert [(o.domain, o.version) for o in m.opset_import] == [("", opset)]


@pytest.mark.parametrize(CASE, CASES)
def test_deploy_model_is_sorted_with_one_opset(zoo, name, state, target, opset):
    m = onnx.load(zoo.export(name, state, target, opset).deploy)
    _assert_sorted(m)
    assert [(o.domain, o.version) for o in m.opset_import] == [("", opset)]


@pytest.mark.parametrize(CASE, CASES)
def test_both_models_have_amct_structure(zoo, name, state, target, opset):
    """No Identity or BatchNormalization left (every BN follows its conv here and is folded);
    AscendQuant with exactly scale, offset, dst_type; every quantized layer's weight and bias are
    initializers."""
    e = zoo.export(name, state, target, opset)
    for path in (e.fake_quant, e.deploy):
        ops = {n.op_type for n in onnx.load(path).graph.node}
        assert not ops & {"Identity", "BatchNormalization"}, (path.name, ops)
    deploy = onnx.load(e.deploy)
    quants = [n for n in deploy.graph.node if n.op_type == "AscendQuant"]
    assert quants and all(sorted(a.name for a in q.attribute) == ["dst_type", "offset", "scale"] for q in quants)
    inits = {t.name for t in deploy.graph.initializer}
    for layer in preflight(deploy, target=target).layers:
        node = next(n for n in deploy.graph.node if n.name == layer)
        assert [i for i in node.input[1:] if i] and all(i in inits for i in node.input[1:] if i), (layer, node.input)


@pytest.mark.parametrize(CASE, CASES)
def test_every_layer_the_config_enables_is_quantized(zoo, name, state, target, opset):
    e = zoo.export(name, state, target, opset)
    enabled = [k for k, v in json.loads(e.config.read_text()).items()
               if isinstance(v, dict) and v.get("quant_enable")]
    assert sorted(preflight(e.deploy, target=target).layers) == sorted(enabled)


@pytest.mark.parametrize(CASE, CASES)
def test_fake_quant_model_runs_at_another_batch_with_optimizations_off_and_all(zoo, name, state, target, opset):
    path = str(zoo.export(name, state, target, opset).fake_quant)
    outs = []
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        so.intra_op_num_threads = 1
        outs.append(ort.InferenceSession(path, so, providers=["CPUExecutionProvider"]).run(None, _feeds(name)))
    for off, full in zip(*outs, strict=True):
        assert off.shape[0] == OTHER_BATCH and np.isfinite(off).all()
        np.testing.assert_allclose(full, off, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(off).max())))


@pytest.mark.parametrize(CASE, CASES)
def test_verify_passes_preflight_deploy_simulation_and_torch_parity(zoo, name, state, target, opset):
    e = zoo.export(name, state, target, opset)
    report, _ = verify(deploy=e.deploy, fake_quant=e.fake_quant, torch_model=e.student,
                       inputs=ZOO[name].inputs(OTHER_BATCH, 7), target=target)
    assert report["verdict"] == "pass", report["summary"]
    assert sorted(report["checks_run"]) == ["deploy_simulation", "parity", "preflight"]


@pytest.mark.parametrize("name", [n for n in ZOO if ZOO[n].skipped])
def test_a_layer_that_cannot_be_quantized_is_skipped_with_its_reason(zoo, name):
    _, cfg = zoo.student(name, "calibrated")
    c = json.loads(cfg.read_text())
    for layer, reason in ZOO[name].skipped.items():
        assert c[layer]["quant_enable"] is False and reason in c[layer]["skip_reason"]


@pytest.mark.parametrize("name", list(ZOO))
def test_the_distilled_state_is_trained_by_distill(zoo, name):
    """distill() ran every distill group, and kept trained values for at least one (a block whose loss
    went up keeps its calibrated values)."""
    student, cfg = zoo.student(name, "distilled")
    groups = json.loads(cfg.read_text())["distill_group"]
    assert len(student.amct_distill_report) == len(groups) > 0
    assert any(r["kept"] == "distilled" for r in student.amct_distill_report)
