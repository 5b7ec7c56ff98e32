"""The simple distill config (``config_defination``): protobuf text that overrides the defaults.

The schema is ``simple_config.proto`` beside this file; its descriptor is built here in Python (no
generated code, no protoc at run time). :func:`apply_simple_config` parses the file with protobuf's
own ``text_format`` and applies it to the default :class:`~amct_core.distill.config.DistillConfig` that
``create_distill_config`` built:

- ``batch_num``, ``group_size`` (regroups the automatic units), ``data_dump``;
- ``quant_skip_layers`` / ``quant_skip_layer_types``: layers left in float (they stay in their
  distill group and are still trained, in float);
- ``distill_data_quant_config`` / ``distill_weight_quant_config``: defaults for every layer, then
  ``distill_override_layer_types`` (by torch class name, e.g. ``"Conv2d"``), then
  ``distill_override_layers`` (by module name), the most specific winning;
- ``distill_group { start_layer_name end_layer_name }``: explicit blocks, from start to end in
  execution order.

Every error is a :class:`ConfigError` that names the key (and the layer) at fault. A value the JSON
config has too (``batch_num``, ``dst_type``, ``clip_max_min``, ...) is checked by the JSON config's own
rules, in ``config.py``; the error names the key as this file spells it.
"""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch.nn as nn
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format

from ..errors import ConfigError
from .config import ConfigKeyError, DistillConfig, DistillDataConfig, DistillWeightConfig, LayerConfig
from .groups import merge_units
from .layers import QUANT_TYPES, channel_wise, unsupported_reason

PROTO_FILE = "amct_core/distill/simple_config.proto"
PACKAGE = "amct_core.distill"

_F = descriptor_pb2.FieldDescriptorProto
_OPT, _REQ, _REP = _F.LABEL_OPTIONAL, _F.LABEL_REQUIRED, _F.LABEL_REPEATED
# message -> [(field, number, label, type or message name)], in the .proto's order.
SCHEMA: dict[str, list[tuple[str, int, int, Any]]] = {
    "AMCTDistillConfig": [
        ("batch_num", 1, _OPT, _F.TYPE_UINT32),
        ("group_size", 2, _OPT, _F.TYPE_UINT32),
        ("data_dump", 3, _OPT, _F.TYPE_BOOL),
        ("distill_group", 4, _REP, "DistillGroup"),
        ("distill_data_quant_config", 5, _OPT, "DistillDataQuantConfig"),
        ("distill_weight_quant_config", 6, _OPT, "DistillWeightQuantConfig"),
        ("distill_override_layers", 7, _REP, "DistillOverrideLayer"),
        ("distill_override_layer_types", 8, _REP, "DistillOverrideLayerType"),
        ("quant_skip_layers", 9, _REP, _F.TYPE_STRING),
        ("quant_skip_layer_types", 10, _REP, _F.TYPE_STRING),
    ],
    "DistillGroup": [
        ("start_layer_name", 1, _REQ, _F.TYPE_STRING),
        ("end_layer_name", 2, _REQ, _F.TYPE_STRING),
    ],
    "DistillDataQuantConfig": [("ulq_quantize", 1, _OPT, "ActULQquantize")],
    "ActULQquantize": [
        ("clip_max_min", 1, _OPT, "ClipMaxMin"),
        ("fixed_min", 2, _OPT, _F.TYPE_BOOL),
        ("dst_type", 3, _OPT, _F.TYPE_STRING),
    ],
    "ClipMaxMin": [("clip_max", 1, _REQ, _F.TYPE_FLOAT), ("clip_min", 2, _REQ, _F.TYPE_FLOAT)],
    "DistillWeightQuantConfig": [("arq_distill", 1, _OPT, "ArqDistill")],
    "ArqDistill": [("channel_wise", 1, _OPT, _F.TYPE_BOOL), ("dst_type", 2, _OPT, _F.TYPE_STRING)],
    "DistillOverrideLayer": [
        ("layer_name", 1, _REQ, _F.TYPE_STRING),
        ("distill_data_quant_config", 2, _OPT, "DistillDataQuantConfig"),
        ("distill_weight_quant_config", 3, _OPT, "DistillWeightQuantConfig"),
    ],
    "DistillOverrideLayerType": [
        ("layer_type", 1, _REQ, _F.TYPE_STRING),
        ("distill_data_quant_config", 2, _OPT, "DistillDataQuantConfig"),
        ("distill_weight_quant_config", 3, _OPT, "DistillWeightQuantConfig"),
    ],
}


