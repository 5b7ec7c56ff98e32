"""The distill config file: read into one typed DistillConfig and checked once (amct_core/distill/config.py),
written back unchanged; create_distill_model, distill and calibrate_distill_model refuse a bad file with
the same error, naming the key, before any work."""
from __future__ import annotations

import copy
import dataclasses
import json
import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import amct_core
from amct_core import ConfigError
from amct_core.distill import (
    ConfigKeyError,
    DistillConfig,
    DistillDataConfig,
    DistillError,
    DistillWeightConfig,
    LayerConfig,
    calibrate_distill_model,
    load_distill_config,
    write_distill_config,
)
from amct_core.distill.config import TOP_LEVEL_KEYS

from .test_distill import cnn_data, cnn_teacher, make_student, same_state, state

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# The FunctionalCNN of test_distill: conv1 -> bn1 -> F.relu, conv2 -> F.relu, fc.
SIMPLE = """batch_num: 2
distill_override_layers {
  layer_name: "conv2"
  distill_data_quant_config { ulq_quantize { fixed_min: true clip_max_min { clip_max: 4.0 clip_min: 0.0 } } }
}
"""


@pytest.fixture
def setup(tmp_path):
    """(teacher, batches, config file, student): a config written by create_distill_config."""
    teacher = cnn_teacher()
    data = cnn_data(n=2)
    cfg, student = make_student(tmp_path, teacher, data[0][0])
    return teacher, data, cfg, student


def edited(path: str, edit) -> str:
    """``path`` rewritten with ``edit`` applied to its JSON object."""
    c = json.loads(open(path).read())
    edit(c)
    open(path, "w").write(json.dumps(c))
    return path


# ---- the file and the typed config ---------------------------------------------------------------


def test_a_written_config_reads_back_and_is_written_again_byte_for_byte(tmp_path):
    teacher = cnn_teacher()
    cfg, _ = make_student(tmp_path, teacher, cnn_data()[0][0], simple=SIMPLE)
    again = tmp_path / "again.json"
    write_distill_config(again, load_distill_config(cfg, teacher))
    assert again.read_bytes() == open(cfg, "rb").read()


def test_each_json_key_is_a_field_of_the_typed_config(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({
        "version": 1, "batch_num": 3, "group_size": 2, "data_dump": False, "target": "A3",
        "distill_group": [["conv1", "bn1"], ["fc"]],
        "conv1": {"quant_enable": True,
                  "distill_data_config": {"algo": "ulq_quantize", "dst_type": "INT8", "fixed_min": True,
                                          "clip_max": 6, "clip_min": 0},
                  "distill_weight_config": {"algo": "arq_distill", "channel_wise": True, "dst_type": "INT8"}},
        "fc": {"quant_enable": False, "skip_reason": "by hand"},
    }))
    c = load_distill_config(path)
    assert (c.version, c.batch_num, c.group_size, c.data_dump, c.target) == (1, 3, 2, False, "A3")
    assert c.distill_group == (("conv1", "bn1"), ("fc",))
    assert c.layers["conv1"].distill_data_config == DistillDataConfig(fixed_min=True, clip_max=6.0, clip_min=0.0)
    assert c.layers["conv1"].distill_weight_config == DistillWeightConfig(channel_wise=True)
    assert c.layers["fc"] == LayerConfig(quant_enable=False, skip_reason="by hand")
    assert c.enabled == ("conv1",)


def test_an_enabled_layer_without_sub_configs_gets_the_defaults():
    layer = LayerConfig.from_json({"quant_enable": True})
    assert layer.distill_data_config == DistillDataConfig()
    assert layer.distill_weight_config == DistillWeightConfig()


def test_a_checked_config_cannot_be_changed_afterwards(setup):
    _, _, cfg, _ = setup
    c = load_distill_config(cfg)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.batch_num = 0


_NAME = st.from_regex(r"[a-z][a-z0-9_]{0,5}", fullmatch=True).filter(lambda n: n not in TOP_LEVEL_KEYS)


@st.composite
def _data_configs(draw):
    clip = draw(st.one_of(st.none(), st.tuples(st.floats(0, 1e6), st.floats(-1e6, 0)).filter(lambda r: r[0] > r[1])))
    return DistillDataConfig(fixed_min=draw(st.none() | st.booleans()),
                             clip_max=None if clip is None else clip[0], clip_min=None if clip is None else clip[1])


_LAYERS = st.one_of(
    st.builds(LayerConfig, quant_enable=st.just(True), distill_data_config=_data_configs(),
              distill_weight_config=st.builds(DistillWeightConfig, channel_wise=st.none() | st.booleans())),
    st.builds(LayerConfig, quant_enable=st.just(False), skip_reason=st.none() | st.text(max_size=20)),
)


