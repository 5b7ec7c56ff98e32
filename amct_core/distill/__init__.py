"""Distill config, model wrapping and the distillation loop."""
from .config import (
    ConfigKeyError,
    DistillConfig,
    DistillDataConfig,
    DistillWeightConfig,
    LayerConfig,
    load_distill_config,
    write_distill_config,
)
from .create import create_distill_config
from .layers import quantizable_layers
from .model import calibrate, create_distill_model
from .train import DistillError, DistillSampleBase, calibrate_distill_model, distill

__all__ = [
    "create_distill_config",
    "load_distill_config",
    "write_distill_config",
    "DistillConfig",
    "LayerConfig",
    "DistillDataConfig",
    "DistillWeightConfig",
    "ConfigKeyError",
    "quantizable_layers",
    "create_distill_model",
    "calibrate",
    "distill",
    "calibrate_distill_model",
    "DistillSampleBase",
    "DistillError",
]
