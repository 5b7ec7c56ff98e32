"""The format facts of amct_core.formats (FORMATS.md): arithmetic, names and file paths, one rule per test."""
import numpy as np
import pytest
import torch

from amct_core import formats
from amct_core.errors import RecordError
from amct_core.quant.arith import round_ste


def test_weight_quantization_rounds_half_to_even_and_clips_to_int8():
    w = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 1000.0, -1000.0])
    assert formats.quantize_weight(w, np.float32(1.0)).tolist() == [0.0, 2.0, 2.0, 0.0, -2.0, 127.0, -128.0]


def test_weight_quantization_writes_zero_as_positive_zero():
    q = formats.quantize_weight(torch.tensor([-0.1, -0.0]), np.float32(1.0))
    assert np.signbit(q.numpy()).tolist() == [False, False]


@pytest.mark.parametrize("axis", [0, 1])
def test_weight_quantization_divides_each_channel_by_its_own_scale(axis):
    w = torch.full((2, 2), 6.0)
    q = formats.quantize_weight(w, np.array([1.0, 3.0], np.float32), axis=axis)
    want = np.array([[6.0, 6.0], [2.0, 2.0]])
    assert q.numpy().tolist() == (want if axis == 0 else want.T).tolist()


def test_weight_quantization_leaves_its_input_unchanged():
    w = torch.tensor([0.4, -3.7])
    formats.quantize_weight(w, np.float32(0.5))
    assert w.tolist() == pytest.approx([0.4, -3.7])


def test_training_weight_quantization_is_the_same_grid_with_a_gradient():
    w = torch.tensor([0.3, -1.6, 900.0], requires_grad=True)
    q = formats.quantize_weight(w, torch.tensor([0.1]), rounding=round_ste)
    assert q.tolist() == formats.quantize_weight(w.detach(), np.float32(0.1)).tolist()
    q.sum().backward()
    assert w.grad.tolist() == pytest.approx([10.0, 10.0, 0.0])  # straight through inside the range, 0 where clipped


def test_bias_quantization_divides_by_weight_scale_times_data_scale():
    deq = formats.deq_scale(0.5, np.array([0.25], np.float32))
    assert formats.quantize_bias(np.array([1.0, -0.0625]), deq, "fc").tolist() == [8.0, -0.0]


def test_a_bias_outside_int32_names_the_layer_and_the_channel():
    deq = formats.deq_scale(1e-3, np.array([1e-3, 1e-3], np.float32))
    with pytest.raises(RecordError, match=r"layer 'fc': bias overflows int32 .*channel 1.*exclude this layer"):
        formats.quantize_bias(np.array([1.0, 1e6]), deq, "fc")


def test_deq_scale_is_the_float32_product():
    deq = formats.deq_scale(0.1, np.array([0.3], np.float32))
    assert deq.dtype == np.float32 and deq[0] == np.float32(0.1) * np.float32(0.3)


def test_packed_deq_scale_holds_the_float32_pattern_in_its_low_32_bits():
    deq = np.array([0.001, 3.5], dtype=np.float32)
    packed = formats.pack_deq_scale(deq)
    assert packed.dtype == np.uint64
    assert (packed >> np.uint64(32)).tolist() == [0, 0]
    assert (packed & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.float32).tolist() == deq.tolist()


def test_unpacking_a_packed_deq_scale_gives_it_back():
    deq = np.array([[0.001], [3.5]], dtype=np.float32)
    low, high = formats.unpack_deq_scale(formats.pack_deq_scale(deq))
    assert low.tolist() == deq.ravel().tolist() and high.tolist() == [0, 0]


def test_ascend_quant_is_written_with_exactly_its_required_attributes():
    written = formats.ascend_quant_attributes(0.02, -3)
    assert set(written) == {n for n, (_, required) in formats.ASCEND_QUANT_ATTRS.items() if required}
    assert written == {"scale": float(np.float32(1) / np.float32(0.02)), "offset": -3.0, "dst_type": "INT8"}


def test_ascend_dequant_is_written_with_exactly_its_required_attributes():
    written = formats.ascend_dequant_attributes()
    assert set(written) == {n for n, (_, required) in formats.ASCEND_DEQUANT_ATTRS.items() if required}
    assert written == {"dtype": 0}


def test_layer_names_follow_the_format():
    n = formats.LayerNames("layer1.0.conv1")
    assert (n.quant, n.dequant, n.dequant_param) == ("layer1.0.conv1.quant", "layer1.0.conv1.dequant",
                                                     "layer1.0.conv1.dequant.param")
    assert n.fakequant("round") == "layer1.0.conv1.quant.fakequant.round"
    assert n.fakedequant("mul") == "layer1.0.conv1.fakedequant.mul"


def test_a_save_path_prefix_names_the_files(tmp_path):
    assert formats.output_file(tmp_path / "resnet", formats.DEPLOY_MODEL) == tmp_path / "resnet_deploy_model.onnx"


def test_a_save_path_ending_in_a_slash_gives_unprefixed_names(tmp_path):
    assert formats.output_file(f"{tmp_path}/out/", formats.FAKE_QUANT_MODEL) == tmp_path / "out" / "fake_quant_model.onnx"


def test_a_save_path_naming_an_existing_directory_gives_unprefixed_names(tmp_path):
    assert formats.output_file(tmp_path, formats.DEPLOY_MODEL) == tmp_path / "deploy_model.onnx"
