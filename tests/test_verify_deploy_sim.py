"""Deploy simulation: the deploy model run on the CPU as the device defines it, against the fake-quant model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from amct_core.verify import build_simulation, compare_deploy, simulate_deploy
from amct_core.verify.deploy_sim import SimulationError
from tests import broken_models as bm

EXPORTED = ["cnn", "mlp", "encoder", "two"]


@pytest.mark.parametrize("name", EXPORTED)
def test_accumulators_of_exported_models_equal_fake_quant_exactly(name):
    e = bm.export(name)
    r = compare_deploy(e.deploy, e.fake_quant, seed=3)
    assert r.ok, r.message
    assert r.layers, "no layer compared"
    for layer in r.layers:
        assert layer.acc_max_abs_diff == 0.0, (layer.name, layer.acc_max_abs_diff)
        assert layer.acc_exact_fraction == 1.0
        assert layer.input_grid_mismatches == 0
        assert layer.acc_max_abs > 0  # the comparison saw real, non-trivial accumulators
    assert all(o.identical for o in r.outputs)


def test_every_quantized_layer_of_the_cnn_is_compared():
    e = bm.export("cnn")
    r = compare_deploy(e.deploy, e.fake_quant)
    assert sorted(l.name for l in r.layers) == sorted(["conv1", "conv2", "dw", "pw", "dilated", "fc"])


def test_simulation_on_user_inputs_equals_fake_quant_output_bit_for_bit():
    import onnxruntime as ort
    e = bm.export("encoder")
    x = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(11)).numpy()
    outs = simulate_deploy(e.deploy, [x], accumulators=True)
    sess = ort.InferenceSession(str(e.fake_quant), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    out_name = [k for k in outs if not k.endswith(":acc")][0]
    np.testing.assert_array_equal(outs[out_name], ref)
    assert outs["ff1:acc"].dtype == np.int32


@pytest.mark.parametrize("name,layer", [("cnn", "conv2"), ("cnn", "dw"), ("mlp", "fc2"), ("encoder", "k"), ("encoder", "ff2")])
def test_corrupted_int8_weight_fails_and_names_the_layer(name, layer):
    e = bm.export(name)
    bad = bm.corrupt_weight(bm.load(e.deploy), layer, index=5)
    r = compare_deploy(bad, e.fake_quant)
    assert not r.ok
    assert r.worst_layer.name == layer
    assert r.worst_layer.failed_figure == "int32_accumulator"
    assert repr(layer) in r.message and "int32 accumulators differ" in r.message
    assert r.worst_layer.static["weight_differences"] == 1


@pytest.mark.parametrize("name,layer", [("cnn", "conv2"), ("cnn", "fc"), ("mlp", "fc1"), ("encoder", "q"), ("two", "conv")])
def test_corrupted_int32_bias_fails_and_names_the_layer(name, layer):
    e = bm.export(name)
    bad = bm.corrupt_bias(bm.load(e.deploy), layer, index=1, delta=1)  # off by ONE integer
    r = compare_deploy(bad, e.fake_quant)
    assert not r.ok
    assert r.worst_layer.name == layer
    assert r.worst_layer.failed_figure == "int32_accumulator"
    assert r.worst_layer.acc_max_abs_diff == 1.0


@pytest.mark.parametrize("name,layer", [("cnn", "pw"), ("cnn", "fc"), ("mlp", "fc3"), ("encoder", "v"), ("two", "head")])
def test_corrupted_deq_scale_fails_and_names_the_layer(name, layer):
    e = bm.export(name)
    bad = bm.corrupt_deq_scale(bm.load(e.deploy), layer, index=0, factor=1.0 + 2 ** -20)  # a few float32 ulps
    r = compare_deploy(bad, e.fake_quant)
    assert not r.ok
    failing = [l for l in r.layers if not l.ok]
    assert failing[0].name == layer or r.worst_layer.name == layer
    by_name = {l.name: l for l in r.layers}
    assert by_name[layer].failed_figure == "dequantized_output"
    assert by_name[layer].acc_max_abs_diff == 0.0  # accumulators unaffected, the scale is what differs


def test_corrupted_quant_scale_fails_at_the_input_grid():
    e = bm.export("mlp")
    m = bm.load(e.deploy)
    q = bm.node(m, "fc2.quant")
    for a in q.attribute:
        if a.name == "scale":
            a.f *= 1.05
    r = compare_deploy(m, e.fake_quant)
    assert not r.ok
    assert r.worst_layer.name == "fc2" and r.worst_layer.failed_figure == "input_grid"


def test_acc_check_is_not_vacuous_the_fake_quant_side_is_read():
    """Corrupting the fake-quant model's weight (deploy untouched) must fail too."""
    e = bm.export("cnn")
    fq = bm.load(e.fake_quant)
    w = bm.get_array(fq, "dilated.weight").copy()
    w.reshape(-1)[7] += 1
    bm.set_array(fq, "dilated.weight", w)
    r = compare_deploy(e.deploy, fq)
    assert not r.ok and r.worst_layer.name == "dilated"


