"""Distill groups: which consecutive modules are trained together as one block.

A *unit* is a quantizable layer plus the modules that directly consume its output and only
re-scale or activate it: a BatchNorm fed by the layer's output, then an activation module
(``nn.ReLU``, ``nn.GELU``, ...) fed by that. Functional activations (``F.relu`` in ``forward``)
are not modules and therefore not part of any unit; the unit then ends at the layer (or its BN).
Units are found by running the model once and matching tensors: a module joins a unit only when
its input *is* the unit's current output tensor (same object), so the rule holds for any model
structure and never guesses from names or from definition order.

A *group* is one or more consecutive units (``group_size`` units per group).
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn

from .._modes import hooked_forward

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_ACT_TYPES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Softplus,
)


def _leaf_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if n and not list(m.children())}


def trace_calls(model: nn.Module, inputs: tuple) -> list[tuple[str, tuple[int, ...], int | None]]:
    """Run ``model(*inputs)`` once (eval, no grad) and return, in call order, for every leaf-module
    call: (name, ids of its tensor inputs, id of its tensor output or None).

    Every tensor seen is kept alive until the trace ends, so ids are unique during the trace.
    """
    calls: list[tuple[str, tuple[int, ...], int | None]] = []
    keep: list[object] = []
    hooks = []

    def hook(name):
        def fn(mod, args, out):
            ins = tuple(id(a) for a in args if isinstance(a, torch.Tensor))
            keep.extend(args)
            keep.append(out)
            calls.append((name, ins, id(out) if isinstance(out, torch.Tensor) else None))

        return fn

    for name, mod in _leaf_modules(model).items():
        hooks.append(mod.register_forward_hook(hook(name)))
    hooked_forward(model, inputs, hooks)
    keep.clear()  # the tensors kept alive for unique ids
    return calls


def build_units(model: nn.Module, calls: list, layers: Iterable[str]) -> list[list[str]]:
    """One unit per layer of ``layers`` (quantizable layers, any order), in execution order:
    ``[layer, (bn), (activation)]`` where bn / activation directly consume the previous output.
    ``calls`` is :func:`trace_calls` of the model."""
    layers = set(layers)
    mods = dict(model.named_modules())
    units: list[list[str]] = []
    used: set[str] = set()
    for i, (name, _ins, out) in enumerate(calls):
        if name not in layers or name in used:
            continue
        used.add(name)
        unit = [name]
        cur = out
        stage = 0  # 0: may take a BN or an activation; 1: may take an activation; 2: done
        for later, ins, lout in calls[i + 1:]:
            if cur is None or stage == 2:
                break
            if cur not in ins:
                continue
            # This call consumes the unit's output. Join only if it is a BN / activation module
            # taking that tensor as its only tensor input; otherwise the unit ends here.
            m = mods[later]
            if len(ins) == 1 and later not in layers and later not in used:
                if stage == 0 and isinstance(m, _BN_TYPES):
                    unit.append(later)
                    used.add(later)
                    cur, stage = lout, 1
                    continue
                if isinstance(m, _ACT_TYPES):
                    unit.append(later)
                    used.add(later)
                    cur, stage = lout, 2
                    continue
            break
        units.append(unit)
    return units


def merge_units(units: list[list[str]], group_size: int) -> list[list[str]]:
    """Consecutive runs of ``group_size`` (>= 1, a checked config value) units, concatenated (the last
    group may be shorter)."""
    return [sum(units[i:i + group_size], []) for i in range(0, len(units), group_size)]