@st.composite
def _configs(draw):
    layers = draw(st.dictionaries(_NAME, _LAYERS, min_size=1, max_size=6).filter(
        lambda d: any(v.quant_enable for v in d.values())))
    names = draw(st.lists(_NAME, unique=True, max_size=6))
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(names) - 1)), max_size=3))) if names else []
    groups = [names[a:b] for a, b in zip([0, *cuts], [*cuts, len(names)], strict=True) if names[a:b]]
    return DistillConfig(layers=layers, distill_group=groups, batch_num=draw(st.integers(1, 64)),
                         group_size=draw(st.integers(1, 8)), target=draw(st.none() | st.sampled_from(["A2", "A3", "950"])))


@settings(max_examples=60, deadline=None)
@given(_configs())
def test_any_valid_config_survives_the_json_round_trip(config):
    assert DistillConfig.from_json(json.loads(json.dumps(config.to_json()))) == config


# ---- bad files: refused by every entry point, the same way --------------------------------------

BAD = [
    # (edit of the JSON object, the key path the error names)
    (lambda c: c.update({"nosuchlayer": {"quant_enable": True}}), "nosuchlayer"),
    (lambda c: c.update({"batch_num": 0}), "batch_num"),
    (lambda c: c.update({"batch_num": "4"}), "batch_num"),
    (lambda c: c.update({"version": 1.5}), "version"),
    (lambda c: c.update({"target": "A9"}), "target"),
    (lambda c: c.update({"distill_group": "conv1"}), "distill_group"),
    (lambda c: c.update({"distill_group": [["conv1"], ["ghost"]]}), "distill_group[1]"),
    (lambda c: c.update({"bn1": {"quant_enable": True}}), "bn1.quant_enable"),
    (lambda c: c["conv1"].update({"quant_enable": "yes"}), "conv1.quant_enable"),
    (lambda c: c["conv1"].pop("quant_enable"), "conv1.quant_enable"),
    (lambda c: c["conv1"].update({"skip_reson": "x"}), "conv1.skip_reson"),
    (lambda c: c["conv1"].update({"distill_data_config": "INT8"}), "conv1.distill_data_config"),
    (lambda c: c["conv1"]["distill_data_config"].update({"dst_type": "INT4"}), "conv1.distill_data_config.dst_type"),
    (lambda c: c["conv1"]["distill_data_config"].update({"algo": "minmax"}), "conv1.distill_data_config.algo"),
    (lambda c: c["fc"]["distill_weight_config"].update({"channel_wise": True}), "fc.distill_weight_config.channel_wise"),
    (lambda c: c["conv1"]["distill_weight_config"].update({"channel_wise": "yes"}),
     "conv1.distill_weight_config.channel_wise"),
    (lambda c: c.update({k: {"quant_enable": False} for k in ("conv1", "conv2", "fc")}), ""),
    # values only distill() used to refuse; create_distill_model accepted them
    (lambda c: c.update({"data_dump": True}), "data_dump"),
    (lambda c: c["conv1"]["distill_data_config"].update({"fixd_min": True}), "conv1.distill_data_config.fixd_min"),
    (lambda c: c["conv2"]["distill_data_config"].update({"fixed_min": 1}), "conv2.distill_data_config.fixed_min"),
    (lambda c: c["fc"]["distill_data_config"].update({"clip_max": -2.0, "clip_min": 0.0}), "fc.distill_data_config"),
    (lambda c: c["fc"]["distill_data_config"].update({"clip_max": 2.0}), "fc.distill_data_config.clip_min"),
    (lambda c: c.update({"distill_group": [["conv1"], []]}), "distill_group[1]"),
    (lambda c: c.update({"distill_group": [["conv1", "bn1"], ["conv1"]]}), "distill_group[1]"),
]


@pytest.mark.parametrize("edit, key", BAD)
def test_every_entry_point_refuses_a_bad_config_with_the_same_error_naming_the_key(setup, edit, key):
    teacher, data, cfg, student = setup
    edited(cfg, edit)
    before = state(student)
    calls = {
        "create_distill_model": lambda: amct_core.create_distill_model(cfg, teacher, data[0][0]),
        "distill": lambda: amct_core.distill(teacher, student, cfg, data),
        "calibrate_distill_model": lambda: calibrate_distill_model(student, cfg, data, model=teacher),
        "calibrate_distill_model without the teacher": lambda: calibrate_distill_model(student, cfg, data),
    }
    errors = {}
    for name, call in calls.items():
        with pytest.raises(ConfigKeyError) as e:
            call()
        errors[name] = e.value
    assert {".".join(e.key) for e in errors.values()} == {key}
    assert len({str(e) for e in errors.values()}) == 1, errors
    assert same_state(before, state(student))


