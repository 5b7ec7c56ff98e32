"""The distilled model from a checkpoint: model callable + state_dict + distill config -> the QAT model.

:func:`load_distilled_model` rebuilds what ``create_distill_model`` / ``distill`` produced and a
training script saved with ``torch.save(model.state_dict(), ...)`` (or as ``.safetensors``):

1. the **float** model from its callable (``"package.module:callable"``, ``"path/file.py:callable"``,
   a callable, or the module itself), with keyword arguments;
2. its layers wrapped in place as the distill config says (the default config - every Conv2d and
   Linear the forward calls - when none is given, built from ``example_inputs`` without writing a
   file); a model that already holds QAT layers is taken as it is;
3. the checkpoint's tensors made its parameters and buffers.

The checkpoint is data, never code: safetensors, or ``torch.load(weights_only=True)``. It is memory
mapped, and its tensors *become* the model's (``load_state_dict(assign=True)``), so a multi-GB model
costs its float model's allocation while it is built, then only the checkpoint's pages - no
state_dict copy. Keys saved by ``DataParallel`` / ``DistributedDataParallel`` (``module.`` prefix) are
accepted; a nested ``{"state_dict": ...}`` (or ``model_state_dict`` / ``model``) is unwrapped. Keys must
match the wrapped model: missing, unexpected and wrongly shaped keys are all named in one error.
Weights tied between modules stay tied (and a checkpoint that stores them once, as safetensors does,
is accepted).
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from .distill.config import load_distill_config
from .distill.create import default_config
from .distill.model import wrap_layers
from .errors import AmctError
from .quant.modules import is_quant_module

NESTED_STATE_KEYS = ("state_dict", "model_state_dict", "model")
DDP_PREFIX = "module."
_RANGE_KEYS = ("clip_min", "clip_max", "act_initialized")


class LoadError(AmctError, ValueError):
    """The model, its keyword arguments, the distill config or the checkpoint is wrong.

    ``what`` names which: ``"model"``, ``"model_kwargs"``, ``"distill_config"`` or ``"checkpoint"``."""

    def __init__(self, what: str, message: str):
        self.what = what
        super().__init__(message)

    def __reduce__(self):  # pickled by process and Dask workers: rebuilt from both arguments, not args alone
        return type(self), (self.what, str(self))


def resolve_callable(ref: str) -> Callable:
    """``package.module:callable`` (or ``path/to/file.py:callable``) -> the callable. Imports the module
    (the user's code, as given); never touches a checkpoint. Raises LoadError('model', ...)."""
    if not isinstance(ref, str) or ref.count(":") != 1:
        raise LoadError("model", f"{ref!r} must look like 'package.module:callable' (or 'path/file.py:callable')")
    mod_name, attr = ref.split(":")
    if not mod_name or not attr:
        raise LoadError("model", f"{ref!r} must look like 'package.module:callable'")
    try:
        if mod_name.endswith(".py") or os.sep in mod_name:
            path = Path(mod_name).resolve()
            if not path.is_file():
                raise LoadError("model", f"{ref!r}: file {str(path)!r} does not exist")
            name = "amct_user_model_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
            module = sys.modules.get(name)
            if module is None:
                spec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module
                spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.append(os.getcwd())
            module = importlib.import_module(mod_name)
    except LoadError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's module failed to import: say how
        raise LoadError("model", f"{ref!r}: module {mod_name!r} does not import: {type(e).__name__}: {e}") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise LoadError("model", f"{ref!r}: module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise LoadError("model", f"{ref!r}: {attr!r} is not callable")
    return obj


SAFETENSORS_SUFFIX = ".safetensors"
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) format
PICKLE_MAGIC = b"\x80"  # a pickle of protocol 2 or later: torch.save's legacy format


def _kind(path: Path, head: bytes, size: int) -> str:
    """``"safetensors"``, ``"torch"`` or ``"unknown"``: by the file's first bytes, not its name."""
    if head.startswith(ZIP_MAGIC) or head.startswith(PICKLE_MAGIC):
        return "torch"
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    return "safetensors" if path.suffix.lower() == SAFETENSORS_SUFFIX else "unknown"


def _check_safetensors_header(name: str, head: bytes, size: int) -> None:
    """A safetensors file is an 8-byte little-endian header length N, then N bytes of JSON, then the data."""
    layout = "(an 8-byte header length, a JSON header, then the tensors' bytes)"
    if size < 8:
        raise LoadError("checkpoint", f"checkpoint {name} holds {size} bytes, too few for a safetensors file {layout}: "
                                      "empty or cut short")
    n = int.from_bytes(head[:8], "little")
    if n > size - 8:
        raise LoadError("checkpoint", f"checkpoint {name} is not a readable safetensors file {layout}: its header length "
                                      f"says {n} bytes, but only {size - 8} follow (cut short, or not a safetensors "
                                      "file)")
    if head[8:9] != b"{":
        raise LoadError("checkpoint", f"checkpoint {name} is not a readable safetensors file {layout}: no JSON header "
                                      "after the header length")


def read_state_dict(path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint, memory-mapped, never executing code from it.

    safetensors (recognised by its layout, whatever the suffix), else ``torch.load(weights_only=True,
    mmap=True)``. A nested state_dict is unwrapped; entries that are not tensors are dropped. Every way the
    file can be wrong (missing, a directory, unreadable, empty, cut short, garbage, a pickle named
    ``.safetensors``) is a LoadError('checkpoint', ...) naming the file."""
    p = Path(path)
    name = repr(str(p))
    if not p.is_file():
        raise LoadError("checkpoint", f"checkpoint {name} does not exist or is not a file")
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(9)
    except OSError as e:
        raise LoadError("checkpoint", f"checkpoint {name} cannot be read: {e.strerror or e}") from None
    kind = _kind(p, head, size)
    if kind == "torch" and p.suffix.lower() == SAFETENSORS_SUFFIX:
        raise LoadError("checkpoint", f"checkpoint {name} is named {SAFETENSORS_SUFFIX} but holds a torch.save file "
                                      "(zip or pickle): save it with safetensors.torch.save_file, or name it .pt")
    if kind == "safetensors":
        _check_safetensors_header(name, head, size)
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except Exception as e:  # noqa: BLE001 - safetensors' own errors say what is wrong
            raise LoadError("checkpoint", f"checkpoint {name} is not a readable safetensors file: "
                                          f"{type(e).__name__}: {e}") from None
    try:
        try:
            obj = torch.load(str(p), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(str(p), map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as e:  # noqa: BLE001
        first = str(e).splitlines()[0] if str(e) else ""
        raise LoadError(
            "checkpoint",
            f"checkpoint {name} cannot be loaded safely (torch.load weights_only=True): {type(e).__name__}: {first}. "
            f"Save it with torch.save(model.state_dict(), path) or as .safetensors",
        ) from None
    for key in NESTED_STATE_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise LoadError("checkpoint", f"checkpoint {name} holds a {type(obj).__name__}, not a state_dict "
                                      "(name -> tensor)")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _describe(model) -> str:
    if isinstance(model, str):
        return model
    if isinstance(model, nn.Module):
        return f"a {type(model).__name__}"
    return getattr(model, "__qualname__", None) or repr(model)


def build_model(model, model_kwargs: dict | None = None) -> nn.Module:
    """The module ``model`` stands for: a ``"package.module:callable"`` / ``"path/file.py:callable"``
    reference or a callable, called with ``model_kwargs``; or a module, returned as it is."""
    if isinstance(model, nn.Module):
        if model_kwargs:
            raise LoadError("model_kwargs", "keyword arguments were given for a model that is already built")
        return model
    factory = resolve_callable(model) if isinstance(model, str) else model
    if not callable(factory):
        raise LoadError("model", f"expected a torch.nn.Module, a callable or 'package.module:callable', got {model!r}")
    try:
        built = factory(**(model_kwargs or {}))
    except Exception as e:  # noqa: BLE001 - the user's callable failed: say with what
        raise LoadError("model_kwargs", f"{_describe(model)}(**{model_kwargs or {}!r}) failed: {type(e).__name__}: {e}") from None
    if not isinstance(built, nn.Module):
        raise LoadError("model", f"{_describe(model)} returned a {type(built).__name__}, not a torch.nn.Module")
    return built


def _tied_groups(model: nn.Module) -> list[list[str]]:
    """Parameter names that share one Parameter object (tied weights), in groups of two or more."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def _retie(model: nn.Module, groups: list[list[str]]) -> None:
    for names in groups:
        first = model.get_parameter(names[0])
        for name in names[1:]:
            owner, _, attr = name.rpartition(".")
            (model.get_submodule(owner) if owner else model)._parameters[attr] = first


def load_state_into(model: nn.Module, state: dict[str, torch.Tensor], *, source: str = "the checkpoint",
                    against: str = "the model") -> nn.Module:
    """Make ``state``'s tensors ``model``'s parameters and buffers, keys checked strictly (no copy unless a
    tensor's dtype differs from the model's, when it is converted). Raises LoadError('checkpoint', ...)
    naming every missing, unexpected and wrongly shaped key."""
    expected = model.state_dict(keep_vars=True)
    if state and all(k.startswith(DDP_PREFIX) for k in state) and not any(k.startswith(DDP_PREFIX) for k in expected):
        state = {k[len(DDP_PREFIX):]: v for k, v in state.items()}
    else:
        state = dict(state)
    tied = _tied_groups(model)
    for names in tied:  # a tied weight stored once (safetensors keeps one name) serves every name
        held = next((n for n in names if n in state), None)
        if held is not None:
            for n in names:
                state.setdefault(n, state[held])
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected)
    wrong_shape = sorted(f"{k} {tuple(state[k].shape)} (model: {tuple(expected[k].shape)})"
                         for k in state if k in expected and tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected}")
        if wrong_shape:
            parts.append(f"keys of the wrong shape {wrong_shape}")
        hint = ""
        if missing and all(k.rsplit(".", 1)[-1] in _RANGE_KEYS for k in missing):
            hint = (" (the checkpoint looks like a float model: save the distilled model's state_dict, "
                    "i.e. of create_distill_model()/distill()'s result)")
        raise LoadError("checkpoint", f"{source} does not match {against}: " + "; ".join(parts) + hint)
    for k, v in state.items():
        if v.dtype != expected[k].dtype:
            state[k] = v.to(expected[k].dtype)
    model.load_state_dict(state, strict=True, assign=True)
    _retie(model, tied)
    return model


def load_distilled_model(model, checkpoint, distill_config=None, example_inputs=None, *,
                         model_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """The distilled model in eval mode: float model -> QAT-wrapped (distill config) -> checkpoint.

    ``model``: ``"package.module:callable"`` / ``"path/file.py:callable"`` / a callable (called with
    ``model_kwargs``) returning the float model, or the float model itself (wrapped in place). A model
    that already holds QAT layers is taken as wrapped (then ``distill_config`` must be None).
    ``checkpoint``: the state_dict file. ``distill_config``: the JSON config the model was wrapped with
    (None: the default config, which needs ``example_inputs``, a tensor or a tuple of them).

    Raises LoadError whose ``what`` names the input at fault."""
    float_model = build_model(model, model_kwargs)
    cfg_name = str(distill_config) if distill_config else "(default)"
    if any(is_quant_module(m) for m in float_model.modules()):
        if distill_config:
            raise LoadError("distill_config", f"{_describe(model)} already holds quantized layers; give the float "
                                              "model, or no distill config")
        wrapped = float_model
    else:
        try:
            if distill_config:
                cfg = load_distill_config(distill_config, float_model)
            elif example_inputs is None:
                raise LoadError("distill_config", "no distill config given, and no example inputs to build the "
                                                  "default one from")
            else:
                cfg = default_config(float_model, example_inputs)
            wrapped = wrap_layers(float_model, cfg)
        except AmctError as e:
            if isinstance(e, LoadError):
                raise
            message = str(e) if cfg_name in str(e) else f"{cfg_name}: {e}"  # the file named once
            raise LoadError("distill_config", message) from None
    state = read_state_dict(checkpoint)
    load_state_into(wrapped, state, source=repr(str(checkpoint)),
                    against=f"model {_describe(model)} wrapped by distill config {cfg_name}")
    return wrapped.eval()
