"""amct_core: AMCT-compatible quantization-aware distillation and int8 ONNX export for Ascend NPUs.

Public API (AMCT's family)::

    from amct_core import create_distill_config, create_distill_model, distill, save_distill_model

The package loads lazily: ``import amct_core`` (or ``import amct_core.targets``) does not import torch;
the first use of a name below imports the module that defines it. ``amct_core.distill`` is the function
``distill`` whatever was imported before (the subpackage of the same name is ``sys.modules["amct_core.distill"]``;
import from it with ``from amct_core.distill import calibrate``).
"""
from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

# public name -> the submodule that defines it
_HOMES = {
    "create_distill_config": ".distill",
    "create_distill_model": ".distill",
    "distill": ".distill",
    "save_distill_model": ".save",
    "AmctError": ".errors",
    "ConfigError": ".errors",
    "ExportError": ".errors",
    "RecordError": ".errors",
    "TargetError": ".errors",
}

__all__ = [*_HOMES, "__version__"]


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})


class _Package(types.ModuleType):
    """The package's module type: only to keep the name ``distill`` for the function.

    Importing the subpackage ``amct_core.distill`` makes Python bind it as the package's attribute
    ``distill`` (after the subpackage has run, so nothing inside it can prevent that). A property on
    the module's type takes precedence over the module's namespace: it gives the function, and the
    binding of the subpackage is let go (the subpackage stays reachable in ``sys.modules``)."""

    @property
    def distill(self):
        return importlib.import_module(".distill", __name__).distill

    @distill.setter
    def distill(self, value) -> None:
        pass


sys.modules[__name__].__class__ = _Package
