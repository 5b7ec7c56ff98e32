"""create_distill_config: structure-based distill groups and the simple config (config_defination)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import amct_core
from amct_core.errors import ConfigError


class Net(nn.Module):
    """nn.ReLU module after conv1/bn1, F.relu after conv2/bn2, a ReLU6 module after conv3, two Linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.act3 = nn.ReLU6()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        x = self.act1(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = self.act3(self.conv3(x)).mean((2, 3))
        return self.fc2(F.relu(self.fc1(x)))


X = torch.randn(2, 3, 8, 8)


def write(tmp_path, simple: str | None):
    torch.manual_seed(0)
    model = Net().eval()
    cfg = tmp_path / "cfg.json"
    defin = None
    if simple is not None:
        defin = tmp_path / "simple.cfg"
        defin.write_text(simple)
    amct_core.create_distill_config(str(cfg), model, X, config_defination=None if defin is None else str(defin))
    return json.loads(cfg.read_text())


def test_default_groups_follow_the_model_structure(tmp_path):
    c = write(tmp_path, None)
    assert c["distill_group"] == [["conv1", "bn1", "act1"], ["conv2", "bn2"], ["conv3", "act3"], ["fc1"], ["fc2"]]
    assert c["conv1"]["distill_weight_config"]["channel_wise"] is True
    assert c["fc1"]["distill_weight_config"]["channel_wise"] is False
    assert c["fc1"]["distill_data_config"]["dst_type"] == "INT8"
    assert {c["batch_num"], c["group_size"]} == {1}


def test_group_size_merges_consecutive_units(tmp_path):
    c = write(tmp_path, "group_size: 2\nbatch_num: 3\n")
    assert c["distill_group"] == [["conv1", "bn1", "act1", "conv2", "bn2"], ["conv3", "act3", "fc1"], ["fc2"]]
    assert c["batch_num"] == 3 and c["group_size"] == 2


def test_explicit_groups_and_remaining_units(tmp_path):
    c = write(tmp_path, 'distill_group { start_layer_name: "conv2" end_layer_name: "act3" }\n')
    assert c["distill_group"] == [["conv1", "bn1", "act1"], ["conv2", "bn2", "conv3", "act3"], ["fc1"], ["fc2"]]


def test_skip_by_name_and_by_type(tmp_path):
    c = write(tmp_path, 'quant_skip_layers: "conv3"\nquant_skip_layer_types: "Linear"\n')
    assert c["conv3"]["quant_enable"] is False and "quant_skip_layers" in c["conv3"]["skip_reason"]
    assert c["fc1"]["quant_enable"] is False and c["fc2"]["quant_enable"] is False
    assert c["conv1"]["quant_enable"] is True


def test_overrides_by_type_then_by_name(tmp_path):
    c = write(tmp_path, """
distill_override_layer_types { layer_type: "Conv2d" distill_data_quant_config { ulq_quantize { fixed_min: false } } }
distill_override_layers {
  layer_name: "conv2"
  distill_data_quant_config { ulq_quantize { fixed_min: true clip_max_min { clip_max: 4.0 clip_min: 0.0 } } }
}
""")
    assert c["conv1"]["distill_data_config"]["fixed_min"] is False
    assert c["conv2"]["distill_data_config"]["fixed_min"] is True
    assert c["conv2"]["distill_data_config"]["clip_max"] == 4.0
    assert "fixed_min" not in c["fc1"]["distill_data_config"]


def with_initial_range(tmp_path):
    """(model, config file, student): the config gives fc2 the initial range [-1, 9]."""
    torch.manual_seed(0)
    model = Net().eval()
    (tmp_path / "s.cfg").write_text(
        'distill_override_layers { layer_name: "fc2" '
        'distill_data_quant_config { ulq_quantize { clip_max_min { clip_max: 9.0 clip_min: -1.0 } } } }\n')
    cfg = str(tmp_path / "c.json")
    amct_core.create_distill_config(cfg, model, X, config_defination=str(tmp_path / "s.cfg"))
    return model, cfg, amct_core.create_distill_model(cfg, model, X)


def test_initial_range_from_the_config_is_where_create_distill_model_starts(tmp_path):
    model, _, student = with_initial_range(tmp_path)
    assert (student.fc2.clip_min.item(), student.fc2.clip_max.item()) == (-1.0, 9.0)
    amct_core.create_distill_config(str(tmp_path / "plain.json"), model, X)
    plain = amct_core.create_distill_model(str(tmp_path / "plain.json"), model, X)
    assert torch.equal(student.fc1.clip_max, plain.fc1.clip_max)  # the other layers: their calibrated ranges


def test_initial_range_from_the_config_is_used_by_distill(tmp_path):
    model, cfg, student = with_initial_range(tmp_path)
    amct_core.distill(model, student, cfg, [X, X], epochs=1, lr=1e-12)
    assert float(student.fc2.clip_max.detach()) == pytest.approx(9.0, rel=1e-6)
    assert float(student.fc2.clip_min.detach()) == pytest.approx(-1.0, rel=1e-6)


@pytest.mark.parametrize("text, match", [
    ("batch_numm: 2\n", "batch_numm"),
    ("batch_num: 0\n", "'batch_num'"),
    ("group_size: 0\n", "'group_size'"),
    ("batch_num: -1\n", "batch_num"),
    ('quant_skip_layers: "conv9"\n', "quant_skip_layers.*'conv9'"),
    ('quant_skip_layers: "bn1"\n', "quant_skip_layers.*'bn1'.*BatchNorm2d"),
    ('quant_skip_layer_types: "Conv3d"\n', "quant_skip_layer_types.*'Conv3d'"),
    ('distill_override_layers { layer_name: "nope" }\n', r"distill_override_layers\[0\].layer_name.*'nope'"),
    ('distill_override_layer_types { layer_type: "LSTM" }\n', r"distill_override_layer_types\[0\].layer_type.*'LSTM'"),
    ('distill_override_layers { layer_name: "fc1" distill_weight_quant_config { arq_distill { channel_wise: true } } }\n',
     r"distill_override_layers\[0\].distill_weight_quant_config.arq_distill.channel_wise.*'fc1'"),
    ('distill_data_quant_config { ulq_quantize { dst_type: "INT4" } }\n', "ulq_quantize.dst_type.*INT8"),
    ('distill_override_layers { layer_name: "conv1" distill_data_quant_config { ulq_quantize { clip_max_min '
     '{ clip_max: -1.0 clip_min: 0.0 } } } }\n', r"distill_override_layers\[0\].*clip_max_min"),
    ('distill_group { start_layer_name: "fc1" end_layer_name: "conv1" }\n', r"distill_group\[0\].*runs after"),
    ('distill_group { start_layer_name: "conv1" end_layer_name: "ghost" }\n', r"distill_group\[0\].end_layer_name.*'ghost'"),
    ('distill_group { start_layer_name: "conv1" }\n', "end_layer_name"),
    ('distill_group { start_layer_name: "conv1" end_layer_name: "conv2" }\n'
     'distill_group { start_layer_name: "bn2" end_layer_name: "fc1" }\n', r"distill_group\[1\] overlaps"),
    ("data_dump: true\n", "data_dump"),
    ('quant_skip_layer_types: "Conv2d"\nquant_skip_layer_types: "Linear"\n', "skips every quantizable layer"),
    ("batch_num: 2\nbatch_num: 3\n", "batch_num"),
])
def test_simple_config_errors_name_the_key(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        write(tmp_path, text)
    assert not (tmp_path / "cfg.json").exists()  # nothing written


def test_missing_simple_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        amct_core.create_distill_config(str(tmp_path / "c.json"), Net().eval(), X,
                                        config_defination=str(tmp_path / "absent.cfg"))


@pytest.mark.skipif(shutil.which("protoc") is None and not __import__("importlib").util.find_spec("grpc_tools"),
                    reason="needs protoc or grpcio-tools")
def test_python_descriptor_matches_the_proto_file(tmp_path):
    from google.protobuf import descriptor_pb2

    from amct_core.distill import simple_config

    proto = simple_config.__file__.replace(".py", ".proto")
    import os

    root = os.path.dirname(os.path.dirname(os.path.dirname(proto)))
    out = tmp_path / "fds.pb"
    cmd = [sys.executable, "-m", "grpc_tools.protoc", f"-I{root}", f"--descriptor_set_out={out}",
           os.path.relpath(proto, root)]
    subprocess.run(cmd, check=True, capture_output=True)
    fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    compiled = fds.file[0]
    built = simple_config.file_descriptor_proto()
    assert compiled.package == built.package

    def shape(fdp):
        return {m.name: [(f.name, f.number, f.label, f.type, f.type_name) for f in m.field] for m in fdp.message_type}

    assert shape(compiled) == shape(built)
