"""create_distill_model: wrap the enabled layers of a copy of the model in QAT modules."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .._modes import as_input_tuple, eval_mode
from ..errors import ConfigError, DistillError
from ..quant.modules import QuantConv2d, QuantLinear, is_quant_module, nonfinite_ranges
from .config import DistillConfig, load_distill_config
from .layers import layer_type


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


# The QAT wrapper of each layer type (the config's validate() has checked every enabled layer's type).
_QAT = {"Conv2d": QuantConv2d, "Linear": QuantLinear}


def wrap_layers(model: nn.Module, config: DistillConfig) -> nn.Module:
    """Wrap, in place, every layer ``config`` (validated against ``model``) enables; returns ``model``. The
    QAT modules take over the layers' own weight and bias parameters (no copy)."""
    for name in config.enabled:
        layer = model.get_submodule(name)
        _set_submodule(model, name, _QAT[layer_type(layer)](layer))
    if config.target is not None:
        model.amct_target = config.target
    return model


@torch.no_grad()
def calibrate(model: nn.Module, batches, max_batches: int | None = None) -> int:
    """Widen every QAT layer's activation range over ``batches`` (iterable of input tuples). Returns the count.

    Runs in eval mode under no_grad; the model's train/eval flags are restored afterwards. A layer whose input
    held a NaN or an infinity gets no range: DistillError names it.
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
    refuse_nonfinite_ranges(model)
    return n


def refuse_nonfinite_ranges(student: nn.Module) -> None:
    """A DistillError naming the layers whose measured activation range is NaN or infinite."""
    bad = nonfinite_ranges(student)
    if bad:
        raise DistillError(f"calibration measured a non-finite activation range for layer(s) {bad}: their inputs "
                           "held NaN or infinity on the calibration batches (check the data and the layers before "
                           "them); a quantized model cannot be trained or exported from such a range")


def apply_initial_ranges(cfg: DistillConfig, student: nn.Module) -> list[str]:
    """Layers whose config gives an initial range (``clip_max`` / ``clip_min``) start from it, whatever
    calibration measured. Returns their names."""
    mods = dict(student.named_modules())
    done = []
    with torch.no_grad():
        for n in cfg.enabled:
            d = cfg.layers[n].distill_data_config
            if d.clip_max is not None:
                mods[n].clip_max.fill_(d.clip_max)
                mods[n].clip_min.fill_(d.clip_min)
                mods[n].act_initialized.fill_(True)
                done.append(n)
    return done


def check_float_model(model) -> None:
    """``model`` of create_distill_config and create_distill_model: a torch Module without QAT layers."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if any(is_quant_module(m) for m in model.modules()):
        raise ConfigError("model already holds quantized layers; pass the float model")


def create_distill_model(config_file, model, input_data) -> nn.Module:
    """Return a new model in which every layer the config enables is a QAT module.

    The user's ``model`` is not modified. The activation ranges are initialised by one calibration
    pass over ``input_data`` (a layer whose config gives ``clip_max`` / ``clip_min`` starts from that
    range instead), so the result can be exported at once or trained by :func:`distill`.
    """
    check_float_model(model)
    config = load_distill_config(config_file, model)
    inputs = as_input_tuple(input_data)
    student = wrap_layers(copy.deepcopy(model), config)
    try:
        calibrate(student, [inputs])
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"calibration forward failed on input_data {[tuple(t.shape) for t in inputs]}: {e}") from e
    apply_initial_ranges(config, student)
    return student
