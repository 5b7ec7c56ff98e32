"""amct_core: AMCT-compatible quantization-aware distillation and int8 ONNX export for Ascend NPUs.

Public API (AMCT's family)::

    from amct_core import create_distill_config, create_distill_model, distill, save_distill_model
"""
from .distill import create_distill_config, create_distill_model, distill
from .errors import AmctError, ConfigError, ExportError, RecordError, TargetError
from .save import save_distill_model

__version__ = "0.1.0"

__all__ = [
    "create_distill_config",
    "create_distill_model",
    "distill",
    "save_distill_model",
    "AmctError",
    "ConfigError",
    "ExportError",
    "RecordError",
    "TargetError",
    "__version__",
]
