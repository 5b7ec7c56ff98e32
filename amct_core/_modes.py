"""Running a user's model without leaving a trace on it: eval mode with every module's own flag restored,
and its ``input_data`` as the tuple of positional arguments."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn

from .errors import ConfigError


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


@contextmanager
def eval_mode(*models: nn.Module):
    """Put ``models`` in eval mode; afterwards every module gets back its own ``training`` flag."""
    flags = {m: m.training for model in models for m in model.modules()}
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for m, t in flags.items():
            m.training = t


def hooked_forward(model: nn.Module, inputs: tuple, hooks: list) -> None:
    """One forward on ``inputs`` in eval mode under no_grad; the hook handles are removed afterwards.

    A forward that raises becomes a ConfigError naming the input shapes.
    """
    try:
        with eval_mode(model), torch.no_grad():
            model(*inputs)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"model forward failed on input_data {[tuple(t.shape) for t in inputs]}: {e}") from e
    finally:
        for h in hooks:
            h.remove()