# ---------------------------------------------------------------------------------------------
# arithmetic of the simulation, against references computed here
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("offset", [-128, -37, 0, 5, 127])
def test_ascend_quant_rounds_half_to_even_and_clips(offset):
    scale = 4.0  # x * 4 hits exact .5 ties for x = k/8
    xs = np.concatenate([np.arange(-40, 41) / 8.0, [0.1249999, 0.125, 0.3750001, -0.375, 100.0, -100.0, 31.87, -32.1]])
    m = bm.quant_probe_pair(xs, scale, offset)
    feed = [xs.astype(np.float32).reshape(1, 1, 1, -1)]
    # the device (FORMATS §5) rounds x*scale + offset; training / fake-quant round x*scale, then add
    acc = simulate_deploy(m, feed, accumulators=True)["probe:acc"]
    expected = bm.reference_quant(xs, scale, offset, device=True) - offset
    np.testing.assert_array_equal(acc.reshape(-1), expected.astype(np.int64))
    acc_t = simulate_deploy(m, feed, accumulators=True, quant_rounding="training")["probe:acc"]
    expected_t = bm.reference_quant(xs, scale, offset) - offset
    np.testing.assert_array_equal(acc_t.reshape(-1), expected_t.astype(np.int64))
    assert (np.count_nonzero(expected != expected_t) > 0) == (offset % 2 == 1)
    if offset == 0:  # ties written out by hand: x*scale = 0.5, 1.5, 2.5, -1.5, -2.5 round to even
        got = dict(zip(xs.tolist(), acc.reshape(-1).tolist(), strict=True))
        assert [got[0.125], got[0.375], got[0.625], got[-0.375], got[-0.625]] == [0, 2, 2, -2, -2]
        assert got[100.0] == 127 and got[-100.0] == -128


@pytest.mark.parametrize("conf", [
    dict(), dict(stride=2), dict(groups=2, c_in=4, c_out=6), dict(groups=4, c_in=4, c_out=4), dict(dilation=2, pad=2),
    dict(pad=0, k=1), dict(k=5, pad=2, stride=3),
])
def test_integer_conv_matches_an_int64_reference(conf):
    fq, dep, info = bm.hand_built_pair(**conf)
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((2, conf.get("c_in", 4), 9, 9)) * 2).astype(np.float32)
    acc = simulate_deploy(dep, [x], accumulators=True)[f"{info['conv']}:acc"].astype(np.int64)
    qx = bm.reference_quant(x, info["inv1"], info["off1"]) - info["off1"]
    a = info["conv_attrs"]
    ref = torch.nn.functional.conv2d(torch.tensor(qx, dtype=torch.float64),
                                     torch.tensor(info["w1"].astype(np.float64)),
                                     torch.tensor(info["b1"].astype(np.float64)), a["strides"], a["pads"][0],
                                     a["dilations"], a["group"]).numpy()
    np.testing.assert_array_equal(acc, ref.astype(np.int64))


@pytest.mark.parametrize("explicit_quant_defaults", [False, True])
@pytest.mark.parametrize("style", ["ours", "amct"])
def test_hand_built_pair_passes_in_both_styles_and_both_ascend_quant_forms(style, explicit_quant_defaults):
    fq, dep, info = bm.hand_built_pair(style=style, explicit_quant_defaults=explicit_quant_defaults)
    r = compare_deploy(dep, fq, seed=5)
    assert r.ok, (style, r.message)
    assert {l.name for l in r.layers} == {"features.0", "classifier"}


def test_large_accumulations_use_the_float32_summation_bound_and_still_catch_corruption():
    # K = 128 * 5 * 5 = 3200 terms: partial sums of the float32 fake-quant Conv can exceed 2^24
    fq, dep, info = bm.hand_built_pair(c_in=128, c_out=8, k=5, pad=2, hw=6)
    x = (np.random.default_rng(2).standard_normal((2, 128, 6, 6)) * 4).astype(np.float32)
    r = compare_deploy(dep, fq, inputs=[x])
    assert r.ok, r.message
    conv = next(l for l in r.layers if l.name == "features.0")
    assert conv.acc_abs_sum_max > 2 ** 24
    bad = bm.corrupt_weight(dep, "features.0", index=123, delta=1)
    r2 = compare_deploy(bad, fq, inputs=[x])
    assert not r2.ok and r2.worst_layer.name == "features.0"


