"""Running a user's model without leaving a trace on it: eval mode with every module's own flag restored."""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn

from .errors import ConfigError


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