def _json_name(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.capitalize() for p in rest)


def file_descriptor_proto() -> descriptor_pb2.FileDescriptorProto:
    fdp = descriptor_pb2.FileDescriptorProto(name=PROTO_FILE, package=PACKAGE, syntax="proto2")
    for msg, fields in SCHEMA.items():
        m = fdp.message_type.add(name=msg)
        for name, number, label, ftype in fields:
            f = m.field.add(name=name, number=number, label=label, json_name=_json_name(name))
            if isinstance(ftype, str):
                f.type = _F.TYPE_MESSAGE
                f.type_name = f".{PACKAGE}.{ftype}"
            else:
                f.type = ftype
    return fdp


_pool = descriptor_pool.DescriptorPool()
_pool.Add(file_descriptor_proto())
AMCTDistillConfig = message_factory.GetMessageClass(_pool.FindMessageTypeByName(f"{PACKAGE}.AMCTDistillConfig"))


# ----------------------------------------------------------------------------------------------


def parse_simple_config(config_defination) -> Any:
    """Parse a simple config file (path) into an ``AMCTDistillConfig`` message; errors name the key."""
    if not isinstance(config_defination, (str, os.PathLike)):
        raise ConfigError(f"config_defination must be a path to a simple config file (protobuf text), got "
                          f"{type(config_defination).__name__}")
    path = Path(config_defination)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config_defination {str(path)!r} does not exist") from None
    except (IsADirectoryError, UnicodeDecodeError) as e:
        raise ConfigError(f"config_defination {str(path)!r} is not a readable text file: {e}") from None
    msg = AMCTDistillConfig()
    try:
        text_format.Parse(text, msg)
    except text_format.ParseError as e:
        raise ConfigError(f"config_defination {str(path)!r}: {e}") from None
    missing = msg.FindInitializationErrors()
    if missing:
        raise ConfigError(f"config_defination {str(path)!r}: required key(s) missing: {missing}")
    return msg


def _checked(cls, fields: dict, key: str, names: dict[str, str]) -> dict:
    """``fields`` if ``cls(**fields)`` accepts them (the JSON config's own rules, checked there only);
    else a ConfigError naming the simple config's key (``names``: field -> its name here)."""
    try:
        cls(**fields)
    except ConfigKeyError as e:
        sub = names.get(e.key[0], e.key[0]) if e.key else names[""]
        raise ConfigError(f"config_defination key {key}.{sub} {e.problem}") from None
    return fields


def _data_overrides(msg, key: str) -> dict:
    """The ``distill_data_config`` fields a DistillDataQuantConfig message sets."""
    out: dict[str, Any] = {}
    if not msg.HasField("ulq_quantize"):
        return out
    ulq = msg.ulq_quantize
    if ulq.HasField("dst_type"):
        out["dst_type"] = ulq.dst_type
    if ulq.HasField("fixed_min"):
        out["fixed_min"] = bool(ulq.fixed_min)
    if ulq.HasField("clip_max_min"):
        out["clip_max"], out["clip_min"] = float(ulq.clip_max_min.clip_max), float(ulq.clip_max_min.clip_min)
    return _checked(DistillDataConfig, out, f"{key}.ulq_quantize",
                    {"": "clip_max_min", "clip_max": "clip_max_min", "clip_min": "clip_max_min"})


def _weight_overrides(msg, key: str) -> dict:
    """The ``distill_weight_config`` fields a DistillWeightQuantConfig message sets."""
    out: dict[str, Any] = {}
    if not msg.HasField("arq_distill"):
        return out
    arq = msg.arq_distill
    if arq.HasField("dst_type"):
        out["dst_type"] = arq.dst_type
    if arq.HasField("channel_wise"):
        out["channel_wise"] = bool(arq.channel_wise)
    return _checked(DistillWeightConfig, out, f"{key}.arq_distill", {})


