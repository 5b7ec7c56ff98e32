"""Fake-quant parity: the distilled torch model vs the fake-quant ONNX model in ONNX Runtime."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from amct_core.verify import Tolerances, check_parity, make_inputs
from tests import broken_models as bm

EXPORTED = ["cnn", "mlp", "encoder", "two"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("name", EXPORTED)
def test_parity_passes_on_exported_models(name):
    e = bm.export(name)
    r = check_parity(e.model, e.fake_quant, example_inputs=e.example, seed=1)
    assert r.ok, r.message
    assert {o.opt_level for o in r.outputs} == {"disabled", "all"}
    for o in r.outputs:
        assert o.figures["cosine"] > 0.9999 and o.figures["sqnr_db"] > 40
    for l in r.layers:
        # locally each layer agrees to within bias rounding (half a step) plus float noise
        assert l.local is not None and l.local["max_error_steps"] < 1.0, (l.name, l.local)


def test_every_quantized_layer_is_compared_and_bn_folds_are_followed():
    e = bm.export("cnn")
    r = check_parity(e.model, e.fake_quant, example_inputs=e.example)
    by = {l.name: l for l in r.layers}
    assert sorted(by) == sorted(["conv1", "conv2", "dw", "pw", "dilated", "fc"])
    assert by["conv1"].folded_bn == "bn1" and by["conv2"].folded_bn == "bn2" and by["dw"].folded_bn is None


class InPlaceBlock(torch.nn.Module):
    """torchvision's habits: an in-place ReLU right after a folded BatchNorm, and ``out += identity``."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8)
        self.conv2, self.bn2 = torch.nn.Conv2d(8, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8)
        self.relu = torch.nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(y))
        out += y
        return self.relu(out)


def test_layer_outputs_changed_in_place_later_are_compared_as_the_layer_produced_them(tmp_path):
    from amct_core import create_distill_config, create_distill_model, save_distill_model

    torch.manual_seed(0)
    model, x = InPlaceBlock().eval(), torch.randn(2, 3, 8, 8)
    create_distill_config(tmp_path / "c.json", model, x)
    qat = create_distill_model(tmp_path / "c.json", model, x).eval()
    save_distill_model(qat, str(tmp_path / "m"), x, record_file=str(tmp_path / "r.txt"))
    r = check_parity(qat, tmp_path / "m_fake_quant_model.onnx", inputs=x)
    assert r.ok, r.message
    by = {l.name: l for l in r.layers}
    assert by["conv1"].folded_bn == "bn1" and by["conv2"].folded_bn == "bn2"
    assert all(l.local["max_error_steps"] < 1.0 for l in r.layers)


def test_output_figures_include_steps_where_a_quantized_layer_makes_the_output():
    e = bm.export("two")
    r = check_parity(e.model, e.fake_quant, example_inputs=e.example)
    figs = {o.name: o.figures for o in r.outputs if o.opt_level == "disabled"}
    assert figs["feat"]["max_error_steps"] is not None and figs["feat"]["max_error_steps"] < 1.0
    assert all(f["argmax_agreement"] == 1.0 for f in figs.values())


@pytest.mark.parametrize("name,initializer,layer,factor", [
    ("cnn", "conv2.fakedequant.deq_scale", "conv2", 1.1),
    ("cnn", "dw.quant.fakequant.scale", "dw", 1.01),
    ("cnn", "pw.fakedequant.deq_scale", "pw", 1.001),
    ("mlp", "fc2.quant.fakequant.scale", "fc2", 0.5),
    ("encoder", "proj.fakedequant.deq_scale", "proj", 1.02),
    ("encoder", "ff1.quant.fakequant.scale", "ff1", 1.05),
])
def test_perturbed_scale_fails_and_names_the_layer(name, initializer, layer, factor):
    e = bm.export(name)
    bad = bm.perturb_fake_quant(bm.load(e.fake_quant), initializer, factor)
    r = check_parity(e.model, bad, example_inputs=e.example)
    assert not r.ok
    assert r.worst_layer.name == layer
    assert f"worst layer {layer!r}" in r.message
    assert r.worst_layer.failed and r.worst_layer.failed[0] in r.message


def test_perturbed_offset_fails():
    e = bm.export("encoder")
    bad = bm.perturb_fake_quant(bm.load(e.fake_quant), "ff2.quant.fakequant.offset", 0.5)
    r = check_parity(e.model, bad, example_inputs=e.example)
    assert not r.ok and r.worst_layer.name == "ff2"


