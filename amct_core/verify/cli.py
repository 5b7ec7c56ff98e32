"""``python -m amct_core.verify`` (also ``amct-export verify``): ATC preflight, deploy simulation and
(optionally) torch parity on files given by path. Exits 0 when every check passes, 1 when one fails, 2 on
a usage error."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..formats import DEPLOY_MODEL, FAKE_QUANT_MODEL, RECORD_FILE, output_file

EXIT_PASS, EXIT_FAIL, EXIT_USAGE = 0, 1, 2

_EPILOG = """\
examples:
  # the two files save_distill_model wrote for save_path ./out/resnet
  {prog} ./out/resnet --report-dir ./out/verify

  # explicit files, target, inputs from an .npz (keys = graph input names, or arr_0, arr_1, ...)
  {prog} --deploy d.onnx --fake-quant f.onnx --target 950 --inputs batch.npz

  # a model exported with dynamic H and W, checked at 48x40 (default: the size it was exported at)
  {prog} ./out/unet --dim inputs_dynamic_axes_2=48 --dim inputs_dynamic_axes_3=40

  # the record file too: all three files must carry one export id
  {prog} ./out/resnet --record ./out/records.txt

  # preflight only (any deploy model, ours or AMCT's)
  {prog} --deploy resnet_deploy_model.onnx

  # with torch parity, loading the model as the distill-export flow does: the float model's callable,
  # the distill config it was wrapped with and the distilled state_dict (.pt or .safetensors)
  {prog} ./out/resnet --model mypkg.models:resnet50 --distill-config distill.json \
      --checkpoint student.safetensors

  # a callable that returns the distilled model itself (weights loaded by it, or from --checkpoint)
  {prog} ./out/resnet --model mypkg.models:build_distilled

exit status: 0 all checks passed, 1 a check failed (the summary names the worst layer and the
figure), 2 usage error (missing file, bad option).
"""


PROG = "python -m amct_core.verify"


def _parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Check exported models on a CPU: ATC preflight of the deploy model (FORMATS §5/§6),\n"
                    "simulation of the deploy model against the fake-quant model (int32 accumulators must be\n"
                    "equal), and optionally parity of the fake-quant model with the torch model.",
        epilog=_EPILOG.replace("{prog}", prog), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="*", help=f"ONNX files (*{DEPLOY_MODEL} / *{FAKE_QUANT_MODEL}) or a save_path "
                                           "prefix such as ./out/resnet")
    p.add_argument("--deploy", help=f"deploy model (*{DEPLOY_MODEL})")
    p.add_argument("--fake-quant", help=f"fake-quant model (*{FAKE_QUANT_MODEL})")
    p.add_argument("--record", help="the record file of the export; checked to come from the same export as the "
                                    "models (default, with a save_path prefix: <prefix>_scale_offset_record.txt when "
                                    "it exists)")
    p.add_argument("--target", default=None, help="A2 (default), A3 or 950: the opset range preflight accepts")
    p.add_argument("--inputs", help=".npz with the model inputs (default: seeded random inputs from the graph's shapes)")
    p.add_argument("--dim", action="append", default=[], metavar="NAME=N",
                   help="size of a symbolic input dimension for generated inputs (repeatable; default: the "
                        "export's size recorded in the file, else 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of generated inputs (default 0)")
    p.add_argument("--model", help="package.module:callable (or path/file.py:callable) returning the float torch model "
                                   "(or the distilled one); enables parity")
    p.add_argument("--model-kwargs", metavar="JSON", help="keyword arguments of --model's callable, a JSON object")
    p.add_argument("--checkpoint", help="the distilled model's state_dict (.pt via torch.save, or .safetensors): never "
                                        "executed, memory-mapped; 'module.' prefixes of DataParallel are stripped")
    p.add_argument("--distill-config", help="the distill config JSON the model was wrapped with (default: every "
                                            "Conv2d/Linear the forward calls); needs --checkpoint")
    p.add_argument("--tolerances", help="JSON file with tolerance overrides (see docs/VERIFY.md)")
    p.add_argument("--tol", action="append", default=[], metavar="NAME=VALUE", help="one tolerance override (repeatable)")
    p.add_argument("--report-dir", help="write verify_report.json / .html / _layers.png here")
    p.add_argument("--report-name", default="verify_report", help="base name of the report files")
    p.add_argument("--json", action="store_true", help="print the whole JSON report to stdout")
    return p


def _record_beside(paths: list[str]) -> str | None:
    """The flow's record file of a save_path prefix among ``paths`` (``<prefix>_scale_offset_record.txt``)."""
    for s in paths:
        if not Path(s).is_file():
            r = output_file(s, RECORD_FILE)
            if r.is_file():
                return str(r)
    return None


def _classify(paths: list[str]) -> tuple[str | None, str | None]:
    deploy = fake = None
    for s in paths:
        path = Path(s)
        if path.is_file():
            if path.name.endswith(FAKE_QUANT_MODEL):
                fake = str(path)
            elif path.name.endswith(DEPLOY_MODEL):
                deploy = str(path)
            else:
                raise SystemExit(_usage(f"cannot tell whether {s!r} is a deploy or a fake-quant model (name ends in "
                                        f"neither {DEPLOY_MODEL!r} nor {FAKE_QUANT_MODEL!r}); use --deploy / "
                                        "--fake-quant"))
        else:
            d, f = output_file(s, DEPLOY_MODEL), output_file(s, FAKE_QUANT_MODEL)
            if not d.is_file() and not f.is_file():
                raise SystemExit(_usage(f"{s!r} is neither a file nor a save_path prefix with "
                                        f"{d.name} / {f.name} next to it"))
            deploy = str(d) if d.is_file() else deploy
            fake = str(f) if f.is_file() else fake
    return deploy, fake