def test_large_transposed_gemm_uses_the_summation_bound_and_still_catches_corruption():
    # AMCT-style Gemm (transB=1, weight [out, in]) with K = 600 terms: the bound and the transposed weight
    # are computed in the simulation graph from the int8 weight itself
    fq, dep, info = bm.hand_built_pair(style="amct", c_in=4, c_out=600, hidden=7, hw=4)
    x = (np.random.default_rng(4).standard_normal((2, 4, 4, 4)) * 3).astype(np.float32)
    r = compare_deploy(dep, fq, inputs=[x])
    assert r.ok, r.message
    fc = next(l for l in r.layers if l.name == "classifier")
    assert fc.acc_abs_sum_max == fc.acc_abs_sum_max and fc.acc_abs_sum_max > 0  # computed (not NaN)
    assert fc.static["weight_differences"] == 0
    r2 = compare_deploy(bm.corrupt_weight(dep, "classifier", index=1234, delta=3), fq, inputs=[x])
    assert not r2.ok and r2.worst_layer.name == "classifier"


def test_models_with_external_data_verify_like_embedded_ones(tmp_path):
    import onnx

    from amct_core.verify import verify

    e = bm.export("encoder")
    paths = {}
    for kind in ("deploy", "fake_quant"):
        paths[kind] = tmp_path / getattr(e, kind).name
        onnx.save_model(onnx.load(str(getattr(e, kind))), str(paths[kind]), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=paths[kind].name + ".data", size_threshold=1024)
    embedded, _ = verify(deploy=e.deploy, fake_quant=e.fake_quant, torch_model=e.model, example_inputs=(e.example,))
    external, _ = verify(deploy=paths["deploy"], fake_quant=paths["fake_quant"], torch_model=e.model,
                         example_inputs=(e.example,))
    assert embedded["verdict"] == external["verdict"] == "pass", external["summary"]
    for check in ("parity", "deploy_simulation"):
        assert embedded[check]["layers"] == external[check]["layers"]
        assert embedded[check]["outputs"] == external[check]["outputs"]


@pytest.mark.parametrize("opset", [8, 10, 16])
def test_deploy_models_of_other_opsets_are_simulated(opset):
    # opset 8/9 lack ConvInteger: the model is raised to 10 with ONNX's version converter first
    fq, dep, info = bm.hand_built_pair(opset=opset)
    r = compare_deploy(dep, fq)
    assert r.ok, r.message
    assert r.opset == opset


def test_exported_opset_13_model_is_simulated():
    e = bm.export("mlp", opset=13)
    r = compare_deploy(e.deploy, e.fake_quant)
    assert r.ok and r.opset == 13, r.message


def test_unwrapped_layer_cannot_be_simulated_and_the_error_names_it():
    e = bm.export("mlp")
    with pytest.raises(SimulationError, match="fc2"):
        build_simulation(bm.missing_dequant(bm.load(e.deploy), "fc2"))


def test_a_wrong_weight_no_input_reaches_is_still_caught_from_the_stored_values():
    fq, dep, info = bm.hand_built_pair()
    x = np.zeros((2, 4, 9, 9), np.float32)  # q - offset = 0 everywhere: the conv weights multiply only zeros
    bad = bm.corrupt_weight(dep, "features.0", index=4, delta=1)
    ok = compare_deploy(dep, fq, inputs=[x])
    assert ok.ok, ok.message
    r = compare_deploy(bad, fq, inputs=[x])
    assert not r.ok and r.worst_layer.name == "features.0"
    assert r.worst_layer.acc_max_abs_diff == 0.0  # the simulation alone could not see it
    assert r.worst_layer.failed_figure == "int8_weight" and r.worst_layer.static["weight_differences"] == 1


def test_amct_style_gemm_weights_are_compared_in_one_layout():
    fq, dep, info = bm.hand_built_pair(style="amct", hidden=6, c_out=6)  # square [6, 6] Gemm weight, transB=1
    r = compare_deploy(dep, fq)
    assert r.ok, r.message
    assert {l.name: l.static["weight_differences"] for l in r.layers}["classifier"] == 0


def test_a_layer_whose_shapes_differ_between_the_files_fails_with_a_named_figure():
    fq, dep, info = bm.hand_built_pair()
    # the fake-quant conv gets stride 2: same weights, other output shape
    conv = bm.node(fq, "features.0")
    for a in conv.attribute:
        if a.name == "strides":
            a.ints[:] = [2, 2]
    r = compare_deploy(dep, fq)
    assert not r.ok
    by = {l.name: l for l in r.layers}
    assert by["features.0"].failed_figure == "accumulator_shape" and "shape" in by["features.0"].message
    assert r.worst_layer.name == "features.0"
