"""Models the flow has not been tuned on: two inputs, integer (token id) inputs, a model defined in a file."""
from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.integration

MODEL_SRC = textwrap.dedent('''
    import torch
    import torch.nn as nn


    class TwoInputs(nn.Module):
        def __init__(self, d=16):
            super().__init__()
            self.a = nn.Linear(d, 8)
            self.b = nn.Linear(d, 8)
            self.head = nn.Linear(8, 3)

        def forward(self, x, y):
            return self.head(torch.relu(self.a(x)) + torch.relu(self.b(y)))


    class Tokens(nn.Module):
        def __init__(self, vocab=10, d=16):
            super().__init__()
            self.emb = nn.Embedding(vocab, d)
            self.proj = nn.Linear(d, d)
            self.out = nn.Linear(d, 4)

        def forward(self, ids):
            return self.out(torch.relu(self.proj(self.emb(ids)))).mean(1)


    def build(kind, **kw):
        torch.manual_seed(0)
        return {"two": TwoInputs, "tokens": Tokens}[kind](**kw).eval()
''')


def _distilled(tmp_path, kind, inputs):
    import importlib.util

    from amct_core import create_distill_config, create_distill_model

    src = tmp_path / "user_models.py"
    src.write_text(MODEL_SRC)
    spec = importlib.util.spec_from_file_location("user_models_for_test", src)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model = mod.build(kind)
    cfg = tmp_path / f"{kind}_config.json"
    create_distill_config(str(cfg), model, inputs)
    qat = create_distill_model(str(cfg), model, inputs)
    ck = tmp_path / f"{kind}.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in qat.state_dict().items()}, str(ck))
    return str(src), str(cfg), str(ck)


def test_two_input_model(prefect_api, tmp_path):
    from flows.distill_export import distill_export

    g = torch.Generator().manual_seed(1)
    xs = (torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g))
    src, cfg, ck = _distilled(tmp_path, "two", xs)
    state = distill_export(
        checkpoint=ck, model=f"{src}:build", model_kwargs={"kind": "two"}, distill_config=cfg,
        input_shape=[[1, 16], [1, 16]], input_names=["x", "y"], output_names=["out"],
        dynamic_axes={"x": [0], "y": [0], "out": [0]}, output_dir=str(tmp_path / "out"), name="two",
        mlflow_tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", return_state=True)
    assert state.is_completed(), state.message
    s = state.result()
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert '--input_shape="x:1,16;y:1,16"' in manifest["atc_command"]
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    m = mlflow.pyfunc.load_model(s["mlflow_model_uri"])
    pred = m.predict({"x": np.ones((2, 16), np.float32), "y": np.zeros((2, 16), np.float32)})
    y = pred["out"] if isinstance(pred, dict) else np.asarray(pred)
    assert np.asarray(y).shape == (2, 3)


def test_integer_token_input(prefect_api, tmp_path):
    from flows.distill_export import distill_export

    ids = torch.randint(0, 10, (4, 5), generator=torch.Generator().manual_seed(2))
    src, cfg, ck = _distilled(tmp_path, "tokens", ids)
    state = distill_export(
        checkpoint=ck, model=f"{src}:build", model_kwargs={"kind": "tokens"}, distill_config=cfg,
        input_shape=[1, 5], input_dtype="int64", input_names=["ids"], output_names=["logits"],
        output_dir=str(tmp_path / "out"), name="tok", target="950", opset=13,
        mlflow_tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", return_state=True)
    assert state.is_completed(), state.message
    assert state.result()["parity_passed"]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["inputs"] == [{"shape": [1, 5], "dtype": "int64"}]


def test_input_names_must_match_the_number_of_inputs(prefect_api, tmp_path):
    from flows.distill_export import distill_export

    ck = tmp_path / "x.pt"
    torch.save({}, ck)
    state = distill_export(checkpoint=str(ck), model="tests.models:build", model_kwargs={"name": "mlp"},
                           input_shape=[[1, 20], [1, 20]], input_names=["a"], output_dir=str(tmp_path / "o"),
                           return_state=True)
    assert state.is_failed()
    assert "parameter 'input_names'" in str(state.result(raise_on_failure=False))
    state = distill_export(checkpoint=str(ck), model="tests.models:build", model_kwargs={"name": "mlp"},
                           input_shape=[[1, 20], [1, 20]], input_dtype=["float32"], output_dir=str(tmp_path / "o"),
                           return_state=True)
    assert "parameter 'input_dtype'" in str(state.result(raise_on_failure=False))
