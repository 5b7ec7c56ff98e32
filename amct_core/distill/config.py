"""The distill config (JSON): which layers are quantized, which are skipped and why.

Layout (AMCT's family)::

    {
      "version": 1,
      "batch_num": 1,
      "group_size": 1,
      "data_dump": false,
      "distill_group": [["conv1", "fc"], ...],
      "<layer name>": {
        "quant_enable": true,
        "distill_data_config": {"algo": "ulq_quantize", "dst_type": "INT8"},
        "distill_weight_config": {"algo": "arq_distill", "channel_wise": true, "dst_type": "INT8"}
      },
      "<skipped layer>": {"quant_enable": false, "skip_reason": "weight shared with 'emb'"}
    }
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .._io import atomic_write_bytes
from ..errors import ConfigError
from ..quant.modules import is_quant_module
from .groups import build_units, trace_calls
from .layers import quantizable_layers, unsupported_reason

CONFIG_VERSION = 1
TOP_LEVEL_KEYS = ("version", "batch_num", "group_size", "data_dump", "distill_group", "target")
LAYER_KEYS = ("quant_enable", "distill_data_config", "distill_weight_config", "skip_reason")


def as_input_tuple(input_data: Any, what: str = "input_data") -> tuple:
    """A single tensor becomes a 1-tuple (seed API); a list/tuple of tensors is kept; anything else is refused."""
    if isinstance(input_data, torch.Tensor):
        return (input_data,)
    if isinstance(input_data, (tuple, list)) and input_data and all(isinstance(t, torch.Tensor) for t in input_data):
        return tuple(input_data)
    raise ConfigError(
        f"{what} must be a torch.Tensor or a non-empty tuple of torch.Tensor, got {type(input_data).__name__}"
        + (f" of {[type(t).__name__ for t in input_data]}" if isinstance(input_data, (tuple, list)) else "")
    )


def _layer_entry(module: nn.Module) -> dict:
    return {
        "quant_enable": True,
        "distill_data_config": {"algo": "ulq_quantize", "dst_type": "INT8"},
        "distill_weight_config": {
            "algo": "arq_distill",
            "channel_wise": isinstance(module, nn.Conv2d),
            "dst_type": "INT8",
        },
    }


def build_distill_config(model: nn.Module, input_data: Any) -> dict:
    inputs = as_input_tuple(input_data)
    quant, skipped = quantizable_layers(model)
    calls = trace_calls(model, inputs)  # the one forward pass config creation needs
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
    cfg: dict[str, Any] = {
        "version": CONFIG_VERSION,
        "batch_num": 1,
        "group_size": 1,
        "data_dump": False,
        # One group per quantizable layer with the BN / activation modules that consume its output.
        "distill_group": build_units(model, calls, executed),
    }
    for n in executed:
        cfg[n] = _layer_entry(mods[n])
    for n in quant:
        if n not in executed:
            cfg[n] = {"quant_enable": False, "skip_reason": "not called by forward() on input_data"}
    for n, why in skipped.items():
        cfg[n] = {"quant_enable": False, "skip_reason": why}
    return cfg


def create_distill_config(config_file, model, input_data, config_defination=None) -> None:
    """Write the JSON distill config for ``model`` to ``config_file``.

    Every Conv2d (padding_mode 'zeros') and Linear that the forward pass on ``input_data`` calls is
    enabled; the others are listed with ``quant_enable: false`` and a ``skip_reason``.
    ``config_defination`` is an optional simple config (protobuf text) of overrides.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if any(is_quant_module(m) for m in model.modules()):
        raise ConfigError("model already holds quantized layers; pass the float model")
    cfg = build_distill_config(model, input_data)
    if config_defination is not None:
        from .simple_config import apply_simple_config  # issue 3: overrides

        cfg = apply_simple_config(cfg, config_defination, model)
    validate_distill_config(cfg, model)
    path = Path(config_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(cfg, indent=2) + "\n").encode())


def load_distill_config(config_file) -> dict:
    path = Path(config_file)
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"distill config {str(path)!r} does not exist") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"distill config {str(path)!r} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"distill config {str(path)!r} must hold a JSON object")
    return cfg


def enabled_layers(cfg: dict) -> list[str]:
    return [k for k, v in cfg.items() if k not in TOP_LEVEL_KEYS and isinstance(v, dict) and v.get("quant_enable")]


def validate_distill_config(cfg: dict, model: nn.Module) -> None:
    """Check keys, types and values; each error names the key."""
    mods = dict(model.named_modules())
    for key in ("version", "batch_num", "group_size"):
        if key in cfg and (isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] < 1):
            raise ConfigError(f"config key {key!r} must be a positive int, got {cfg[key]!r}")
    if "data_dump" in cfg and not isinstance(cfg["data_dump"], bool):
        raise ConfigError(f"config key 'data_dump' must be true or false, got {cfg['data_dump']!r}")
    if "target" in cfg:
        from ..targets import get_target

        get_target(cfg["target"])
    groups = cfg.get("distill_group", [])
    if not isinstance(groups, list) or not all(isinstance(g, list) and all(isinstance(n, str) for n in g) for g in groups):
        raise ConfigError("config key 'distill_group' must be a list of lists of layer names")
    for key, val in cfg.items():
        if key in TOP_LEVEL_KEYS:
            continue
        if key not in mods:
            raise ConfigError(f"config key {key!r} is not a top-level key {list(TOP_LEVEL_KEYS)} nor a layer of the model")
        if not isinstance(val, dict):
            raise ConfigError(f"config entry {key!r} must be an object, got {type(val).__name__}")
        for sub in val:
            if sub not in LAYER_KEYS:
                raise ConfigError(f"config key {key}.{sub} is unknown; expected one of {list(LAYER_KEYS)}")
        if not isinstance(val.get("quant_enable", False), bool):
            raise ConfigError(f"config key {key}.quant_enable must be true or false")
        if val.get("quant_enable"):
            reason = unsupported_reason(mods[key])
            if reason is not None:
                raise ConfigError(f"config key {key!r}: layer of type {type(mods[key]).__name__} cannot be quantized: {reason}")
            for sub in ("distill_data_config", "distill_weight_config"):
                if not isinstance(val.get(sub, {}), dict):
                    raise ConfigError(f"config key {key}.{sub} must be an object, got {type(val[sub]).__name__}")
                dst = val.get(sub, {}).get("dst_type", "INT8")
                if dst != "INT8":
                    raise ConfigError(f"config key {key}.{sub}.dst_type must be 'INT8', got {dst!r}")
            cw = val.get("distill_weight_config", {}).get("channel_wise")
            if cw is not None and cw != isinstance(mods[key], nn.Conv2d):
                raise ConfigError(
                    f"config key {key}.distill_weight_config.channel_wise must be "
                    f"{str(isinstance(mods[key], nn.Conv2d)).lower()} for {type(mods[key]).__name__}"
                )
    for g in groups:
        for n in g:
            if n not in mods:
                raise ConfigError(f"config key 'distill_group' names {n!r}, which is not a layer of the model")
