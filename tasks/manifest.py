"""Stage 7: manifest.json (amct_core.manifest), the one file that says what was exported, for which target,
and how to compile it."""
from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from .files import FileRef
from .results import ExportResults


@task(name="manifest", cache_policy=NO_CACHE, persist_result=False)
def write_manifest(out_path: str, export: ExportResults) -> FileRef:
    """Write ``manifest.json``: target, SoC family, suggested ATC command, every file's SHA-256, versions."""
    from amct_core.manifest import build_manifest
    from amct_core.manifest import write_manifest as write

    ck, par = export.checkpoint, export.parity
    manifest = build_manifest(
        directory=Path(out_path).parent, name=export.name, target=export.graph.target, opset=export.graph.opset,
        inputs=ck.spec.inputs(), checkpoint={"source": ck.source, "sha256": ck.sha256, "size": ck.size},
        files=export.files(), parity={"passed": par.passed, "summary": par.summary, "checks": par.checks,
                                      "metrics": par.metrics},
        parameters=export.parameters)
    return FileRef.of(write(out_path, manifest))
