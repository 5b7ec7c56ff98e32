"""create_distill_model: wrap the enabled layers of a copy of the model in QAT modules."""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn

from .._modes import eval_mode
from ..errors import ConfigError
from ..quant.modules import QuantConv2d, QuantLinear, is_quant_module
from .config import as_input_tuple, enabled_layers, load_distill_config, validate_distill_config


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def wrap_layer(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.Conv2d):
        return QuantConv2d(module)
    if isinstance(module, nn.Linear):
        return QuantLinear(module)
    raise ConfigError(f"cannot quantize a {type(module).__name__}")


def wrap_layers(model: nn.Module, cfg: dict, source: str = "the distill config") -> nn.Module:
    """Wrap, in place, every layer a (validated) distill config enables; returns ``model``. The QAT
    modules take over the layers' own weight and bias parameters (no copy)."""
    names = enabled_layers(cfg)
    if not names:
        raise ConfigError(f"distill config {source} enables no layer (no 'quant_enable': true)")
    for name in names:
        _set_submodule(model, name, wrap_layer(model.get_submodule(name)))
    if "target" in cfg:
        model.amct_target = cfg["target"]
    return model


@torch.no_grad()
def calibrate(model: nn.Module, batches, max_batches: int | None = None) -> int:
    """Widen every QAT layer's activation range over ``batches`` (iterable of input tuples). Returns the count.

    Runs in eval mode under no_grad; the model's train/eval flags are restored afterwards.
    """
    qmods = [m for m in model.modules() if is_quant_module(m)]
    n = 0
    with eval_mode(model):
        try:
            for m in qmods:
                m.calibrating = True
            for batch in batches:
                if max_batches is not None and n >= max_batches:
                    break
                model(*as_input_tuple(batch, "calibration batch"))
                n += 1
        finally:
            for m in qmods:
                m.calibrating = False
    return n


def create_distill_model(config_file, model, input_data) -> nn.Module:
    """Return a new model in which every layer the config enables is a QAT module.

    The user's ``model`` is not modified. The activation ranges are initialised by one calibration
    pass over ``input_data``, so the result can be exported at once or trained by :func:`distill`.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    cfg = load_distill_config(config_file)
    validate_distill_config(cfg, model)
    inputs = as_input_tuple(input_data)
    student = wrap_layers(copy.deepcopy(model), cfg, source=repr(str(config_file)))
    try:
        calibrate(student, [inputs])
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"calibration forward failed on input_data {[tuple(t.shape) for t in inputs]}: {e}") from e
    return student
