"""Stages 2-5: trace, record, fake-quant build, deploy build. Each calls one amct_core.stages function."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from prefect import task

from ._common import FileRef, ModelSpec, build_model, measured, onnx_files, spec_inputs, stage_cache


@dataclass
class StageResult:
    """What a file-producing stage wrote, with its cost."""

    stage: str
    files: list[FileRef]
    seconds: float
    peak_rss_mb: float
    info: dict = field(default_factory=dict)

    @property
    def path(self) -> str:
        return self.files[0].path

    def intact(self) -> bool:
        return all(f.intact() for f in self.files)


@task(name="trace", cache_policy=stage_cache("traced_path", "model_record_path"), persist_result=True)
def trace(spec: ModelSpec, model_source_sha256: str, traced_path: str, model_record_path: str,
          input_names: list[str] | None, output_names: list[str] | None, dynamic_axes: dict | None,
          target: str, opset: int) -> StageResult:
    """The distilled model -> float ONNX graph (quantized nodes named after their modules) + its factors."""
    from amct_core.stages import trace_to_file

    with measured() as m:
        model = build_model(spec)
        res = trace_to_file(model, spec_inputs(spec), traced_path, model_record_path, input_names=input_names,
                            output_names=output_names, dynamic_axes=dynamic_axes, target=target, opset_version=opset)
    files = onnx_files(res.traced_path) + [FileRef.of(res.record_path)]
    return StageResult("trace", files, m.seconds, m.peak_rss_mb,
                       {"layers": list(res.layers), "target": res.target, "opset": res.opset,
                        "record_path": str(Path(res.record_path).resolve())})


@task(name="record", cache_policy=stage_cache("record_path"), persist_result=True)
def record(traced_path: str, model_record_path: str, record_path: str, given_record_file: str | None,
           target: str) -> StageResult:
    """Write the record file from the model, or validate a given record file against the traced model."""
    from amct_core.stages import validate_record_file

    from amct_core.errors import RecordError

    from ._common import ParameterError

    with measured() as m:
        if given_record_file:
            try:
                records = validate_record_file(given_record_file, traced_path, target)
            except RecordError as e:
                raise ParameterError("record_file", str(e)) from None
            out = Path(given_record_file).resolve()
            source = "given"
        else:
            records = validate_record_file(model_record_path, traced_path, target)
            out = Path(record_path)
            out.parent.mkdir(parents=True, exist_ok=True)
            from amct_core._io import atomic_write_bytes

            atomic_write_bytes(out, Path(model_record_path).read_bytes())
            source = "model"
    return StageResult("record", [FileRef.of(out)], m.seconds, m.peak_rss_mb,
                       {"source": source, "layers": list(records)})


@task(name="fake-quant-build", cache_policy=stage_cache("out_path"), persist_result=True)
def fake_quant_build(traced_path: str, record_path: str, out_path: str, target: str) -> StageResult:
    """Traced graph + record -> ``*_fake_quant_model.onnx`` (FORMATS §4)."""
    from amct_core.stages import build_fake_quant_file

    with measured() as m:
        out = build_fake_quant_file(traced_path, record_path, out_path, target)
    return StageResult("fake_quant_build", onnx_files(out), m.seconds, m.peak_rss_mb)


@task(name="deploy-build", cache_policy=stage_cache("out_path"), persist_result=True)
def deploy_build(traced_path: str, record_path: str, out_path: str, target: str) -> StageResult:
    """Traced graph + record -> ``*_deploy_model.onnx`` (FORMATS §5)."""
    from amct_core.stages import build_deploy_file

    with measured() as m:
        out = build_deploy_file(traced_path, record_path, out_path, target)
    return StageResult("deploy_build", onnx_files(out), m.seconds, m.peak_rss_mb)