def _usage(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return EXIT_USAGE


def _parse_value(v: str):
    if v.lower() in ("none", "null"):
        return None
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


def _parse_dims(items: list[str]) -> dict[str, int]:
    dims = {}
    for kv in items:
        k, sep, v = kv.partition("=")
        if not sep or not k.strip() or not v.strip().isdigit() or int(v) < 1:
            raise ValueError(f"--dim {kv!r}: expected NAME=N with N a positive integer, e.g. --dim batch=4")
        dims[k.strip()] = int(v)
    return dims


def _check_dims(path: str, dims: dict[str, int]) -> None:
    """Every --dim names a symbolic dimension of the model's inputs (no tensor is read)."""
    from ._graph import load_model
    from ._run import symbolic_dims
    symbolic_dims(load_model(path), dims)


_FLAGS = {"model": "--model", "model_kwargs": "--model-kwargs", "distill_config": "--distill-config",
          "checkpoint": "--checkpoint"}


def _torch_model(args, fake: str, inputs, seed: int, dims: dict):
    """The torch model for parity, loaded as the distill-export flow loads it (amct_core.checkpoint)."""
    import numpy as np
    import torch

    from ..checkpoint import build_model, load_distilled_model
    from ._graph import load_model
    from ._run import generate_inputs

    kwargs = json.loads(args.model_kwargs) if args.model_kwargs else None
    if kwargs is not None and not isinstance(kwargs, dict):
        raise ValueError(f"--model-kwargs must be a JSON object, got {args.model_kwargs!r}")
    if not args.checkpoint:
        return build_model(args.model, kwargs).eval()
    if inputs is None:  # what the default distill config is built from: the graph's inputs, seeded
        inputs = list(generate_inputs(load_model(fake), seed=seed, dims=dims).values())
    values = inputs.values() if isinstance(inputs, dict) else inputs
    example = tuple(torch.from_numpy(np.asarray(v)) for v in values)
    return load_distilled_model(args.model, args.checkpoint, args.distill_config, example, model_kwargs=kwargs)


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    args = _parser(prog).parse_args(argv)
    try:
        deploy, fake = _classify(args.paths)
    except SystemExit as e:
        return int(e.code)
    deploy = args.deploy or deploy
    fake = args.fake_quant or fake
    record = args.record or _record_beside(args.paths)
    for what, p in (("--deploy", deploy), ("--fake-quant", fake), ("--record", record)):
        if p is not None and not Path(p).is_file():
            return _usage(f"{what} {p!r} does not exist")
    if deploy is None and fake is None:
        return _usage("give a deploy model and/or a fake-quant model (paths, a save_path prefix, or --deploy/--fake-quant)")
    tol = {}
    try:
        if args.tolerances:
            tol.update(json.loads(Path(args.tolerances).read_text()))
        for kv in args.tol:
            k, _, v = kv.partition("=")
            tol[k.strip()] = _parse_value(v.strip())
        from ..targets import get_target
        from .tolerances import Tolerances
        Tolerances.from_dict(tol)
        get_target(args.target)
        dims = _parse_dims(args.dim)
    except (ValueError, OSError, TypeError) as e:
        return _usage(str(e))
    if dims and args.inputs:
        return _usage("--dim sizes generated inputs; with --inputs the inputs' own shapes are used")
    if dims:
        try:
            _check_dims(fake or deploy, dims)
        except ValueError as e:
            return _usage(f"--dim: {e}")
    inputs = None
    if args.inputs:
        import numpy as np
        try:
            with np.load(args.inputs) as z:
                keys = list(z.keys())
                inputs = [z[k] for k in keys] if all(k.startswith("arr_") for k in keys) else {k: z[k] for k in keys}
        except OSError as e:
            return _usage(f"--inputs {args.inputs!r}: {e}")
    torch_model = None
    if args.model:
        if fake is None:
            return _usage("--model needs the fake-quant model")
        if args.distill_config and not args.checkpoint:
            return _usage("--distill-config needs --checkpoint (the distilled weights)")
        from ..checkpoint import LoadError
        try:
            torch_model = _torch_model(args, fake, inputs, args.seed, dims)
        except LoadError as e:
            return _usage(f"{_FLAGS.get(e.what, e.what)}: {e}")
        except (ValueError, OSError) as e:
            return _usage(str(e))
    elif args.checkpoint or args.distill_config or args.model_kwargs:
        return _usage("--checkpoint, --distill-config and --model-kwargs need --model")
    from . import verify
    try:
        report, paths = verify(deploy=deploy, fake_quant=fake, torch_model=torch_model, inputs=inputs,
                               target=args.target, seed=args.seed, dims=dims, tolerances=tol or None,
                               report_dir=args.report_dir, report_name=args.report_name, record=record)
    except Exception as e:  # noqa: BLE001 - e.g. unknown target
        return _usage(f"{type(e).__name__}: {e}")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(report["summary"])
        file_set = report.get("file_set") or {}
        if report["verdict"] == "pass" and file_set:  # a failure stays one line (the set is in the JSON report)
            print(f"  files: {file_set['message']}")
            for note in file_set["notes"]:
                print(f"  note: {note}")
        pf = report.get("preflight")
        if pf:
            for f in pf["findings"]:
                print(f"  preflight [{f['severity']}] {f['code']} at {f['node']}: {f['message']}; expected {f['expected']}")
        if paths is not None:
            print(f"report: {paths.html}")
    return EXIT_PASS if report["verdict"] == "pass" else EXIT_FAIL

