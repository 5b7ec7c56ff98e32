"""Prefect tasks, one per stage of the export pipeline. Thin: validate, call amct_core, return small results.

Stages hand each other paths and small dataclasses (never torch modules or tensors). MLflow is used in
exactly one module, :mod:`tasks.tracking`.
"""
from ._common import FileRef, ModelSpec, ParameterError
from .checkpoint import CheckpointInfo, load_checkpoint
from .export import StageResult, deploy_build, fake_quant_build, record, trace
from .manifest import write_manifest
from .parity import ParityResult, parity

__all__ = [
    "FileRef", "ModelSpec", "ParameterError", "CheckpointInfo", "load_checkpoint", "StageResult", "trace",
    "record", "fake_quant_build", "deploy_build", "ParityResult", "parity", "write_manifest",
]