def _check_channel_wise(layer: str, module: nn.Module, weight: dict, key: str) -> None:
    cw = weight.get("channel_wise")
    if cw is not None and cw != channel_wise(module):
        right = "true" if channel_wise(module) else "false"
        raise ConfigError(f"config_defination key {key}.arq_distill.channel_wise={str(cw).lower()} is not supported "
                          f"for layer {layer!r} ({type(module).__name__}); it must be {right}")


def apply_simple_config(config: DistillConfig, config_defination, model: nn.Module) -> DistillConfig:
    """Return ``config`` (the default config of ``model``) with the simple config applied."""
    msg = parse_simple_config(config_defination)
    mods = dict(model.named_modules())
    layers = dict(config.layers)
    quantizable = list(config.enabled)

    top = {k: getattr(msg, k) for k in ("batch_num", "group_size", "data_dump") if msg.HasField(k)}
    try:
        config = replace(config, **top)
    except ConfigKeyError as e:
        raise ConfigError(f"config_defination key {e.key[0]!r} {e.problem}") from None

    # --- skip -----------------------------------------------------------------------------------
    for t in msg.quant_skip_layer_types:
        if t not in QUANT_TYPES:
            raise ConfigError(f"config_defination key 'quant_skip_layer_types': {t!r} is not a quantizable layer type; "
                              f"expected one of {list(QUANT_TYPES)}")
    skip_names = list(msg.quant_skip_layers)
    for n in skip_names:
        if n not in mods or not n:
            raise ConfigError(f"config_defination key 'quant_skip_layers': {n!r} is not a layer of the model")
        if n not in layers:
            raise ConfigError(f"config_defination key 'quant_skip_layers': {n!r} is a {type(mods[n]).__name__}, not a "
                              f"quantizable layer (Conv2d / Linear)")
    for n in quantizable:
        why = None
        if n in skip_names:
            why = "skipped by config_defination quant_skip_layers"
        elif type(mods[n]).__name__ in msg.quant_skip_layer_types:
            why = f"skipped by config_defination quant_skip_layer_types ({type(mods[n]).__name__})"
        if why:
            layers[n] = LayerConfig(quant_enable=False, skip_reason=why)
    enabled = [n for n in quantizable if layers[n].quant_enable]
    if not enabled:
        raise ConfigError("config_defination skips every quantizable layer; nothing would be quantized")

    # --- per-layer configs: global, then type, then name ----------------------------------------------
    data_cfg: dict[str, dict] = {n: {} for n in enabled}
    weight_cfg: dict[str, dict] = {n: {} for n in enabled}
    glob_d = _data_overrides(msg.distill_data_quant_config, "distill_data_quant_config")
    glob_w = _weight_overrides(msg.distill_weight_quant_config, "distill_weight_quant_config")
    if "clip_max" in glob_d:
        raise ConfigError("config_defination key distill_data_quant_config.ulq_quantize.clip_max_min: an initial range "
                          "applies to one layer; set it in distill_override_layers")
    for n in enabled:
        data_cfg[n].update(glob_d)
        weight_cfg[n].update(glob_w)
    seen_types: set[str] = set()
    for i, o in enumerate(msg.distill_override_layer_types):
        key = f"distill_override_layer_types[{i}]"
        if o.layer_type not in QUANT_TYPES:
            raise ConfigError(f"config_defination key {key}.layer_type: {o.layer_type!r} is not a quantizable layer type; "
                              f"expected one of {list(QUANT_TYPES)}")
        if o.layer_type in seen_types:
            raise ConfigError(f"config_defination key {key}.layer_type: {o.layer_type!r} is overridden twice")
        seen_types.add(o.layer_type)
        d = _data_overrides(o.distill_data_quant_config, f"{key}.distill_data_quant_config")
        if "clip_max" in d:
            raise ConfigError(f"config_defination key {key}.distill_data_quant_config.ulq_quantize.clip_max_min: an "
                              "initial range applies to one layer; set it in distill_override_layers")
        w = _weight_overrides(o.distill_weight_quant_config, f"{key}.distill_weight_quant_config")
        for n in enabled:
            if type(mods[n]).__name__ == o.layer_type:
                _check_channel_wise(n, mods[n], w, f"{key}.distill_weight_quant_config")
                data_cfg[n].update(d)
                weight_cfg[n].update(w)
    seen_layers: set[str] = set()
    for i, o in enumerate(msg.distill_override_layers):
        key = f"distill_override_layers[{i}]"
        n = o.layer_name
        if n not in mods or not n:
            raise ConfigError(f"config_defination key {key}.layer_name: {n!r} is not a layer of the model")
        if n not in layers or (n not in enabled and n not in skip_names and unsupported_reason(mods[n]) is not None):
            raise ConfigError(f"config_defination key {key}.layer_name: {n!r} is a {type(mods[n]).__name__}, which "
                              f"cannot be quantized")
        if n not in enabled:
            raise ConfigError(f"config_defination key {key}.layer_name: {n!r} is not quantized "
                              f"({layers[n].skip_reason or 'disabled'}); an override needs a quantized layer")
        if n in seen_layers:
            raise ConfigError(f"config_defination key {key}.layer_name: {n!r} is overridden twice")
        seen_layers.add(n)
        d = _data_overrides(o.distill_data_quant_config, f"{key}.distill_data_quant_config")
        w = _weight_overrides(o.distill_weight_quant_config, f"{key}.distill_weight_quant_config")
        _check_channel_wise(n, mods[n], w, f"{key}.distill_weight_quant_config")
        data_cfg[n].update(d)
        weight_cfg[n].update(w)
    for n in enabled:
        _check_channel_wise(n, mods[n], weight_cfg[n], "distill_weight_quant_config")
        layer = layers[n]
        layers[n] = replace(layer, distill_data_config=replace(layer.distill_data_config, **data_cfg[n]),
                            distill_weight_config=replace(layer.distill_weight_config, **weight_cfg[n]))

    # --- groups ---------------------------------------------------------------------------------
    groups = _regroup([list(u) for u in config.distill_group], list(msg.distill_group), config.group_size, mods)
    return replace(config, layers=layers, distill_group=groups)


