"""Which layers can be quantized (FORMATS.md section 7), a rule for the whole distill package.

``torch.nn.Conv2d`` (padding_mode ``'zeros'``, explicit integer padding) and ``torch.nn.Linear``, each
the only user of its weight and reachable under one name. A QAT wrapper (``QuantConv2d``,
``QuantLinear``) stands for the layer it wraps, so a distill config can be checked against the float
model or against the student made from it.
"""
from __future__ import annotations

import torch.nn as nn

from ..quant.modules import QuantConv2d, QuantLinear

# The layer types, by the class name the simple config's quant_skip_layer_types / layer_type use.
QUANT_TYPES = ("Conv2d", "Linear")


def layer_type(module: nn.Module) -> str | None:
    """``"Conv2d"`` or ``"Linear"`` for a quantizable type (float or QAT), else None."""
    if isinstance(module, (nn.Conv2d, QuantConv2d)):
        return "Conv2d"
    if isinstance(module, (nn.Linear, QuantLinear)):
        return "Linear"
    return None


def channel_wise(module: nn.Module) -> bool:
    """How a quantizable layer's weight is quantized: per output channel for Conv2d, per tensor for Linear."""
    return layer_type(module) == "Conv2d"


def unsupported_reason(module: nn.Module) -> str | None:
    """None if the module's type and settings can be quantized; else why not."""
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros":
            return f"padding_mode {module.padding_mode!r} is not supported (only 'zeros')"
        if isinstance(module.padding, str):
            return f"padding={module.padding!r} (string padding) is not supported"
        return None
    if layer_type(module) is not None:
        return None
    return "not a quantizable type (Conv2d or Linear)"


def quantizable_layers(model: nn.Module) -> tuple[list[str], dict[str, str]]:
    """Return (quantizable layer names in module order, {skipped layer: reason}) for Conv2d/Linear.

    What the model's structure decides; whether forward() calls a layer (once) needs a forward pass
    and is decided by ``create_distill_config``.
    """
    typed = [(n, m) for n, m in model.named_modules() if n and layer_type(m) is not None]
    names: dict[int, list[str]] = {}  # every name of each module object
    users: dict[int, set[str]] = {}  # every module name that holds each parameter
    for n, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), []).append(n)
        for p in m.parameters(recurse=False):
            users.setdefault(id(p), set()).add(n)
    quant, skipped = [], {}
    for name, module in typed:
        reason = unsupported_reason(module)
        if reason is None:
            aliases = [a for a in names[id(module)] if a != name]
            others = sorted(users.get(id(module.weight), set()) - {name, *aliases})
            if aliases:
                reason = f"module reused under several names: {aliases}"
            elif others:
                reason = f"weight shared with {others}"
        if reason is None:
            quant.append(name)
        else:
            skipped[name] = reason
    return quant, skipped
