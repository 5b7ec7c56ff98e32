"""create_distill_config: the default distill config of a model, the simple config's overrides applied.

Every Conv2d / Linear that can be quantized (``layers.py``) and that the forward pass on ``input_data``
calls exactly once is enabled, one distill group per unit (the layer and the BN / activation modules
that directly consume its output, ``groups.py``); every other such layer gets an entry with
``quant_enable: false`` and its ``skip_reason``.
"""
from __future__ import annotations

from typing import Any

import torch.nn as nn

from .._modes import as_input_tuple
from ..errors import ConfigError
from .config import DistillConfig, DistillDataConfig, DistillWeightConfig, LayerConfig, write_distill_config
from .groups import build_units, trace_calls
from .layers import channel_wise, quantizable_layers
from .model import check_float_model
from .simple_config import apply_simple_config


def default_config(model: nn.Module, input_data: Any) -> DistillConfig:
    """The config ``create_distill_config`` writes without a simple config (one forward on ``input_data``)."""
    inputs = as_input_tuple(input_data)
    quant, skipped = quantizable_layers(model)
    calls = trace_calls(model, inputs)
    counts: dict[str, int] = {}
    for name, _ins, _out in calls:
        counts[name] = counts.get(name, 0) + 1
    quant_set = set(quant)
    executed = [n for n in dict.fromkeys(name for name, _i, _o in calls) if n in quant_set]
    # A layer called several times would need one range and one exported node per call: not quantized.
    for n in [n for n in executed if counts[n] > 1]:
        executed.remove(n)
        skipped[n] = f"called {counts[n]} times by forward(); a quantized layer must run once per forward"
    mods = dict(model.named_modules())
    layers = {n: LayerConfig(quant_enable=True, distill_data_config=DistillDataConfig(),
                             distill_weight_config=DistillWeightConfig(channel_wise=channel_wise(mods[n])))
              for n in executed}
    for n in quant:
        if n not in executed:
            layers[n] = LayerConfig(quant_enable=False, skip_reason="not called by forward() on input_data")
    for n, why in skipped.items():
        layers[n] = LayerConfig(quant_enable=False, skip_reason=why)
    if not executed:
        reasons = {n: layer.skip_reason for n, layer in layers.items()}
        raise ConfigError("model has no layer to quantize: "
                          + (f"no Conv2d or Linear qualifies ({reasons})" if reasons else "it holds no Conv2d or Linear"))
    # One group per quantizable layer with the BN / activation modules that consume its output.
    return DistillConfig(layers=layers, distill_group=build_units(model, calls, executed))


def create_distill_config(config_file, model, input_data, config_defination=None) -> None:
    """Write the JSON distill config for ``model`` to ``config_file``.

    Every Conv2d (padding_mode 'zeros') and Linear that the forward pass on ``input_data`` calls is
    enabled; the others are listed with ``quant_enable: false`` and a ``skip_reason``.
    ``config_defination`` is an optional simple config (protobuf text) of overrides. Nothing is
    written when the model or the simple config is refused.
    """
    check_float_model(model)
    config = default_config(model, input_data)
    if config_defination is not None:
        config = apply_simple_config(config, config_defination, model)
    config.validate(model)
    write_distill_config(config_file, config)
