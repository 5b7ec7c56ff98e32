"""The distill config: typed, checked once, read from and written to its JSON file here only.

The JSON file (AMCT's layout; every key, type and default in docs/DISTILL_CONFIG.md)::

    {
      "version": 1,
      "batch_num": 1,
      "group_size": 1,
      "data_dump": false,
      "distill_group": [["conv1", "bn1"], ["fc"]],
      "conv1": {
        "quant_enable": true,
        "distill_data_config": {"algo": "ulq_quantize", "dst_type": "INT8"},
        "distill_weight_config": {"algo": "arq_distill", "channel_wise": true, "dst_type": "INT8"}
      },
      "emb": {"quant_enable": false, "skip_reason": "weight shared with ['head']"}
    }

is a :class:`DistillConfig`: the top-level keys are its fields, every other key is a layer entry
(:class:`LayerConfig`, with :class:`DistillDataConfig` and :class:`DistillWeightConfig`). Each rule is
checked in one place:

- what needs no model (keys, types, values, the groups' shape): the dataclasses' ``__post_init__``,
  so every instance is well-formed, whether read from a file or built in Python;
- what needs the model (layer names, layer types, ``channel_wise``): :meth:`DistillConfig.validate`;
- the file (exists, is JSON, one object, no key twice): :func:`load_distill_config`, which every entry
  point (``create_distill_model``, ``distill``, ``calibrate_distill_model``) calls with its model, so
  they all refuse a bad config at once and with the same error.

An error is a :class:`ConfigKeyError` (a :class:`~amct_core.errors.ConfigError`) naming the file, the key
path (``conv1.distill_data_config.clip_max``) and what would be right.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch.nn as nn

from .._io import atomic_write_bytes
from ..errors import ConfigError, TargetError
from ..targets import get_target
from .layers import channel_wise, layer_type, quantizable_layers, unsupported_reason

CONFIG_VERSION = 1
DATA_ALGO = "ulq_quantize"  # activations: learned (clipped) asymmetric range, per tensor
WEIGHT_ALGO = "arq_distill"  # weights: symmetric, per channel (Conv2d) or per tensor (Linear)
DST_TYPE = "INT8"


class ConfigKeyError(ConfigError):
    """One key of a distill config is wrong: ``key`` is its path (``("conv1", "distill_data_config",
    "clip_max")``), ``problem`` says what is wrong and what would be right, ``source`` is the file."""

    def __init__(self, key: tuple[str, ...], problem: str, source: str | None = None):
        self.key, self.problem, self.source = tuple(key), problem, source
        where = f"distill config {source!r}" if source is not None else "distill config"
        super().__init__(f"{where}: key {'.'.join(self.key)!r} {problem}" if self.key else f"{where} {problem}")

    def __reduce__(self):  # pickled as its parts (a Prefect or Dask worker hands it back to the flow)
        return type(self), (self.key, self.problem, self.source)

    def within(self, *prefix: str) -> ConfigKeyError:
        """The same error, its key under ``prefix`` (an error of a sub-config, seen from its parent)."""
        return ConfigKeyError(prefix + self.key, self.problem, self.source)

    def in_file(self, source: str) -> ConfigKeyError:
        return ConfigKeyError(self.key, self.problem, source)


# ---- value checks: each raises ConfigKeyError naming the key ------------------------------------


def _got(value: Any) -> str:
    """``got <the value as JSON>`` (its type when it is long or no JSON value)."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = None
    return f"got {text if text is not None and len(text) <= 60 else type(value).__name__}"


def _positive_int(value: Any, key: str, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigKeyError((key,), f"must be a positive integer ({what}), {_got(value)}")


def _bool(value: Any, key: str, optional: bool = False) -> None:
    if not isinstance(value, bool) and not (optional and value is None):
        raise ConfigKeyError((key,), f"must be true or false, {_got(value)}"
                             + (" (or leave the key out)" if optional else ""))


def _one_of(value: Any, key: str, allowed: tuple[str, ...], why: str) -> None:
    if value not in allowed:
        choices = " or ".join(json.dumps(a) for a in allowed)
        raise ConfigKeyError((key,), f"must be {choices} ({why}), {_got(value)}")


def _did_you_mean(word: str, candidates) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _fields_from_json(cls, obj: Any, what: str, example: str) -> dict:
    """The keyword arguments of dataclass ``cls`` from a JSON object; an unknown key is an error."""
    names = [f.name for f in dataclasses.fields(cls)]
    if not isinstance(obj, dict):
        raise ConfigKeyError((), f"must be an object like {example}, {_got(obj)}")
    for k in obj:
        if k not in names:
            raise ConfigKeyError((k,), f"is unknown; the keys of {what} are {names}{_did_you_mean(k, names)}")
    return dict(obj)


def _defined(obj) -> dict:
    """The fields of a dataclass instance that are set (not None), in field order: its JSON object."""
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if getattr(obj, f.name) is not None}


