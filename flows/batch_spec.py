"""The batch file of ``distill-export-batch``: read it, expand it, check all of it before any work.

A batch file is YAML or JSON (JSON is YAML, so one reader takes both)::

    defaults:                 # any distill-export parameter, for every item
      model: examples.digits:build_model
      input_shape: [1, 1, 8, 8]
      output_dir: batch_out
    exports:                  # one parameter object per export (checkpoint, model, input_shape, name at least)
      - name: digits
        checkpoint: digits_out/student.safetensors
        targets: [A2, A3, "950"]  # instead of target: one export per target
      - name: mlp
        ...

Every export of a batch writes to its own directory, ``<output_dir>/<name>-<target>/`` (the item's
``output_dir``, else the defaults', else the caller's, else the flow's default), so two exports never
share a manifest, a parity report or intermediates; ``(name, target)`` is unique in a batch. Relative
paths are relative to the working directory, as in the flow's parameters.

Each expanded export is checked by :meth:`flows.parameters.ExportPlan.check`, the single export's own
rules (nothing is re-implemented here); its error is re-worded to name the batch file, the item's index
and the key (``exports[2].checkpoint``, or ``defaults.opset`` when the value came from the defaults).
Importable without Prefect, so the CLI refuses a bad file in seconds, before any cluster starts.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.parameters import ExportPlan, flow_parameters
from tasks.specs import ParameterError

ITEM_REQUIRED = ("checkpoint", "model", "input_shape", "name")
TOP_KEYS = ("defaults", "exports")
BATCH_WIDE = ("mlflow_experiment", "mlflow_tracking_uri")  # one parent run: its children in its experiment


class BatchSpecError(ValueError):
    """The batch file is invalid; the message names the file, the item (``exports[i]``) and the key."""

    def __init__(self, where: str, message: str, source: str = "batch"):
        self.where = where  # e.g. "exports[2].checkpoint", "defaults.opset", "exports"
        self.source = source
        super().__init__(f"{source}: {where}: {message}")


@dataclass(frozen=True)
class BatchItem:
    """One export of a batch: the item it came from, its target, its checked plan."""

    index: int  # position in ``exports``
    name: str
    target: str
    plan: ExportPlan

    @property
    def key(self) -> str:
        """``<name>-<target>``: unique in a batch; the export's directory name and its MLflow child run key."""
        return f"{self.name}-{self.target}"

    @property
    def output_dir(self) -> str:
        return self.plan.files.output_dir


def read_batch_file(path: str | Path) -> dict:
    """The batch file's content (YAML or JSON). Raises BatchSpecError naming the file."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise BatchSpecError("file", f"{str(p)!r} does not exist (give a YAML or JSON batch file)", str(p))
    text = p.read_text()
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise BatchSpecError("file", f"is not valid {'JSON' if p.suffix == '.json' else 'YAML'}: {e}", str(p)) from None
    return data


def _target_list(where: str, targets) -> list[str]:
    from amct_core.errors import TargetError
    from amct_core.targets import get_target

    if not isinstance(targets, list) or not targets:
        raise ParameterError("targets", f"must be a non-empty list such as [A2, A3, \"950\"], got {targets!r}")
    names = []
    for t in targets:
        try:
            names.append(get_target(str(t)).name)
        except TargetError as e:
            raise ParameterError("targets", str(e)) from None
    dup = sorted({t for t in names if names.count(t) > 1})
    if dup:
        raise ParameterError("targets", f"lists {dup[0]} twice: {targets!r}")
    return names


def load_batch(spec: str | Path | Mapping | Any, output_dir: str | None = None,
               overrides: Mapping[str, Any] | None = None) -> list[BatchItem]:
    """Every export of the batch ``spec`` (a file path, or the file's structure inline), checked.

    ``output_dir`` replaces ``defaults.output_dir`` (an item's own ``output_dir`` still wins);
    ``overrides`` (e.g. ``force``, ``mlflow_experiment``) replace the value of every item and of the defaults.
    Raises BatchSpecError naming the first bad item and key; nothing is run or written."""
    is_file = isinstance(spec, (str, Path))
    source = str(spec) if is_file else "batch"
    data = read_batch_file(spec) if is_file else spec

    def fail(where: str, message: str):
        return BatchSpecError(where, message, source)

    if not isinstance(data, Mapping):
        raise fail("file", f"must be a mapping with keys {list(TOP_KEYS)}, got {type(data).__name__}")
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        raise fail(str(unknown[0]), f"is not a key of a batch file; its keys are {list(TOP_KEYS)}")
    declared = [p.name for p in flow_parameters()]
    defaults = dict(data.get("defaults") or {})
    if not isinstance(data.get("defaults") or {}, Mapping):
        raise fail("defaults", f"must be a mapping of distill-export parameters, got {data['defaults']!r}")
    for k in defaults:
        if k not in declared:
            raise fail(f"defaults.{k}", f"is not a parameter of distill-export; its parameters are {declared}")
    exports = data.get("exports")
    if not isinstance(exports, list) or not exports:
        raise fail("exports", "must be a non-empty list of exports (each a mapping with at least "
                              f"{', '.join(ITEM_REQUIRED)})")
    if output_dir is not None:
        defaults["output_dir"] = output_dir
    defaults.update(overrides or {})

    items: list[BatchItem] = []
    seen: dict[tuple[str, str], int] = {}
    for i, item in enumerate(exports):
        at = f"exports[{i}]"
        if not isinstance(item, Mapping):
            raise fail(at, f"must be a mapping of distill-export parameters, got {item!r}")
        for k in item:
            if k not in declared and k != "targets":
                raise fail(f"{at}.{k}", f"is not a parameter of distill-export (nor 'targets'); its parameters "
                                        f"are {declared}")
        for k in ITEM_REQUIRED:
            if k not in item and k not in defaults:
                raise fail(f"{at}.{k}", "is required (in the item or in defaults)")
        for k in BATCH_WIDE:
            if k in item:
                raise fail(f"{at}.{k}", "is the batch's, not an export's: a batch logs to one MLflow experiment "
                                        "and store (give it in defaults or as the flow's parameter)")
        if "targets" in item and "target" in item:
            raise fail(f"{at}.targets", "and 'target' are both given: give one target, or a list of targets")
        given = {**defaults, **{k: v for k, v in item.items() if k != "targets"}, **(overrides or {})}
        try:
            targets = _target_list(at, item["targets"]) if "targets" in item else [given.get("target", "A2")]
        except ParameterError as e:
            raise fail(f"{at}.targets", str(e).removeprefix("parameter 'targets': ")) from None
        base = given.get("output_dir", next(p.default for p in flow_parameters() if p.name == "output_dir"))
        for target in targets:
            params = dict(given, target=target)
            name = params.get("name")
            if isinstance(name, str) and name and isinstance(base, str) and base:
                params["output_dir"] = str(Path(base) / f"{name}-{target}")
            try:
                plan = ExportPlan.check(params)
            except ParameterError as e:
                key = "targets" if e.parameter == "target" and "targets" in item else e.parameter
                where = f"{at}.{key}" if key in item or key not in defaults else f"defaults.{key} (in {at})"
                raise fail(where, str(e).removeprefix(f"parameter {e.parameter!r}: ")) from None
            key = (plan.files.name, plan.graph.target)
            if key in seen:
                raise fail(f"{at}.name", f"{key[0]!r} for target {key[1]} is also exports[{seen[key]}]'s: each "
                                         f"(name, target) of a batch is one export, in <output_dir>/{key[0]}-{key[1]}/")
            seen[key] = i
            items.append(BatchItem(i, plan.files.name, plan.graph.target, plan))
    return items
