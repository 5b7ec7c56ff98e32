"""Stage 7: manifest.json, the one file that says what was exported, for which target, and how to compile it."""
from __future__ import annotations

import json
import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from ._common import FileRef

# Where each kind of file goes in the MLflow run's artifacts (and in the manifest's "artifact_path").
ARTIFACT_DIRS = {
    "fake_quant_model": "models/fake_quant",
    "deploy_model": "models/deploy",
    "record": "record",
    "parity_report": "parity",
    "plots": "plots",
    "distill_config": "config",
}

VERSIONED = ("torch", "onnx", "onnxruntime", "amct-core", "prefect", "mlflow", "numpy", "protobuf")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in VERSIONED:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            if dist == "amct-core":
                import amct_core

                out[dist] = amct_core.__version__
            else:
                out[dist] = "not installed"
    return out


def atc_command(deploy_path: str, soc_version: str, inputs: list[tuple[list[int], str]], output_prefix: str) -> str:
    """A suggested ATC command line: static input shapes (int8 inputs cannot be dynamic on the device)."""
    from amct_core.onnx.mapped import open_model

    m = open_model(deploy_path)  # the graph; the (embedded) int8 weights are not read
    inits = {t.name for t in m.graph.initializer}
    names = [i.name for i in m.graph.input if i.name not in inits]
    shapes = ";".join(f"{n}:{','.join(str(int(d)) for d in shape)}" for n, (shape, _) in zip(names, inputs))
    return (f"atc --framework=5 --model={Path(deploy_path).name} --output={output_prefix} "
            f"--soc_version={soc_version} --input_shape=\"{shapes}\"")


@task(name="manifest", cache_policy=NO_CACHE, persist_result=False)
def write_manifest(out_path: str, target: str, opset: int, name: str, input_shape: list, input_dtype: str | list[str],
                   checkpoint: dict, files: dict[str, list[FileRef]], parity: dict, parameters: dict) -> FileRef:
    """Write ``manifest.json``: target, SoC family, suggested ATC command, every file's SHA-256, versions."""
    from amct_core._io import atomic_write_bytes
    from amct_core.targets import get_target

    from ._common import input_list

    tgt = get_target(target)
    inputs = input_list(input_shape, input_dtype)
    deploy = files["deploy_model"][0].path
    out_dir = Path(out_path).resolve().parent
    manifest = {
        "manifest_version": 1,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "name": name,
        "target": tgt.name,
        "products": tgt.products,
        "soc_family": list(tgt.soc_family),
        "cann": tgt.cann,
        "opset": opset,
        "input": {"shape": list(input_shape), "dtype": input_dtype},
        "inputs": [{"shape": s, "dtype": d} for s, d in inputs],
        "atc_command": atc_command(deploy, tgt.soc_family[0], inputs, f"{name}_{tgt.name}"),
        "checkpoint": checkpoint,
        "parity": parity,
        "files": {
            role: [
                {"path": _rel(f.path, out_dir), "artifact_path": f"{ARTIFACT_DIRS.get(role, role)}/{Path(f.path).name}",
                 "sha256": f.sha256, "size": f.size}
                for f in refs
            ]
            for role, refs in files.items()
        },
        "versions": versions(),
        "parameters": parameters,
    }
    atomic_write_bytes(Path(out_path), (json.dumps(manifest, indent=2, default=str) + "\n").encode())
    return FileRef.of(out_path)


def _rel(path: str, base: Path) -> str:
    p = Path(path).resolve()
    try:
        return str(p.relative_to(base))
    except ValueError:
        return str(p)
