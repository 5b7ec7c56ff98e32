"""What one export produced, as the manifest and the logging stage read it."""
from __future__ import annotations

from dataclasses import dataclass

from .checkpoint import CheckpointInfo
from .files import FileRef
from .parity import ParityResult
from .specs import GraphSpec
from .stage import StageResult


@dataclass
class ExportResults:
    """The results of one export's stages, with the parameters it ran with."""

    name: str  # the files' name prefix
    graph: GraphSpec
    parameters: dict  # the flow's parameters as checked (absolute paths, default names filled in)
    checkpoint: CheckpointInfo
    trace: StageResult
    record: StageResult
    fake_quant: StageResult
    deploy: StageResult
    parity: ParityResult
    states: dict[str, str]  # stage -> Prefect state name ("Completed", "Cached")
    seconds: dict[str, float]  # stage -> wall seconds in this run

    def files(self) -> dict[str, list[FileRef]]:
        """The export's files by role (amct_core.manifest.ARTIFACT_DIRS): each model's .onnx file first."""
        reports = self.parity.files
        files = {
            "fake_quant_model": self.fake_quant.files,
            "deploy_model": self.deploy.files,
            "record": self.record.files,
            "parity_report": [f for f in reports if not f.path.endswith(".png")],
            "plots": [f for f in reports if f.path.endswith(".png")],
        }
        if self.parameters.get("distill_config"):
            files["distill_config"] = [FileRef.of(self.parameters["distill_config"])]
        return files

    def stage_results(self) -> dict:
        """Stage name -> its result (each has ``seconds`` and ``peak_rss_mb``: its cost when it was computed)."""
        return {"load-checkpoint": self.checkpoint, "trace": self.trace, "record": self.record,
                "fake-quant-build": self.fake_quant, "deploy-build": self.deploy, "parity": self.parity}
