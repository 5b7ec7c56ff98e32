"""amct-export: run the distill-export flow locally, run a batch of exports on Dask, check exported files,
validate a record file, inspect an exported model, fetch an export back from MLflow.

``run``'s options are the flow's parameters: names, types, defaults and help come from the signature
and docstring of ``flows/distill_export.py:distill_export`` (:func:`flows.parameters.flow_parameters`,
read without importing Prefect), so a bad parameter is refused in about a second, before any flow
starts. ``verify`` is ``python -m amct_core.verify``.

Exit codes (for scripts):
  0  success
  1  the run failed in a stage (see the message) / verify: a check failed / batch: some exports failed
     (each named with its error; the others completed)
  2  invalid arguments or parameters (the message names the parameter; fetch: also an unknown run or
     model version, or a --to directory that is not empty; batch: a bad batch file, naming item and key)
  3  MLflow failed: logging failed after its retries (every exported file is still on disk) / fetch: the
     tracking server cannot be reached
  4  parity failed (files written and logged; the report says which output/layer)
  5  validate-record: the record file is invalid / inspect: the file is not a readable ONNX model, or
     the export's files carry different export ids /
     fetch: the run holds no complete export, or a file differs from its manifest (nothing is left in --to)
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import typing
from pathlib import Path
from typing import Any, Optional, Union

from flows.parameters import FlowParameter, flow_parameters

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_TRACKING, EXIT_PARITY, EXIT_INVALID = 0, 1, 2, 3, 4, 5

EXIT_CODES = """\
exit codes: 0 ok, 1 stage failed (verify: a check failed), 2 bad arguments/parameters, 3 MLflow failed
(logging: files kept; fetch: server unreachable), 4 parity failed, 5 invalid record file / unreadable
model / fetched files do not match their manifest"""

MAIN_EPILOG = """\
examples:
  # export a distilled checkpoint (file or MLflow URI), check it, log it to MLflow
  amct-export run --checkpoint digits_out/student.safetensors --model examples.digits:build_model \\
      --distill-config digits_out/distill_config.json --input-shape 1,1,8,8 \\
      --output-dir digits_out/export --name digits --dynamic-axes '{"input": [0], "output": [0]}'
  # check exported files on the CPU: ATC preflight, deploy simulation, parity with the torch model
  amct-export verify digits_out/export/digits --model examples.digits:build_model \\
      --distill-config digits_out/distill_config.json --checkpoint digits_out/student.safetensors
  # check a record file (syntax and values; against the model when --model/--checkpoint are given)
  amct-export validate-record out/model_scale_offset_record.txt
  # what is inside an exported model
  amct-export inspect out/model_deploy_model.onnx
  # many exports (checkpoints x targets) from a batch file, on a local Dask cluster or an existing one
  amct-export batch examples/batch.yaml --workers 2 --output-dir batch_out
  # an export back from MLflow (deploy + fake-quant models, record, manifest; SHA-256 checked)
  amct-export fetch models:/digits-int8/latest --to deploy/ --mlflow-tracking-uri http://127.0.0.1:5001

Each command has its own --help. Without configuration `run` runs the flow on Prefect's ephemeral API
and logs to ./mlflow.db; set PREFECT_API_URL and MLFLOW_TRACKING_URI (or --mlflow-tracking-uri) to use
real servers. See the MLflow UI with:
  {mlflow} ui --backend-store-uri sqlite:///mlflow.db --port 5000   (then http://127.0.0.1:5000)

""" + EXIT_CODES

RUN_EPILOG = """\
Each option is a parameter of the flow (the same names with '_' for '-' in a Prefect deployment's
parameters or in --params-file). Values on the command line:
  lists        comma-separated: --input-shape 1,3,224,224 --input-names image; one list per input
               separated by ';': --input-shape "1,16;1,16"; or JSON: --input-shape "[[1, 16], [1, 16]]"
  objects      JSON, or KEY=VALUE (the value is read as JSON if it can be), repeatable and merged:
               --metrics accuracy.int8=98.9 --metrics latency_ms=3, --dynamic-axes '{"input": [0]}'
  true/false   --force / --no-force

