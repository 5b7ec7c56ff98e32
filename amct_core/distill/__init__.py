"""Distill config, model wrapping and the distillation loop."""
from .config import create_distill_config, load_distill_config
from .layers import quantizable_layers
from .model import create_distill_model, calibrate
from .train import DistillError, DistillSampleBase, calibrate_distill_model, distill

__all__ = [
    "create_distill_config",
    "load_distill_config",
    "quantizable_layers",
    "create_distill_model",
    "calibrate",
    "distill",
    "calibrate_distill_model",
    "DistillSampleBase",
    "DistillError",
]