def test_a_group_naming_a_block_and_a_module_inside_it_is_refused_at_load(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"distill_group": [["block1"], ["block1.0", "fc"]], "fc": {"quant_enable": True}}))
    with pytest.raises(ConfigKeyError, match=r"'block1\.0', a submodule of 'block1'") as e:
        load_distill_config(path)
    assert e.value.key == ("distill_group[1]",)


# ---- what the errors say -------------------------------------------------------------------------


def test_an_error_names_the_file(setup):
    teacher, _, cfg, _ = setup
    edited(cfg, lambda c: c.update({"batch_num": 0}))
    with pytest.raises(ConfigError, match=f"distill config '{cfg}': key 'batch_num' must be a positive integer"):
        load_distill_config(cfg, teacher)


@pytest.mark.parametrize("edit, suggestion", [
    (lambda c: c["conv1"]["distill_data_config"].update({"fixd_min": True}), "did you mean 'fixed_min'"),
    (lambda c: c.update({"batch_nm": 2}), "did you mean 'batch_num'"),
    (lambda c: c.update({"conv_1": {"quant_enable": True}}), "did you mean 'conv1'"),
])
def test_a_misspelled_key_gets_the_closest_right_one(setup, edit, suggestion):
    teacher, _, cfg, _ = setup
    with pytest.raises(ConfigKeyError, match=suggestion):
        load_distill_config(edited(cfg, edit), teacher)


def test_a_wrong_channel_wise_says_which_value_is_right(setup):
    teacher, _, cfg, _ = setup
    edited(cfg, lambda c: c["fc"]["distill_weight_config"].update({"channel_wise": True}))
    with pytest.raises(ConfigKeyError, match="'fc' is a Linear, whose weight is quantized per tensor: write false"):
        load_distill_config(cfg, teacher)


def test_a_key_written_twice_is_refused(setup):
    _, _, cfg, _ = setup
    text = open(cfg).read().replace('"batch_num": 1,', '"batch_num": 1, "batch_num": 8,')
    open(cfg, "w").write(text)
    with pytest.raises(ConfigKeyError, match="'batch_num' appears twice"):
        load_distill_config(cfg)


@pytest.mark.parametrize("content, match", [
    (None, "does not exist"),
    ("{", "is not valid JSON"),
    ("[1, 2]", "must be one JSON object"),
])
def test_an_unreadable_file_is_named(tmp_path, content, match):
    path = tmp_path / "c.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=f"distill config '{path}'.*{match}"):
        load_distill_config(path)


def test_an_error_crosses_a_process_boundary_whole(setup):
    teacher, _, cfg, _ = setup
    edited(cfg, lambda c: c.update({"batch_num": 0}))
    with pytest.raises(ConfigKeyError) as e:
        load_distill_config(cfg, teacher)
    back = pickle.loads(pickle.dumps(e.value))
    assert (type(back), str(back), back.key) == (ConfigKeyError, str(e.value), ("batch_num",))


def test_a_config_built_in_python_is_checked_as_the_file_is():
    with pytest.raises(ConfigKeyError, match="clip_min' is missing") as e:
        DistillDataConfig(clip_max=4.0)
    assert e.value.key == ("clip_min",)


# ---- the student and the simple config -------------------------------------------------------


def test_calibrate_refuses_a_student_made_from_another_config(setup, tmp_path):
    teacher, data, cfg, student = setup
    other, _ = make_student(tmp_path, teacher, data[0][0], name="other.json", simple='quant_skip_layers: "fc"\n')
    with pytest.raises(DistillError, match=r"does not enable: \['fc'\]"):
        calibrate_distill_model(copy.deepcopy(student), other, data, model=teacher)


def test_the_simple_config_checks_a_shared_value_by_the_json_configs_rule(setup, tmp_path):
    teacher, data, cfg, _ = setup
    edited(cfg, lambda c: c["conv1"]["distill_data_config"].update({"dst_type": "INT4"}))
    with pytest.raises(ConfigKeyError) as json_error:
        load_distill_config(cfg, teacher)
    simple = tmp_path / "simple.cfg"
    simple.write_text('distill_data_quant_config { ulq_quantize { dst_type: "INT4" } }\n')
    with pytest.raises(ConfigError) as simple_error:
        amct_core.create_distill_config(tmp_path / "new.json", teacher, data[0][0], config_defination=str(simple))
    assert str(simple_error.value).endswith(json_error.value.problem)
    assert "config_defination key distill_data_quant_config.ulq_quantize.dst_type" in str(simple_error.value)