example:
  amct-export run --checkpoint digits_out/student.safetensors --model examples.digits:build_model \\
      --distill-config digits_out/distill_config.json --input-shape 1,1,8,8 --output-dir out --name digits

Prints the files written, the parity verdict and the MLflow run (--json: as JSON). Re-runs skip stages
whose inputs are unchanged.

exit codes: 0 ok, 1 a stage failed, 2 a bad parameter (one line naming it, before any flow starts),
3 MLflow logging failed after its retries (every file is on disk), 4 parity failed (files written and
logged; the report names the worst output/layer)
"""


# ---- run's options, from the flow's parameters --------------------------------------------------

_TYPES = {"Any": Any, "Optional": Optional, "Union": Union, "list": list, "dict": dict, "str": str, "int": int,
          "float": float, "bool": bool}


def _type(annotation: str):
    """The annotation as a typing object, None stripped (a parameter's default says whether it may be None)."""
    tp = eval(annotation, dict(_TYPES))  # noqa: S307 - the flow's own signature, read from our source
    if typing.get_origin(tp) is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0] if len(args) == 1 else Union[tuple(args)]
    return tp


def _scalar(text: str, item) -> Any:
    """One item of a list: as the item type says; for Any, a number when it reads as one."""
    if item is str:
        return text
    try:
        return int(text)
    except ValueError:
        pass
    if item is int:
        raise argparse.ArgumentTypeError(f"expected integers, got {text!r}")
    try:
        return float(text)
    except ValueError:
        return text


def _list_parser(item):
    def parse(text: str) -> list:
        if text.lstrip().startswith("["):
            return _json_value(text)
        groups = [[_scalar(v.strip(), item) for v in g.split(",") if v.strip()] for g in text.split(";") if g.strip()]
        if not groups or not all(groups):
            raise argparse.ArgumentTypeError(f"expected comma-separated values like 1,3,224,224, got {text!r}")
        return groups[0] if len(groups) == 1 else groups
    return parse


def _one_or_list(text: str):
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected a value or comma-separated values, got {text!r}")
    return values[0] if len(values) == 1 else values


def _json_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text!r}") from None


def _dict_item(text: str) -> dict:
    """``'{"a": 1}'`` or ``a=1`` (the value read as JSON when it can be, else as a string)."""
    if text.lstrip().startswith("{"):
        v = _json_value(text)
        if not isinstance(v, dict):
            raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
        return v
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE or a JSON object, got {text!r}")
    try:
        return {key.strip(): json.loads(value)}
    except json.JSONDecodeError:
        return {key.strip(): value}


def _option(p: FlowParameter) -> tuple[str, dict]:
    """The argparse option of a flow parameter: its type, metavar and help (the docstring's, with the default)."""
    tp = _type(p.annotation)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    help_text = ("(required) " if p.required else "") + p.help
    if p.default not in (None, False) and not p.required:
        help_text = f"{help_text.rstrip('.')} (default: {p.default})."
    kw: dict = {"dest": p.name, "default": None, "help": help_text.replace("%", "%%")}
    if tp is bool:
        kw.update(action=argparse.BooleanOptionalAction)
    elif tp in (int, float):
        kw.update(type=tp, metavar="N" if tp is int else "X")
    elif tp is str:
        kw.update(metavar=p.name.upper())
    elif origin is list:
        kw.update(type=_list_parser(args[0] if args else Any), metavar="A,B[;C,D]" if args[0] is Any else "A,B")
    elif origin is Union and str in args:
        kw.update(type=_one_or_list, metavar="A[,B]")
    elif origin is dict:
        kw.update(type=_dict_item, action="append", metavar="JSON|KEY=VALUE")
    else:
        raise TypeError(f"flow parameter {p.name!r}: no command-line form for its type {p.annotation!r}")
    return "--" + p.name.replace("_", "-"), kw