def test_given_inputs_are_used_as_they_are():
    e = bm.export("mlp")
    x = torch.full((2, 20), 0.25)
    r = check_parity(e.model, e.fake_quant, inputs=(x,))
    assert r.ok
    # a constant input row gives identical rows in both models' outputs: check the figures reflect x
    r2 = check_parity(e.model, e.fake_quant, inputs=x)
    assert r2.outputs[0].figures == r.outputs[0].figures
    r3 = check_parity(e.model, e.fake_quant, inputs=x.numpy())
    assert r3.outputs[0].figures == r.outputs[0].figures
    assert r.inputs and list(r.inputs.values())[0]["shape"] == [2, 20]


def test_generated_inputs_are_seeded_and_follow_the_example():
    ex = torch.zeros(3, 4, dtype=torch.float32)
    a, b, c = make_inputs(ex, seed=7)[0], make_inputs(ex, seed=7)[0], make_inputs(ex, seed=8)[0]
    assert a.shape == ex.shape and a.dtype == ex.dtype
    assert torch.equal(a, b) and not torch.equal(a, c)
    ints = make_inputs(torch.tensor([[0, 9]]), seed=1)[0]
    assert ints.dtype == torch.int64 and int(ints.min()) >= 0 and int(ints.max()) <= 9


def test_tolerances_are_parameters():
    e = bm.export("mlp")
    strict = check_parity(e.model, e.fake_quant, example_inputs=e.example,
                          tolerances={"layer_sqnr_min_db": 200.0})
    assert not strict.ok and "SQNR" in strict.message
    assert check_parity(e.model, e.fake_quant, example_inputs=e.example, tolerances=Tolerances()).ok
    with pytest.raises(ValueError, match="unknown tolerance"):
        check_parity(e.model, e.fake_quant, example_inputs=e.example, tolerances={"sqnr": 1})


def test_torch_model_state_is_left_alone():
    e = bm.export("cnn")
    before = {k: v.clone() for k, v in e.model.state_dict().items()}
    e.model.train()
    check_parity(e.model, e.fake_quant, example_inputs=e.example)
    assert e.model.training
    e.model.eval()
    after = e.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# ---- figures over enough values ---------------------------------------------------------------------
@pytest.mark.parametrize("min_values,batches", [(None, 1), (1, 1), (14, 1), (15, 2), (28, 2), (29, 3)])
def test_an_output_with_fewer_values_than_the_minimum_pools_as_many_batches_as_it_needs(min_values, batches):
    e = bm.export("mlp")  # output [2, 7]: 14 values per batch
    r = check_parity(e.model, e.fake_quant, example_inputs=e.example, tolerances={"figure_min_values": min_values})
    assert r.batches == batches
    assert all(o.figures["batches"] == batches for o in r.outputs)
    assert all(o.figures["shape"] == [2, 7] for o in r.outputs)
    assert r.to_dict()["batches"] == batches


def test_layers_with_enough_values_are_compared_on_the_first_batch_only():
    e = bm.export("mlp")  # fc1 and fc2: [2, 64]; fc3 makes the [2, 7] output
    r = check_parity(e.model, e.fake_quant, example_inputs=e.example, tolerances={"figure_min_values": 32})
    by = {l.name: l for l in r.layers}
    assert by["fc1"].figures["batches"] == by["fc2"].figures["batches"] == 1
    assert by["fc3"].figures["batches"] == by["fc3"].local["batches"] == by["fc3"].figures_opt_all["batches"] == 3
    assert any("'fc3'" in n and "3 input batches" in n for n in r.notes)


def test_further_batches_of_given_inputs_are_their_values_shuffled():
    from amct_core.verify.parity import _InputSource

    e = bm.export("mlp")
    x = torch.randn(2, 20, generator=torch.Generator().manual_seed(3))
    source = _InputSource(bm.load(e.fake_quant), (x,), None, seed=0, dims=None)
    b0, b1, b2 = (source.batch(k).tensors[0] for k in range(3))
    assert torch.equal(b0, x)
    for b in (b1, b2):
        assert b.shape == x.shape and not torch.equal(b, x)
        assert torch.equal(b.flatten().sort().values, x.flatten().sort().values)
    assert not torch.equal(b1, b2)


def _output_sqnr_per_batch(e, seeds) -> dict[int, float]:
    """The SQNR of the model's output over one batch (the figure before pooling), per input seed."""
    from amct_core.verify._run import session
    from amct_core.verify.metrics import sqnr_db

    s = session(bm.load(e.fake_quant))
    name = s.get_inputs()[0].name
    out = {}
    with torch.no_grad():
        for seed in seeds:
            x = make_inputs(e.example, seed)[0]
            out[seed] = sqnr_db(e.model(x).numpy(), s.run(None, {name: x.numpy()})[0])
    return out


