"""Stage 1: load the distilled checkpoint (local path or MLflow URI) and check it fits the model."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from .files import sha256_file
from .model import build_model
from .specs import ModelSpec, ParameterError, is_mlflow_uri
from .stage import measured


@dataclass
class CheckpointInfo:
    spec: ModelSpec  # the spec the later stages rebuild the model from: ``checkpoint`` is the local file
    source: str  # what the user gave (path or MLflow URI)
    sha256: str
    size: int
    quantized_layers: list[str]
    seconds: float
    peak_rss_mb: float


def resolve_checkpoint(checkpoint: str, download_dir: str, tracking_uri: str | None = None) -> str:
    """A local checkpoint file: the path itself, or the MLflow artifact downloaded into ``download_dir``."""
    if is_mlflow_uri(checkpoint):
        from .tracking import download_checkpoint  # the one module that talks to MLflow

        return download_checkpoint(checkpoint, download_dir, tracking_uri)
    p = Path(checkpoint)
    if not p.is_file():
        raise ParameterError("checkpoint", f"{checkpoint!r} does not exist (give a file path, or an MLflow URI "
                                           f"such as 'runs:/<run_id>/<path>' or 'models:/<name>/<version>')")
    return str(p.resolve())


@task(name="load-checkpoint", cache_policy=NO_CACHE, persist_result=False)
def load_checkpoint(spec: ModelSpec, download_dir: str, tracking_uri: str | None = None) -> CheckpointInfo:
    """Resolve and load the checkpoint into the wrapped model (strict keys, no code execution)."""
    from amct_core.quant.modules import is_quant_module

    with measured() as m:
        local = resolve_checkpoint(spec.checkpoint, download_dir, tracking_uri)
        local_spec = replace(spec, checkpoint=local)
        model = build_model(local_spec)
        layers = [n for n, mod in model.named_modules() if is_quant_module(mod)]
    sha = sha256_file(local)
    print(f"checkpoint {spec.checkpoint} (sha256 {sha[:12]}): {len(layers)} quantized layers")
    return CheckpointInfo(spec=local_spec, source=spec.checkpoint, sha256=sha, size=Path(local).stat().st_size,
                          quantized_layers=layers, seconds=m.seconds, peak_rss_mb=m.peak_rss_mb)