class _SubConfig:
    """A layer's ``distill_data_config`` / ``distill_weight_config``: a JSON object of its fields."""

    KEY: ClassVar[str]  # its key in a layer entry
    EXAMPLE: ClassVar[str]  # a right value, for the error when it is no object

    @classmethod
    def from_json(cls, obj: Any):
        return cls(**_fields_from_json(cls, obj, cls.KEY, cls.EXAMPLE))

    def to_json(self) -> dict:
        return _defined(self)


# ---- the typed config --------------------------------------------------------------------------


@dataclass(frozen=True)
class DistillDataConfig(_SubConfig):
    """``distill_data_config`` of a layer: how its input activation is quantized (int8, asymmetric, one
    range per tensor, the range learned during distillation)."""

    KEY: ClassVar[str] = "distill_data_config"
    EXAMPLE: ClassVar[str] = '{"algo": "ulq_quantize", "dst_type": "INT8"}'

    algo: str = DATA_ALGO
    dst_type: str = DST_TYPE
    # Keep the range's lower end at 0. None: fixed when the calibrated input is never negative.
    fixed_min: bool | None = None
    # An initial range instead of the calibrated one (both or neither): clip_min <= 0 <= clip_max.
    clip_max: float | None = None
    clip_min: float | None = None

    def __post_init__(self):
        _one_of(self.algo, "algo", (DATA_ALGO,), "the activation algorithm this library implements")
        _one_of(self.dst_type, "dst_type", (DST_TYPE,), "the only activation type produced")
        _bool(self.fixed_min, "fixed_min", optional=True)
        if (self.clip_max is None) != (self.clip_min is None):
            given, missing = ("clip_max", "clip_min") if self.clip_min is None else ("clip_min", "clip_max")
            raise ConfigKeyError((missing,), f"is missing: an initial range needs clip_max and clip_min, or "
                                             f"neither (calibration); {given} is given")
        if self.clip_max is None:
            return
        for key in ("clip_max", "clip_min"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigKeyError((key,), f"must be a finite number, {_got(v)}")
            object.__setattr__(self, key, float(v))
        if not self.clip_min <= 0.0 <= self.clip_max or self.clip_min == self.clip_max:
            raise ConfigKeyError((), f"has clip_min={self.clip_min}, clip_max={self.clip_max}, but an initial "
                                     "range must hold 0 (clip_min <= 0 <= clip_max) and more than one point "
                                     "(clip_min < clip_max)")


@dataclass(frozen=True)
class DistillWeightConfig(_SubConfig):
    """``distill_weight_config`` of a layer: how its weight is quantized (int8, symmetric)."""

    KEY: ClassVar[str] = "distill_weight_config"
    EXAMPLE: ClassVar[str] = '{"algo": "arq_distill", "channel_wise": true, "dst_type": "INT8"}'

    algo: str = WEIGHT_ALGO
    # Per output channel (Conv2d: true) or per tensor (Linear: false); fixed by the layer type,
    # so a value is only checked against it (validate). None: the layer type's.
    channel_wise: bool | None = None
    dst_type: str = DST_TYPE

    def __post_init__(self):
        _one_of(self.algo, "algo", (WEIGHT_ALGO,), "the weight algorithm this library implements")
        _bool(self.channel_wise, "channel_wise", optional=True)
        _one_of(self.dst_type, "dst_type", (DST_TYPE,), "the only weight type produced")


_SUB_CONFIGS = (DistillDataConfig, DistillWeightConfig)


@dataclass(frozen=True)
class LayerConfig:
    """A layer entry: quantized and distilled (``quant_enable``), or left in float (with the reason).

    An enabled layer without sub-configs gets the defaults."""

    quant_enable: bool
    distill_data_config: DistillDataConfig | None = None
    distill_weight_config: DistillWeightConfig | None = None
    skip_reason: str | None = None

    def __post_init__(self):
        if not isinstance(self.quant_enable, bool):
            raise ConfigKeyError(("quant_enable",), f"must be true (quantize the layer) or false (leave it in "
                                                    f"float), {_got(self.quant_enable)}")
        for sub in _SUB_CONFIGS:
            value = getattr(self, sub.KEY)
            if value is None and self.quant_enable:
                object.__setattr__(self, sub.KEY, sub())
            elif value is not None and not isinstance(value, sub):
                raise ConfigKeyError((sub.KEY,), f"must be a {sub.__name__}, got {type(value).__name__}")
        if self.skip_reason is not None and not isinstance(self.skip_reason, str):
            raise ConfigKeyError(("skip_reason",), f"must be a string, {_got(self.skip_reason)}")

    @classmethod
    def from_json(cls, obj: Any) -> LayerConfig:
        kw = _fields_from_json(cls, obj, "a layer entry", '{"quant_enable": true}')
        if "quant_enable" not in kw:
            raise ConfigKeyError(("quant_enable",), "is missing: write true (quantize the layer) or false (leave "
                                                    "it in float)")
        for sub in _SUB_CONFIGS:
            if sub.KEY in kw:
                try:
                    kw[sub.KEY] = sub.from_json(kw[sub.KEY])
                except ConfigKeyError as e:
                    raise e.within(sub.KEY) from None
        return cls(**kw)

    def to_json(self) -> dict:
        out = _defined(self)
        for sub in _SUB_CONFIGS:
            if sub.KEY in out:
                out[sub.KEY] = out[sub.KEY].to_json()
        return out


TOP_LEVEL_KEYS = ("version", "batch_num", "group_size", "data_dump", "distill_group", "target")


@dataclass(frozen=True)
class DistillConfig:
    """The whole distill config. ``layers`` maps module names to their entries (in file order);
    ``distill_group`` lists the blocks trained together, each a list of module names."""

    layers: Mapping[str, LayerConfig]
    distill_group: tuple[tuple[str, ...], ...] = ()
    batch_num: int = 1  # calibration batches (the first ones of train_loader)
    group_size: int = 1  # quantized layers per default group (used by the simple config when it groups)
    data_dump: bool = False  # AMCT's dump of teacher block data; not supported, so false
    version: int = CONFIG_VERSION
    target: str | None = None  # the default target of save_distill_model ("A2", "A3", "950")

    def __post_init__(self):
        _positive_int(self.version, "version", f"the format version; this library writes {CONFIG_VERSION}")
        _positive_int(self.batch_num, "batch_num", "the number of calibration batches")
        _positive_int(self.group_size, "group_size", "layers per distill group")
        _bool(self.data_dump, "data_dump")
        if self.data_dump:
            raise ConfigKeyError(("data_dump",), "is true, but dumping the teacher's block data is not supported; "
                                                 "set it to false or leave it out")
        if self.target is not None:
            if not isinstance(self.target, str):
                raise ConfigKeyError(("target",), f"must be a string such as \"A2\", \"A3\" or \"950\", "
                                                  f"{_got(self.target)}")
            try:
                get_target(self.target)
            except TargetError as e:
                raise ConfigKeyError(("target",), f"names no target: {e}") from None
        self._check_layers()
        self._check_groups()

    def _check_layers(self) -> None:
        if not isinstance(self.layers, Mapping):
            raise ConfigKeyError(("layers",), f"must map layer names to LayerConfig, got {type(self.layers).__name__}")
        object.__setattr__(self, "layers", dict(self.layers))  # a copy: the caller's dict may change later
        for name, layer in self.layers.items():
            if not isinstance(name, str) or not name or name in TOP_LEVEL_KEYS:
                raise ConfigKeyError((str(name),), "cannot name a layer: a layer entry's key is the module's name "
                                                   f"in named_modules(), not empty and none of {list(TOP_LEVEL_KEYS)}")
            if not isinstance(layer, LayerConfig):
                raise ConfigKeyError((name,), f"must be a LayerConfig, got {type(layer).__name__}")
        if not self.enabled:
            raise ConfigKeyError((), "has no layer entry with \"quant_enable\": true, so nothing would be "
                                     "quantized; enable at least one Conv2d or Linear")

    def _check_groups(self) -> None:
        groups = self.distill_group
        if isinstance(groups, str) or not isinstance(groups, (list, tuple)):
            raise ConfigKeyError(("distill_group",), "must be a list of groups, each a list of module names, e.g. "
                                                     f"[[\"conv1\", \"bn1\"], [\"fc\"]], {_got(groups)}")
        seen: dict[str, int] = {}
        for gi, group in enumerate(groups):
            key = f"distill_group[{gi}]"
            if isinstance(group, str) or not isinstance(group, (list, tuple)) or not group:
                raise ConfigKeyError((key,), f"must be a non-empty list of module names, {_got(group)}")
            for n in group:
                if not isinstance(n, str) or not n:
                    raise ConfigKeyError((key,), f"must hold module names (non-empty strings), {_got(n)}")
                if n in seen:
                    raise ConfigKeyError((key,), f"names {n!r}, which distill_group[{seen[n]}] names too; a module "
                                                 "belongs to one group")
                seen[n] = gi
        for n in seen:  # a container block and a module inside it would be trained twice
            parts = n.split(".")
            for i in range(1, len(parts)):
                outer = ".".join(parts[:i])
                if outer in seen:
                    raise ConfigKeyError((f"distill_group[{seen[n]}]",), f"names {n!r}, a submodule of {outer!r} "
                                         f"(distill_group[{seen[outer]}]); name a block or its parts, not both")
        object.__setattr__(self, "distill_group", tuple(tuple(g) for g in groups))

    @property
    def enabled(self) -> tuple[str, ...]:
        """The layers to quantize (``quant_enable: true``), in file order."""
        return tuple(n for n, layer in self.layers.items() if layer.quant_enable)

    def validate(self, model: nn.Module) -> None:
        """Check the config against ``model``: the float model, or the student made from it (a QAT
        layer stands for the layer it wraps). Raises ConfigKeyError naming the key."""
        mods = dict(model.named_modules())
        _, cannot = quantizable_layers(model)
        for name, layer in self.layers.items():
            if name not in mods:
                raise ConfigKeyError((name,), "is neither a top-level key nor a module of the model (the keys of "
                                              f"named_modules()){_did_you_mean(name, [*TOP_LEVEL_KEYS, *mods])}")
            if not layer.quant_enable:
                continue
            m = mods[name]
            why = cannot.get(name) if layer_type(m) is not None else unsupported_reason(m)
            if why is not None:
                raise ConfigKeyError((name, "quant_enable"), f"is true, but {name!r} ({type(m).__name__}) cannot be "
                                                             f"quantized: {why}; set it to false")
            cw = layer.distill_weight_config.channel_wise
            if cw is not None and cw != channel_wise(m):
                right, how = ("true", "per output channel") if channel_wise(m) else ("false", "per tensor")
                raise ConfigKeyError((name, "distill_weight_config", "channel_wise"),
                                     f"is {json.dumps(cw)}, but {name!r} is a {layer_type(m)}, whose weight is "
                                     f"quantized {how}: write {right} or leave the key out")
        for gi, group in enumerate(self.distill_group):
            for n in group:
                if n not in mods:
                    raise ConfigKeyError((f"distill_group[{gi}]",), f"names {n!r}, which is not a module of the "
                                                                   f"model{_did_you_mean(n, mods)}")

    @classmethod
    def from_json(cls, obj: Any) -> DistillConfig:
        """The config of a parsed JSON file (a dict); every key is checked."""
        if not isinstance(obj, dict):
            raise ConfigKeyError((), f"must be one JSON object, {_got(obj)}")
        top = {k: v for k, v in obj.items() if k in TOP_LEVEL_KEYS}
        layers = {}
        for name, entry in obj.items():
            if name in TOP_LEVEL_KEYS:
                continue
            if not isinstance(entry, dict):
                raise ConfigKeyError((name,), f"is not a top-level key {list(TOP_LEVEL_KEYS)}"
                                              f"{_did_you_mean(name, TOP_LEVEL_KEYS)}, and as a layer entry it must be "
                                              f"an object like {{\"quant_enable\": true}}, {_got(entry)}")
            try:
                layers[name] = LayerConfig.from_json(entry)
            except ConfigKeyError as e:
                raise e.within(name) from None
        return cls(layers=layers, **top)

    def to_json(self) -> dict:
        """The JSON object of the file (top-level keys first, then the layer entries in order)."""
        out: dict[str, Any] = {"version": self.version, "batch_num": self.batch_num, "group_size": self.group_size,
                               "data_dump": self.data_dump, "distill_group": [list(g) for g in self.distill_group]}
        if self.target is not None:
            out["target"] = self.target
        out.update((name, layer.to_json()) for name, layer in self.layers.items())
        return out


# ---- the file ----------------------------------------------------------------------------------


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise ConfigKeyError((k,), "appears twice in one object; JSON readers keep only one of the two values, "
                                       "so write it once")
        out[k] = v
    return out


def load_distill_config(config_file, model: nn.Module | None = None) -> DistillConfig:
    """Read and check the JSON distill config ``config_file``; given ``model``, check it against the
    model too (:meth:`DistillConfig.validate`). Every error is a ConfigError naming the file."""
    if not isinstance(config_file, (str, os.PathLike)):
        raise ConfigError(f"config_file must be the path of a distill config (JSON), got {type(config_file).__name__}")
    source = str(config_file)
    try:
        text = Path(config_file).read_text()
    except FileNotFoundError:
        raise ConfigError(f"distill config {source!r} does not exist") from None
    except (IsADirectoryError, UnicodeDecodeError) as e:
        raise ConfigError(f"distill config {source!r} is not a readable text file: {e}") from None
    try:
        config = DistillConfig.from_json(json.loads(text, object_pairs_hook=_no_duplicate_keys))
        if model is not None:
            config.validate(model)
    except json.JSONDecodeError as e:
        raise ConfigError(f"distill config {source!r} is not valid JSON: {e}") from None
    except ConfigKeyError as e:
        raise e.in_file(source) from None
    return config


def write_distill_config(config_file, config: DistillConfig) -> None:
    """Write ``config`` as ``config_file`` (JSON, two-space indent), atomically; parent directories are made."""
    path = Path(config_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(config.to_json(), indent=2) + "\n").encode())