def test_a_correct_deep_model_is_not_failed_by_the_two_logits_of_one_batch():
    # 12 encoder layers: float32 rounding differences flip int8 roundings that add up with depth, and an
    # SQNR over two numbers swings with how close the logits happen to be to zero
    e = bm.export("deep", batch=1)
    sqnr = _output_sqnr_per_batch(e, range(64))
    worst = min(sqnr, key=sqnr.get)
    assert sqnr[worst] < Tolerances().output_sqnr_min_db
    one_batch = check_parity(e.model, e.fake_quant, example_inputs=e.example, seed=worst,
                             tolerances={"figure_min_values": 1})
    assert not one_batch.ok and any(not o.ok for o in one_batch.outputs), one_batch.message
    pooled = check_parity(e.model, e.fake_quant, example_inputs=e.example, seed=worst)
    assert pooled.ok, pooled.message
    assert all(o.figures["sqnr_db"] >= Tolerances().output_sqnr_min_db and o.figures["batches"] == 16
               for o in pooled.outputs)


WRONG_FILES = {
    "scale": lambda fq, layer: bm.perturb_fake_quant(fq, f"{layer}.quant.fakequant.scale", 1.01),
    "flipped_weight": bm.flip_fake_quant_weight,
    "wrong_bias": bm.shift_fake_quant_bias,
}


@pytest.mark.parametrize("breaker", sorted(WRONG_FILES))
@pytest.mark.parametrize("name,layer", [("encoder", "ff1"), ("deep", "layers.5.ff_in")])
def test_a_wrong_file_fails_and_names_its_layer_on_shallow_and_deep_models(name, layer, breaker):
    e = bm.export(name)
    bad = WRONG_FILES[breaker](bm.load(e.fake_quant), layer)
    r = check_parity(e.model, bad, example_inputs=e.example)
    assert not r.ok
    assert r.worst_layer.name == layer, r.message
    assert r.worst_layer.failed[0].startswith("local")


@pytest.mark.parametrize("name,layer", [("mlp", "fc3"), ("deep", "cls")])
def test_a_wrong_output_scale_fails_the_pooled_output_figures(name, layer):
    e = bm.export(name)
    bad = bm.perturb_fake_quant(bm.load(e.fake_quant), f"{layer}.fakedequant.deq_scale", 1.1)
    r = check_parity(e.model, bad, example_inputs=e.example)
    assert r.outputs and all(not o.ok and o.figures["batches"] > 1 for o in r.outputs)
    assert all(any(f.startswith("SQNR") for f in o.failed) for o in r.outputs)


# ---- the weights parity fake-quantizes ----------------------------------------------------------------
def test_each_layer_fake_quantizes_its_weight_once_per_forward(monkeypatch):
    from amct_core.quant.modules import QuantLinear

    e = bm.export("mlp")
    calls: dict[str, int] = {}
    names = {m: n for n, m in e.model.named_modules()}
    real = QuantLinear._fake_quant_weight

    def counted(self):
        calls[names[self]] = calls.get(names[self], 0) + 1
        return real(self)

    monkeypatch.setattr(QuantLinear, "_fake_quant_weight", counted)
    r = check_parity(e.model, e.fake_quant, example_inputs=e.example)
    assert r.ok and r.batches > 1
    # one forward per batch; the local check reuses the weight its layer's forward quantized
    assert calls == {"fc1": r.batches, "fc2": r.batches, "fc3": r.batches}
    assert all("weight_memo" not in m.__dict__ for m in e.model.modules())


def test_run_with_layer_outputs_gives_each_layers_output_as_the_torch_module_computes_it():
    from amct_core.verify import run_with_layer_outputs

    e = bm.export("mlp")
    model = e.model.eval()
    seen = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o.detach().numpy().copy()))
             for n, m in model.named_modules() if n in ("fc1", "fc2")]
    with torch.no_grad():
        y = model(e.example).numpy()
    for h in hooks:
        h.remove()
    fm = onnx.load(e.fake_quant)
    feeds = {fm.graph.input[0].name: e.example.numpy()}
    got = run_with_layer_outputs(fm, feeds, ["fc1", "fc2"])
    assert set(got) == {fm.graph.output[0].name, "fc1", "fc2"}
    for name in ("fc1", "fc2"):
        assert got[name].shape == seen[name].shape
        np.testing.assert_allclose(got[name], seen[name], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got[fm.graph.output[0].name], y, rtol=1e-4, atol=1e-4)
    both = run_with_layer_outputs(fm, [feeds, feeds], ["fc1"], "all")
    assert len(both) == 2 and np.array_equal(both[0]["fc1"], both[1]["fc1"])
    with pytest.raises(ValueError, match="no quantized layer 'nope'"):
        run_with_layer_outputs(fm, feeds, ["nope"])
