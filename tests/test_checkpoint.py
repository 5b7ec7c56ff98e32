"""amct_core.checkpoint: the distilled model from its callable, its distill config and its state_dict file."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from amct_core.checkpoint import LoadError, load_distilled_model, read_state_dict, resolve_callable
from amct_core.quant.modules import is_quant_module
from tests import models


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    """The test MLP distilled (wrapped and calibrated), its distill config and its state_dict in both formats."""
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("mlp")
    qat = models.make_qat("mlp", d)
    sd = qat.state_dict()
    torch.save(sd, d / "mlp.pt")
    save_file(dict(sd), str(d / "mlp.safetensors"))
    return qat, d / "mlp_distill_config.json", d


def _load(path, cfg, **kw):
    return load_distilled_model("tests.models:build", path, cfg, model_kwargs={"name": "mlp"}, **kw)


# ---- reading checkpoints -------------------------------------------------------------------------

def test_state_dict_from_torch_save_and_nested_dicts(tmp_path):
    sd = {"a.weight": torch.ones(2)}
    torch.save(sd, tmp_path / "plain.pt")
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "nested.pt")
    assert list(read_state_dict(tmp_path / "plain.pt")) == ["a.weight"]
    assert list(read_state_dict(tmp_path / "nested.pt")) == ["a.weight"]


def test_safetensors_is_recognised_by_its_layout_whatever_the_suffix(tmp_path):
    from safetensors.torch import save_file

    save_file({"a.weight": torch.ones(3)}, str(tmp_path / "w.bin"))
    assert torch.equal(read_state_dict(tmp_path / "w.bin")["a.weight"], torch.ones(3))


def test_pickled_code_in_a_checkpoint_is_never_executed(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"w": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(LoadError, match="weights_only=True") as e:
        read_state_dict(tmp_path / "evil.pt")
    assert e.value.what == "checkpoint" and "evil.pt" in str(e.value)
    assert not marker.exists()


def test_whole_module_pickle_is_refused(tmp_path):
    torch.save(nn.Linear(2, 2), tmp_path / "module.pt")
    with pytest.raises(LoadError) as e:
        read_state_dict(tmp_path / "module.pt")
    assert e.value.what == "checkpoint"


def test_a_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(LoadError, match="nope.pt.*does not exist") as e:
        read_state_dict(tmp_path / "nope.pt")
    assert e.value.what == "checkpoint"



def _safetensors_bytes() -> bytes:
    from safetensors.torch import save

    return save({"a.weight": torch.arange(6, dtype=torch.float32)})


@pytest.mark.parametrize("make, words", [
    (lambda: _safetensors_bytes()[:-5], "not a readable safetensors file"),
    (lambda: b"", "holds 0 bytes, too few for a safetensors file"),
    (lambda: b"\x00garbage, not a checkpoint" * 4, "header length says"),
    (lambda: (2**63).to_bytes(8, "little") + b'{"a": 1}', "header length says 9223372036854775808 bytes, but only 8 follow"),
    (lambda: _safetensors_bytes()[:20], "header length says"),
    (lambda: b"{}" + _safetensors_bytes(), "header length says"),
], ids=["truncated", "empty", "garbage", "absurd-header-length", "cut-in-the-header", "shifted"])
def test_a_malformed_safetensors_checkpoint_is_a_load_error_naming_the_file(tmp_path, make, words):
    f = tmp_path / "student.safetensors"
    f.write_bytes(make())
    with pytest.raises(LoadError) as e:
        read_state_dict(f)
    assert e.value.what == "checkpoint"
    assert str(e.value).startswith(f"checkpoint {str(f)!r}") and words in str(e.value), str(e.value)


def test_a_torch_save_file_named_safetensors_is_refused_naming_both_formats(tmp_path):
    f = tmp_path / "student.safetensors"
    torch.save({"a.weight": torch.ones(2)}, f)
    with pytest.raises(LoadError, match=r"student.safetensors' is named .safetensors but holds a torch.save file") as e:
        read_state_dict(f)
    assert e.value.what == "checkpoint"


def test_a_directory_given_as_the_checkpoint_is_named(tmp_path):
    with pytest.raises(LoadError, match=rf"checkpoint '{tmp_path}' does not exist or is not a file") as e:
        read_state_dict(tmp_path)
    assert e.value.what == "checkpoint"


def test_a_load_error_survives_pickling_with_its_parameter_and_message():
    import pickle

    e = pickle.loads(pickle.dumps(LoadError("checkpoint", "checkpoint 'x.pt' is cut short")))
    assert type(e) is LoadError and e.what == "checkpoint" and str(e) == "checkpoint 'x.pt' is cut short"


# ---- the model -------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_the_loaded_model_computes_what_the_distilled_one_does(mlp, fmt):
    qat, cfg, d = mlp
    model = _load(d / f"mlp.{fmt}", cfg)
    assert not model.training
    assert [n for n, m in model.named_modules() if is_quant_module(m)] == \
        [n for n, m in qat.named_modules() if is_quant_module(m)]
    for k, v in qat.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    x = torch.randn(4, 20)
    assert torch.equal(model(x), qat(x))


def _mapped_files() -> list[tuple[int, int, str]]:
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6:
                lo, hi = (int(a, 16) for a in parts[0].split("-"))
                out.append((lo, hi, parts[5].strip()))
    return out


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc")
@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_the_parameters_are_the_checkpoint_file_mapped_not_a_copy(mlp, fmt):
    _, cfg, d = mlp
    path = str((d / f"mlp.{fmt}").resolve())
    model = _load(path, cfg)
    maps = [(lo, hi) for lo, hi, name in _mapped_files() if name == path]
    assert maps, "the checkpoint is not memory-mapped"
    for name, p in model.named_parameters():
        if p.numel() > 1:
            assert any(lo <= p.data_ptr() < hi for lo, hi in maps), f"{name} was copied out of the checkpoint"


def test_data_parallel_module_prefixes_are_stripped(mlp, tmp_path):
    qat, cfg, _ = mlp
    torch.save({f"module.{k}": v for k, v in qat.state_dict().items()}, tmp_path / "ddp.pt")
    model = _load(tmp_path / "ddp.pt", cfg)
    x = torch.randn(3, 20)
    assert torch.equal(model(x), qat(x))


def test_a_float_checkpoint_is_reported_with_the_missing_range_keys(mlp, tmp_path):
    _, cfg, _ = mlp
    torch.save(models.build("mlp").state_dict(), tmp_path / "float.pt")
    with pytest.raises(LoadError) as e:
        _load(tmp_path / "float.pt", cfg)
    msg = str(e.value)
    assert e.value.what == "checkpoint"
    assert "missing keys" in msg and "fc1.clip_min" in msg and "float model" in msg and "float.pt" in msg


def test_missing_unexpected_and_misshapen_keys_are_named_together(mlp, tmp_path):
    qat, cfg, _ = mlp
    sd = dict(qat.state_dict())
    sd["fc1.weight"] = torch.zeros(3, 3)
    sd["head.weight"] = torch.zeros(1)
    del sd["fc2.clip_max"]
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(LoadError) as e:
        _load(tmp_path / "bad.pt", cfg)
    msg = str(e.value)
    assert "missing keys ['fc2.clip_max']" in msg and "unexpected keys ['head.weight']" in msg
    assert "fc1.weight (3, 3) (model: (64, 20))" in msg


def test_a_checkpoint_in_another_dtype_keeps_the_models_dtype(mlp, tmp_path):
    qat, cfg, _ = mlp
    torch.save({k: v.double() if v.is_floating_point() else v for k, v in qat.state_dict().items()}, tmp_path / "f64.pt")
    model = _load(tmp_path / "f64.pt", cfg)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    x = torch.randn(2, 20)
    assert torch.equal(model(x), qat(x))


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight  # tied: not quantized (shared weight)

    def forward(self, ids):
        return self.head(torch.relu(self.fc(self.emb(ids))))


def test_tied_weights_stay_tied_and_may_be_stored_once(tmp_path):
    from safetensors.torch import save_model

    from amct_core import create_distill_config, create_distill_model

    ids = torch.randint(0, 10, (2, 5))
    create_distill_config(str(tmp_path / "cfg.json"), _Tied(), ids)
    qat = create_distill_model(str(tmp_path / "cfg.json"), _Tied(), ids).eval()
    save_model(qat, str(tmp_path / "tied.safetensors"))  # keeps one of the two tied names
    model = load_distilled_model(_Tied, tmp_path / "tied.safetensors", tmp_path / "cfg.json")
    assert model.head.weight is model.emb.weight
    assert torch.equal(model(ids), qat(ids))


def test_without_a_distill_config_the_default_one_is_built_and_no_file_is_written(mlp, tmp_path, monkeypatch):
    from amct_core import create_distill_config, create_distill_model

    x = models.example_inputs("mlp")
    create_distill_config(str(tmp_path / "default.json"), models.build("mlp"), x)
    qat = create_distill_model(str(tmp_path / "default.json"), models.build("mlp"), x).eval()
    torch.save(qat.state_dict(), tmp_path / "d.pt")
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))
    model = load_distilled_model("tests.models:build", tmp_path / "d.pt", None, (x,), model_kwargs={"name": "mlp"})
    assert os.listdir(private_tmp) == []
    assert torch.equal(model(x), qat(x))
    with pytest.raises(LoadError, match="no distill config") as e:
        load_distilled_model("tests.models:build", tmp_path / "d.pt", None, model_kwargs={"name": "mlp"})
    assert e.value.what == "distill_config"


def test_a_model_that_is_already_wrapped_is_only_loaded(mlp):
    qat, cfg, d = mlp
    wrapped = models.make_qat("mlp", d)  # other calibration: the checkpoint's ranges must win
    model = load_distilled_model(wrapped, d / "mlp.pt")
    x = torch.randn(2, 20)
    assert torch.equal(model(x), qat(x))
    with pytest.raises(LoadError, match="already holds quantized layers") as e:
        load_distilled_model(models.make_qat("mlp", d), d / "mlp.pt", cfg)
    assert e.value.what == "distill_config"


def test_a_bad_distill_config_is_blamed_on_the_distill_config(mlp, tmp_path):
    _, _, d = mlp
    (tmp_path / "bad.json").write_text('{"fc1": {"quant_enable": "yes"}}')
    with pytest.raises(LoadError, match="bad.json.*fc1.quant_enable") as e:
        _load(d / "mlp.pt", tmp_path / "bad.json")
    assert e.value.what == "distill_config"


def test_a_bad_distill_config_names_its_file_once(mlp, tmp_path):
    _, _, d = mlp
    (tmp_path / "bad.json").write_text('{"batch_num": 0}')
    with pytest.raises(LoadError) as e:
        _load(d / "mlp.pt", tmp_path / "bad.json")
    assert str(e.value).count("bad.json") == 1, str(e.value)


def test_a_failing_model_callable_is_blamed_on_its_arguments(mlp):
    _, cfg, d = mlp
    with pytest.raises(LoadError, match="nam") as e:
        load_distilled_model("tests.models:build", d / "mlp.pt", cfg, model_kwargs={"nam": "mlp"})
    assert e.value.what == "model_kwargs"


@pytest.mark.parametrize("ref, words", [
    ("nope_pkg.mod:fn", ["does not import", "nope_pkg"]),
    ("tests.models:missing", ["no attribute", "missing"]),
    ("tests.models", ["package.module:callable"]),
    ("tests.models:MODELS", ["not callable"]),
    ("/no/such/file.py:fn", ["does not exist"]),
])
def test_model_references_that_do_not_resolve_are_named(ref, words):
    with pytest.raises(LoadError) as e:
        resolve_callable(ref)
    assert e.value.what == "model"
    for w in words:
        assert w in str(e.value)


def test_a_model_reference_may_be_a_file(tmp_path):
    f = tmp_path / "my_net.py"
    f.write_text("import torch\ndef make():\n    return torch.nn.Linear(2, 2)\n")
    assert isinstance(resolve_callable(f"{f}:make")(), nn.Linear)
