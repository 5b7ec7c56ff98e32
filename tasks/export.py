"""Stages 2-5: trace, record, fake-quant build, deploy build. Each calls one amct_core.stages function."""
from __future__ import annotations

from pathlib import Path

from prefect import task

from .files import FileRef, onnx_files
from .model import build_model, spec_inputs
from .specs import GraphSpec, ModelSpec, ParameterError
from .stage import StageResult, measured, stage_cache


@task(name="trace", cache_policy=stage_cache("traced_path", "model_record_path"), persist_result=True)
def trace(spec: ModelSpec, graph: GraphSpec, traced_path: str, model_record_path: str) -> StageResult:
    """The distilled model -> float ONNX graph (quantized nodes named after their modules) + its factors."""
    from amct_core.stages import trace_to_file

    with measured() as m:
        model = build_model(spec)
        res = trace_to_file(model, spec_inputs(spec), traced_path, model_record_path, input_names=graph.input_names,
                            output_names=graph.output_names, dynamic_axes=graph.dynamic_axes, target=graph.target,
                            opset_version=graph.opset)
    files = onnx_files(res.traced_path) + [FileRef.of(res.record_path)]
    return StageResult("trace", files, m.seconds, m.peak_rss_mb,
                       {"layers": list(res.layers), "target": res.target, "opset": res.opset,
                        "record_path": str(Path(res.record_path).resolve())})


@task(name="record", cache_policy=stage_cache("record_path"), persist_result=True)
def record(traced_path: str, model_record_path: str, record_path: str, given_record_file: str | None,
           target: str) -> StageResult:
    """Publish the model's own record file at ``record_path``, or validate a given record file against the
    traced model and hand it on (FORMATS §2)."""
    from amct_core.errors import RecordError
    from amct_core.stages import publish_record_file, validate_record_file

    with measured() as m:
        if given_record_file:
            try:
                records = validate_record_file(given_record_file, traced_path, target)
            except RecordError as e:
                raise ParameterError("record_file", str(e)) from None
            out, source = given_record_file, "given"
        else:
            records = publish_record_file(model_record_path, traced_path, record_path, target)
            out, source = record_path, "model"
    return StageResult("record", [FileRef.of(out)], m.seconds, m.peak_rss_mb, {"source": source, "layers": list(records)})


@task(name="fake-quant-build", cache_policy=stage_cache("out_path"), persist_result=True)
def fake_quant_build(traced_path: str, record_path: str, out_path: str, target: str,
                     record_given: bool = False) -> StageResult:
    """Traced graph + record -> ``*_fake_quant_model.onnx`` (FORMATS §4), with the traced file's export id.
    ``record_given``: the record is the user's ``record_file`` (it may come from another export)."""
    from amct_core.stages import build_fake_quant_file

    with measured() as m:
        out = build_fake_quant_file(traced_path, record_path, out_path, target, record_given=record_given)
    return StageResult("fake_quant_build", onnx_files(out), m.seconds, m.peak_rss_mb)


@task(name="deploy-build", cache_policy=stage_cache("out_path"), persist_result=True)
def deploy_build(traced_path: str, record_path: str, out_path: str, target: str,
                 record_given: bool = False) -> StageResult:
    """Traced graph + record -> ``*_deploy_model.onnx`` (FORMATS §5), with the traced file's export id."""
    from amct_core.stages import build_deploy_file

    with measured() as m:
        out = build_deploy_file(traced_path, record_path, out_path, target, record_given=record_given)
    return StageResult("deploy_build", onnx_files(out), m.seconds, m.peak_rss_mb)


def check_export_set(fake_quant_path: str, deploy_path: str, record_path: str, record_given: bool) -> str | None:
    """The three files of the export come from one export (:func:`amct_core.export_id.check_set`; raises
    ``MixedSetError`` naming the files and ids). Returns the export id (None for files without one)."""
    from amct_core.export_id import check_set, model_stamp, record_stamp

    models = [model_stamp("fake-quant model", fake_quant_path), model_stamp("deploy model", deploy_path)]
    return check_set(models, record_stamp(record_path), record_given=record_given).export_id