def _regroup(units: list[list[str]], explicit, group_size: int, mods: dict) -> list[list[str]]:
    """Explicit groups cover the units from start to end; the remaining runs of units are merged
    ``group_size`` at a time."""
    flat = [n for u in units for n in u]
    pos = {n: i for i, n in enumerate(flat)}
    unit_of = {n: ui for ui, u in enumerate(units) for n in u}
    spans = []
    for i, g in enumerate(explicit):
        key = f"distill_group[{i}]"
        for field in ("start_layer_name", "end_layer_name"):
            n = getattr(g, field)
            if n not in pos:
                what = "is not a layer of the model" if n not in mods or not n else (
                    f"is a {type(mods[n]).__name__} outside every distill unit (a quantized layer and the BN / "
                    "activation modules that directly follow it)")
                raise ConfigError(f"config_defination key {key}.{field}: {n!r} {what}")
        a, b = unit_of[g.start_layer_name], unit_of[g.end_layer_name]
        if a > b:
            raise ConfigError(f"config_defination key {key}: start_layer_name {g.start_layer_name!r} runs after "
                              f"end_layer_name {g.end_layer_name!r}")
        for (pa, pb, pi) in spans:
            if a <= pb and pa <= b:
                raise ConfigError(f"config_defination key {key} overlaps distill_group[{pi}]; a layer belongs to one "
                                  "group")
        spans.append((a, b, i))
    spans.sort()
    groups: list[list[str]] = []
    run: list[list[str]] = []
    ui = 0
    for a, b, _ in spans + [(len(units), len(units) - 1, -1)]:
        run = units[ui:a]
        groups.extend(merge_units(run, group_size) if run else [])
        if a < len(units):
            groups.append([n for u in units[a:b + 1] for n in u])
        ui = b + 1
    return groups