def add_run_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("the flow's parameters")
    for p in flow_parameters():
        flag, kw = _option(p)
        g.add_argument(flag, **kw)
    g = parser.add_argument_group("running")
    g.add_argument("--params-file", default=None, metavar="JSON_FILE",
                   help="flow parameters as a JSON object (the names above with '_', as in a Prefect deployment); "
                        "options given on the command line override it (objects are merged)")
    g.add_argument("--json", action="store_true", help="print the result summary as JSON")


def collect_params(a: argparse.Namespace) -> dict:
    """The flow's parameters from --params-file and the options given (the options win; objects merge)."""
    params: dict = {}
    if a.params_file:
        try:
            params = json.loads(Path(a.params_file).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(_usage_error(f"--params-file {a.params_file!r}: {e}")) from None
        if not isinstance(params, dict):
            raise SystemExit(_usage_error(f"--params-file {a.params_file!r} must hold a JSON object"))
    for p in flow_parameters():
        v = getattr(a, p.name, None)
        if v is None:
            continue
        if isinstance(v, list) and typing.get_origin(_type(p.annotation)) is dict:
            merged = dict(params.get(p.name) or {})
            for item in v:
                merged.update(item)
            v = merged
        params[p.name] = v
    for p in flow_parameters():
        if p.required and p.name not in params:
            raise SystemExit(_usage_error(f"--{p.name.replace('_', '-')} is required (or give \"{p.name}\" in "
                                          f"--params-file)"))
    return params


def tool(name: str) -> str:
    """How to type the command ``name`` installed beside this Python: bare when the shell finds that one,
    else its path (relative when under the working directory, e.g. ``.venv/bin/mlflow``)."""
    import shutil

    exe = Path(sys.executable).parent / name
    if not exe.exists():
        return name
    found = shutil.which(name)
    if found and Path(found).resolve() == exe.resolve():
        return name
    try:
        return str(exe.absolute().relative_to(Path.cwd()))
    except ValueError:
        return str(exe.absolute())


def _usage_error(msg: str) -> int:
    print(f"amct-export: error: {msg}", file=sys.stderr)
    return EXIT_USAGE


def _classify(exc: BaseException | None) -> int:
    from prefect.exceptions import ParameterTypeError

    from flows.distill_export import LoggingFailed, ParityFailed
    from tasks.specs import ParameterError

    if exc is None:
        return EXIT_FAILED
    if isinstance(exc, (ParameterError, ParameterTypeError)):
        return EXIT_USAGE
    if isinstance(exc, LoggingFailed):
        return EXIT_TRACKING
    if isinstance(exc, ParityFailed):
        return EXIT_PARITY
    return EXIT_FAILED


def check_parameters(params: dict) -> int:
    """The flow's own parameter rules (flows/parameters.py), before any flow starts: a bad parameter costs
    about a second and one line naming it, not a Prefect start and tracebacks."""
    from flows.parameters import ExportPlan
    from tasks.specs import ParameterError

    try:
        ExportPlan.check(params)
    except ParameterError as e:
        return _usage_error(str(e))
    return EXIT_OK


def run_flow(params: dict, as_json: bool = False) -> tuple[int, dict | None]:
    """Check the parameters, run the flow locally and print its summary: (exit code, summary or None)."""
    rc = check_parameters(params)
    if rc != EXIT_OK:
        return rc, None
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from flows.distill_export import distill_export

    try:
        state = distill_export(**params, return_state=True)
    except Exception as e:  # noqa: BLE001 - parameter binding errors surface before a state exists
        print(f"amct-export: error: {e}", file=sys.stderr)
        return _classify(e), None
    if state.is_completed():
        summary = state.result()
        if as_json:
            print(json.dumps(summary, indent=2, default=str))
        else:
            print(f"fake-quant model : {summary['fake_quant_model']}")
            print(f"deploy model     : {summary['deploy_model']}")
            print(f"record file      : {summary['record_file']}")
            print(f"manifest         : {summary['manifest']}")
            print(f"parity report    : {summary['parity_report']} ({summary['parity_summary']})")
            print(f"MLflow run       : {summary['mlflow_run_id']} at {summary['mlflow_tracking_uri']}")
            uri = summary["mlflow_tracking_uri"]
            if not uri.startswith(("http://", "https://")):
                print(f"open the MLflow UI: {tool('mlflow')} ui --backend-store-uri {uri} --port 5000, "
                      f"then {summary['mlflow_run_url']}")
            else:
                print(f"open: {summary['mlflow_run_url']}")
        return EXIT_OK, summary
    exc = state.result(raise_on_failure=False)
    exc = exc if isinstance(exc, BaseException) else None
    print(f"amct-export: run failed: {exc if exc is not None else state.message}", file=sys.stderr)
    return _classify(exc), None


def cmd_run(a: argparse.Namespace) -> int:
    return run_flow(collect_params(a), a.json)[0]


def cmd_validate_record(a: argparse.Namespace) -> int:
    from amct_core.errors import AmctError
    from amct_core.record import LayerInfo, read_record, validate_record

    try:
        if a.model or a.checkpoint:
            if not (a.model and a.checkpoint and a.input_shape):
                return _usage_error("validating against the model needs --model, --checkpoint and --input-shape")
            import tempfile

            from amct_core.stages import trace_to_file, validate_record_file
            from tasks.model import build_model, spec_inputs
            from tasks.specs import ModelSpec

            spec = ModelSpec(a.checkpoint, a.model, a.model_kwargs or {}, a.distill_config, a.input_shape,
                             a.input_dtype or "float32")
            model = build_model(spec)
            with tempfile.TemporaryDirectory() as d:
                trace_to_file(model, spec_inputs(spec), f"{d}/traced.onnx", f"{d}/record.txt", target=a.target,
                              opset_version=a.opset)
                records = validate_record_file(a.record_file, f"{d}/traced.onnx", a.target)
            how = f"checked against model {a.model} with checkpoint {a.checkpoint}"
        else:
            records = read_record(a.record_file)
            validate_record(records, {k: LayerInfo(c_out=max(1, len(r.scale_w))) for k, r in records.items()},
                            a.target, source=f"record file {a.record_file!r}")
            how = ("syntax and values only; give --model, --checkpoint and --input-shape to check it against the "
                   "model's layers and biases too")
    except AmctError as e:  # the record file: missing, a directory, unreadable, not UTF-8, unparsable, invalid
        print(f"INVALID: {e}", file=sys.stderr)
        return EXIT_INVALID
    except (ValueError, OSError) as e:  # ParameterError and friends; a model's file that cannot be read
        print(f"amct-export: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(f"OK: {a.record_file}: {len(records)} layer record(s) valid for target {a.target or 'A2'}: {how}")
    for k, r in records.items():
        print(f"  {k}: scale_d={r.scale_d:.6g} offset_d={r.offset_d} scale_w[{len(r.scale_w)}]")
    return EXIT_OK


def cmd_inspect(a: argparse.Namespace) -> int:
    if not Path(a.model_file).is_file():
        print(f"amct-export: error: {a.model_file!r} does not exist", file=sys.stderr)
        return EXIT_USAGE
    from amct_core.describe import describe_model
    from tasks.files import onnx_files

    if a.record is not None and not Path(a.record).is_file():
        print(f"amct-export: error: --record {a.record!r} does not exist", file=sys.stderr)
        return EXIT_USAGE
    from amct_core.describe import export_set
    from amct_core.export_id import MixedSetError, check_set, model_stamp, record_stamp

    try:
        facts = describe_model(a.model_file)
        facts["files"] = [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in onnx_files(a.model_file)]
    except Exception as e:  # noqa: BLE001
        print(f"INVALID: {a.model_file!r} is not a readable ONNX model: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_INVALID
    members = export_set(a.model_file, a.record)
    try:
        stamps = [record_stamp(p) if role == "record file" else model_stamp(role, p) for role, p in members]
        checked = check_set([s for s in stamps if s.role != "record file"],
                            next((s for s in stamps if s.role == "record file"), None))
    except MixedSetError as e:
        print(f"INVALID: {e}", file=sys.stderr)
        return EXIT_INVALID
    except (OSError, ValueError) as e:
        print(f"INVALID: the files of {a.model_file!r}'s export could not be read: {e}", file=sys.stderr)
        return EXIT_INVALID
    facts["export"] = {"export_id": checked.export_id, "files": [str(p) for _, p in members], "notes": checked.notes}
    if a.json:
        print(json.dumps(facts, indent=2, default=str))
        return EXIT_OK
    print(f"{facts['path']}  ({facts['kind']} model)")
    print("  opset_import: " + ", ".join(f"{o['domain'] or 'ai.onnx'}={o['version']}" for o in facts["opset_import"]))
    for io in ("inputs", "outputs"):
        for t in facts[io]:
            print(f"  {io[:-1]:6s} {t['name']}: {t['dtype']} {t['shape']}")
    print(f"  nodes: {facts['nodes']}  ops: " + ", ".join(f"{k}x{v}" for k, v in facts["op_counts"].items()))
    if facts["ascend_nodes"]:
        print("  Ascend nodes:")
        for q in facts["ascend_nodes"]:
            extra = f"scale={q.get('scale')} offset={q.get('offset')} dst_type={q.get('dst_type')}" if q["op"] == "AscendQuant" else f"param={q.get('param')}"
            print(f"    {q['op']:14s} {q['node']}  {extra}")
    if facts["fake_quant_layers"]:
        print(f"  fake-quant layers: {', '.join(facts['fake_quant_layers'])}")
    print("  initializers: " + ", ".join(f"{k}x{v}" for k, v in facts["initializer_types"].items()))
    for f in facts["files"]:
        print(f"  file {f['path']}  {f['size']} bytes  sha256 {f['sha256']}")
    ex = facts["export"]
    print(f"  export id: {ex['export_id'] or 'none'}" + (f" (the same in {', '.join(ex['files'][1:])})"
                                                          if ex["export_id"] and len(ex["files"]) > 1 else ""))
    for note in ex["notes"]:
        print(f"  note: {note}")
    return EXIT_OK


def cmd_fetch(a: argparse.Namespace) -> int:
    """Download an export from MLflow into a new or empty directory, checked against its manifest."""
    from tasks.specs import ParameterError
    from tasks.tracking import ExportMismatch, TrackingError, fetch_export

    try:
        f = fetch_export(a.uri, a.to, a.mlflow_tracking_uri)
    except ParameterError as e:
        return _usage_error(str(e).replace("parameter 'to'", "--to").replace("parameter 'uri'", "URI"))
    except ExportMismatch as e:
        print(f"INVALID: {e}", file=sys.stderr)
        return EXIT_INVALID
    except TrackingError as e:
        print(f"amct-export: error: {e}", file=sys.stderr)
        return EXIT_TRACKING
    if a.json:
        print(json.dumps({"uri": f.source, "run_id": f.run_id, "model_version": f.model_version,
                          "directory": f.directory, "files": f.files, "atc_command": f.atc_command,
                          "target": f.manifest.get("target")}, indent=2))
        return EXIT_OK
    src = f"run {f.run_id}" + (f", model version {f.model_version}" if f.model_version else "")
    n = sum(len(v) for v in f.files.values()) + 1
    print(f"fetched {f.source} ({src}) into {f.directory}: {n} files, sizes and SHA-256 match manifest.json")
    for role, label in (("deploy_model", "deploy model"), ("fake_quant_model", "fake-quant model"),
                        ("record", "record file")):
        for i, path in enumerate(f.files[role]):
            print(f"  {label if i == 0 else '  external data':17s}: {path}")
    print(f"  {'manifest':17s}: {Path(f.directory) / 'manifest.json'}")
    print(f"compile for {f.manifest.get('target', '?')} with ATC (CANN {f.manifest.get('cann', '?')}):")
    print(f"  cd {shlex.quote(f.directory)} && {f.atc_command}")
    return EXIT_OK


BATCH_EPILOG = """\
The batch file (YAML or JSON):
  defaults:            any distill-export parameter (as in `amct-export run`, names with '_'), for every export
  exports:             a list of parameter objects, each with at least checkpoint, model, input_shape, name;
                       `targets: [A2, A3, "950"]` instead of `target` makes one export per target
Every export writes to <output_dir>/<name>-<target>/. The whole file is checked before anything runs; an
error names the item and the key (exports[2].checkpoint). Example: examples/batch.yaml.

example:
  amct-export batch examples/batch.yaml --workers 2 --output-dir batch_out
  amct-export batch examples/batch.yaml --dask-address tcp://10.0.0.5:8786 --json

exit codes: 0 every export passed, 1 some failed (each named with its error; the others complete),
2 a bad batch file or argument (nothing runs), 3 the batch's MLflow run could not be started or finished
"""


def check_batch(spec: str, output_dir: str | None, overrides: dict) -> int:
    """The whole batch file checked before any cluster starts: exit code 2 and one line naming the item and
    key when it is bad."""
    from flows.batch_spec import BatchSpecError, load_batch

    try:
        load_batch(spec, output_dir, overrides)
    except BatchSpecError as e:
        return _usage_error(str(e))
    return EXIT_OK


def run_batch(spec: str, dask_address: str | None = None, n_workers: int = 2, output_dir: str | None = None,
              force: bool = False, mlflow_experiment: str | None = None, mlflow_tracking_uri: str | None = None,
              as_json: bool = False) -> tuple[int, list[dict] | None]:
    """Check the batch file, run the distill-export-batch flow, print one line per export (or --json):
    (exit code, the per-export rows or None)."""
    overrides = {k: v for k, v in (("mlflow_experiment", mlflow_experiment),
                                   ("mlflow_tracking_uri", mlflow_tracking_uri)) if v is not None}
    rc = check_batch(spec, output_dir, overrides)
    if rc != EXIT_OK:
        return rc, None
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # Dask's own INFO lines (workers starting and stopping, connections closing) for the cluster and its
    # workers, which inherit the environment: warnings and errors only (set it to info to see them)
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    from flows.batch import BatchFailed, distill_export_batch
    from flows.batch_spec import BatchSpecError
    from tasks.tracking import TrackingError

    state = distill_export_batch(spec=spec, dask_address=dask_address, n_workers=n_workers, force=force,
                                 mlflow_experiment=mlflow_experiment, mlflow_tracking_uri=mlflow_tracking_uri,
                                 output_dir=output_dir, return_state=True)
    if state.is_completed():
        rows, rc = state.result(), EXIT_OK
    else:
        exc = state.result(raise_on_failure=False)
        if isinstance(exc, BatchFailed):
            rows, rc = exc.results, EXIT_FAILED
        else:
            print(f"amct-export: batch failed: {exc if isinstance(exc, BaseException) else state.message}",
                  file=sys.stderr)
            code = (EXIT_USAGE if isinstance(exc, BatchSpecError) else
                    EXIT_TRACKING if isinstance(exc, TrackingError) else EXIT_FAILED)
            return code, None
    if as_json:
        print(json.dumps([{k: r[k] for k in ("name", "target", "status", "files", "mlflow_run_id", "output_dir",
                                             "parity", "seconds", "worker", "error")} for r in rows], indent=2))
    else:
        for r in rows:
            line = f"{r['status'].upper():6s} {r['name'] + '-' + r['target']:24s} {r['output_dir']}"
            line += f"  MLflow run {r['mlflow_run_id']}" if r["mlflow_run_id"] else ""
            print(line + (f"\n       {r['error']}" if r["error"] else ""))
        passed = sum(r["status"] == "passed" for r in rows)
        print(f"{passed} of {len(rows)} export(s) passed")
    if rc != EXIT_OK:
        print(f"amct-export: {len(rows) - sum(r['status'] == 'passed' for r in rows)} export(s) failed: "
              + ", ".join(f"exports[{r['item']}] {r['name']}-{r['target']}" for r in rows if r["status"] != "passed"),
              file=sys.stderr)
    return rc, rows


def cmd_batch(a: argparse.Namespace) -> int:
    if a.workers is not None and a.workers < 1:
        return _usage_error(f"--workers must be at least 1, got {a.workers}")
    return run_batch(a.spec, a.dask_address, a.workers or 2, a.output_dir, a.force, a.mlflow_experiment,
                     a.mlflow_tracking_uri, a.json)[0]


VERIFY_PROG = "amct-export verify"


def cmd_verify(argv: list[str]) -> int:
    """``python -m amct_core.verify`` under amct-export (its options, help and exit codes)."""
    from amct_core.verify.cli import main as verify_main

    return verify_main(argv, prog=VERIFY_PROG)


def _shape(text: str):
    return _list_parser(int)(text)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="amct-export",
        description="Export distilled checkpoints to Ascend-ready int8 ONNX (fake-quant + deploy models), check\n"
                    "them, track them in MLflow. `run` runs the Prefect flow 'distill-export' locally.",
        epilog=MAIN_EPILOG.replace("{mlflow}", tool("mlflow")), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("run", help="run the distill-export flow on a checkpoint",
                       description="Run the distill-export flow on a distilled checkpoint: load checkpoint -> trace ->\n"
                                   "record -> fake-quant and deploy models -> parity -> manifest -> MLflow log.",
                       epilog=RUN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_options(p)
    p.set_defaults(fn=cmd_run)
    p = sub.add_parser("batch", help="run many exports (checkpoints x targets) from a batch file on Dask",
                       description="Run the distill-export-batch flow: every export of a batch file, each on a Dask\n"
                                   "worker (a local cluster by default, or an existing scheduler), one failing export\n"
                                   "not stopping the others; one MLflow parent run with a child run per export.",
                       epilog=BATCH_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", metavar="SPEC", help="the batch file (.yaml, .yml or .json)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--dask-address", default=None, metavar="ADDR",
                       help="an existing Dask scheduler, e.g. tcp://10.0.0.5:8786 (default: a local cluster)")
    where.add_argument("--workers", type=int, default=None, metavar="N",
                       help="worker processes of the local cluster, one thread each (default: 2)")
    p.add_argument("--output-dir", default=None, metavar="DIR",
                   help="the batch's output directory (default: the file's defaults, else out); each export goes "
                        "to DIR/<name>-<target>/")
    p.add_argument("--force", action="store_true", help="recompute every stage even if its inputs are unchanged")
    p.add_argument("--mlflow-experiment", default=None, help="default: the file's defaults, else amct-export")
    p.add_argument("--mlflow-tracking-uri", default=None,
                   help="default: the file's defaults, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here")
    p.add_argument("--json", action="store_true", help="print the per-export results as JSON")
    p.set_defaults(fn=cmd_batch)
    # verify's own parser reads the rest of the command line (main() hands it over)
    sub.add_parser("verify", add_help=False,
                   help="check exported files on the CPU: ATC preflight, deploy simulation, parity with the torch "
                        "model (python -m amct_core.verify; see amct-export verify --help)")
    p = sub.add_parser("validate-record", help="validate a record file (FORMATS §2), optionally against the model",
                       description="Validate a record file. Alone: syntax and value rules. With --model, --checkpoint\n"
                                   "and --input-shape: also that every quantized layer has exactly one record, C_out\n"
                                   "matches and each bias fits int32.",
                       epilog="example:\n  amct-export validate-record out/model_scale_offset_record.txt --model "
                              "examples.digits:build_model \\\n      --checkpoint digits_out/student.safetensors "
                              "--distill-config digits_out/distill_config.json --input-shape 1,1,8,8\n\n"
                              "exit codes: 0 valid, 5 invalid, 2 bad arguments",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("record_file", help="the record file (scale_offset_record.txt format)")
    p.add_argument("--target", default=None, help="A2, A3 or 950: the target whose rules apply (default A2)")
    p.add_argument("--model", default=None, metavar="MODULE:CALLABLE",
                   help="package.module:callable (or path/file.py:callable) building the float model")
    p.add_argument("--model-kwargs", type=_dict_item, default=None, metavar="JSON",
                   help="keyword arguments of the callable, a JSON object")
    p.add_argument("--checkpoint", default=None, help="the distilled state_dict (.pt/.pth/.safetensors)")
    p.add_argument("--distill-config", default=None,
                   help="the distill config JSON the model was wrapped with (default: every Conv2d/Linear)")
    p.add_argument("--input-shape", type=_shape, default=None, metavar="N,C,H,W",
                   help="example input shape, e.g. 1,1,8,8; several inputs: 1,16;1,16")
    p.add_argument("--input-dtype", type=_one_or_list, default=None, metavar="A[,B]",
                   help="example input dtype (default float32); several: int64,int64")
    p.add_argument("--opset", type=int, default=None, metavar="N", help="ONNX opset of the trace (default 11)")
    p.set_defaults(fn=cmd_validate_record)
    p = sub.add_parser("inspect", help="show what is inside an exported ONNX model",
                       description="Print opsets, inputs/outputs, op counts, Ascend quant/dequant nodes, fake-quant\n"
                                   "layers, initializer types, file hashes and the export id of an ONNX model. The\n"
                                   "export's other files (the sibling model, the record file) must carry the same\n"
                                   "export id; a mixed set is reported as invalid (exit 5), naming the files and ids.",
                       epilog="example:\n  amct-export inspect out/model_deploy_model.onnx --json\n\n"
                              "exit codes: 0 ok, 5 not a readable ONNX model or a mixed set of files, 2 no such file",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_file", help="an .onnx file")
    p.add_argument("--record", default=None, help="the export's record file, checked to carry the model's export "
                                                  "id (default: <prefix>_scale_offset_record.txt when present)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(fn=cmd_inspect)
    p = sub.add_parser("fetch", help="download an export from MLflow (deploy + fake-quant models, record, manifest)",
                       description="Download what the distill-export flow logged to MLflow: the deploy model (with its\n"
                                   "external data file, if any), the fake-quant model, the record file and manifest.json,\n"
                                   "into a new or empty directory. Every file's size and SHA-256 is checked against the\n"
                                   "manifest before the directory appears; then the ATC command line is printed.",
                       epilog="URI: runs:/<run_id>, models:/<name>/<version>, models:/<name>/latest or "
                              "models:/<name>@<alias>.\n\n"
                              "example:\n  amct-export fetch models:/digits-int8/latest --to deploy "
                              "--mlflow-tracking-uri http://127.0.0.1:5001\n\n"
                              "exit codes: 0 ok, 2 bad arguments / unknown run or version / --to not empty,\n"
                              "3 tracking server unreachable, 5 not a complete export or a file differs from its\n"
                              "manifest (nothing is left in --to)",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("uri", help="runs:/<run_id> or models:/<name>/<version|latest> (or models:/<name>@<alias>)")
    p.add_argument("--to", required=True, metavar="DIR", help="a new or empty directory to put the files in")
    p.add_argument("--mlflow-tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here")
    p.add_argument("--json", action="store_true", help="print what was fetched as JSON")
    p.set_defaults(fn=cmd_fetch)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    a, rest = ap.parse_known_args(sys.argv[1:] if argv is None else argv)
    if a.command == "verify":
        return cmd_verify(rest)
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    if not getattr(a, "fn", None):
        ap.print_help()
        return EXIT_USAGE
    return a.fn(a)


if __name__ == "__main__":
    sys.exit(main())
