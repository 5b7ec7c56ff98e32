"""``manifest.json``: what one export is, for which target, and how to compile it.

The pipeline writes it beside the exported files and logs it with them; ``amct-export fetch`` checks
every downloaded file against it. It holds the target and its SoC family, the opset, the example inputs,
a suggested ATC command line, the checkpoint, the parity verdict, every file by role (path relative to
the manifest, place in the MLflow run, size, SHA-256), the versions of the tools, and the export's
parameters.
"""
from __future__ import annotations

import json
import platform
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Protocol

from ._io import atomic_write_bytes
from .targets import Target, get_target

MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1

# The roles of an export's files and where each goes among the MLflow run's artifacts (the manifest's
# "artifact_path" of a file is <its role's directory>/<its name>).
ARTIFACT_DIRS = {
    "fake_quant_model": "models/fake_quant",
    "deploy_model": "models/deploy",
    "record": "record",
    "parity_report": "parity",
    "plots": "plots",
    "distill_config": "config",
}

VERSIONED = ("torch", "onnx", "onnxruntime", "amct-core", "prefect", "mlflow", "numpy", "protobuf")


class FileEntry(Protocol):
    """A file of the export as the manifest lists it."""

    path: str
    sha256: str
    size: int


def versions() -> dict[str, str]:
    """Python's version and those of the distributions an export depends on ("not installed" if absent)."""
    out = {"python": platform.python_version()}
    for dist in VERSIONED:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            if dist == "amct-core":
                from . import __version__

                out[dist] = __version__
            else:
                out[dist] = "not installed"
    return out


def artifact_path(role: str, path: str) -> str:
    """Where a file of ``role`` goes among the MLflow run's artifacts."""
    return f"{ARTIFACT_DIRS.get(role, role)}/{Path(path).name}"


def atc_command(deploy_path, target: Target | str, inputs: Sequence[tuple[Sequence[int], str]],
                output_prefix: str) -> str:
    """A suggested ATC command line for the deploy model: the target's first SoC, the graph's inputs with
    the static shapes of ``inputs`` (int8 inputs cannot be dynamic on the device)."""
    from .onnx.mapped import open_model

    tgt = get_target(target) if isinstance(target, str) else target
    m = open_model(deploy_path)  # the graph; the (embedded) int8 weights are not read
    inits = {t.name for t in m.graph.initializer}
    names = [i.name for i in m.graph.input if i.name not in inits]
    shapes = ";".join(f"{n}:{','.join(str(int(d)) for d in shape)}"
                      for n, (shape, _) in zip(names, inputs, strict=False))  # an input the tracer dropped: none
    return (f"atc --framework=5 --model={Path(deploy_path).name} --output={output_prefix} "
            f"--soc_version={tgt.soc_family[0]} --input_shape=\"{shapes}\"")


def build_manifest(*, directory, name: str, target: str, opset: int, inputs: Sequence[tuple[Sequence[int], str]],
                   checkpoint: Mapping, files: Mapping[str, Sequence[FileEntry]], parity: Mapping,
                   parameters: Mapping) -> dict:
    """The manifest of an export whose files are ``files`` (role -> files; ``deploy_model`` first the
    ``.onnx`` file), written into ``directory`` (file paths are given relative to it when they lie below)."""
    tgt = get_target(target)
    base = Path(directory).resolve()
    inputs = [(list(s), d) for s, d in inputs]
    shapes, dtypes = [s for s, _ in inputs], [d for _, d in inputs]
    return {
        "manifest_version": MANIFEST_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "name": name,
        "target": tgt.name,
        "products": tgt.products,
        "soc_family": list(tgt.soc_family),
        "cann": tgt.cann,
        "opset": opset,
        "input": {"shape": shapes[0] if len(shapes) == 1 else shapes,
                  "dtype": dtypes[0] if len(set(dtypes)) == 1 else dtypes},
        "inputs": [{"shape": s, "dtype": d} for s, d in inputs],
        "atc_command": atc_command(files["deploy_model"][0].path, tgt, inputs, f"{name}_{tgt.name}"),
        "checkpoint": dict(checkpoint),
        "parity": dict(parity),
        "files": {role: [{"path": _relative(f.path, base), "artifact_path": artifact_path(role, f.path),
                          "sha256": f.sha256, "size": f.size} for f in entries]
                  for role, entries in files.items()},
        "versions": versions(),
        "parameters": dict(parameters),
    }


def write_manifest(path, manifest: Mapping) -> Path:
    """Write ``manifest`` as JSON to ``path`` (a temporary file renamed into place)."""
    path = Path(path)
    atomic_write_bytes(path, (json.dumps(manifest, indent=2, default=str) + "\n").encode())
    return path


def _relative(path: str, base: Path) -> str:
    p = Path(path).resolve()
    try:
        return str(p.relative_to(base))
    except ValueError:
        return str(p)
