"""The torch model a stage needs, rebuilt from a :class:`~tasks.specs.ModelSpec` and memoised per process.

Stages hand each other paths and small records only. A stage that needs the torch model rebuilds it
from its spec (checkpoint path + model reference + distill config + example input) with
:func:`amct_core.checkpoint.load_distilled_model`; the rebuild is memoised, so a flow that runs its stages
in one process builds it once, and the flow gives its memory back between the stages that need it
(:func:`release_weights`, :func:`release_models`).
"""
from __future__ import annotations

import gc
import hashlib
import inspect
import json
import os
from dataclasses import asdict
from typing import Any

from .files import sha256_file
from .specs import ModelSpec, ParameterError, import_callable, input_list

# spec key -> (model, checkpoint file its weights are mapped from, that file's identity when it was mapped)
_MODELS: dict[str, tuple[Any, str, tuple]] = {}


def model_source_sha256(model_ref: str) -> str:
    """Hash of the source file defining the model callable (a changed model definition re-runs the stages)."""
    obj = import_callable(model_ref, "model")
    try:
        src = inspect.getsourcefile(obj)
        return sha256_file(src) if src else hashlib.sha256(model_ref.encode()).hexdigest()
    except (TypeError, OSError):
        return hashlib.sha256(model_ref.encode()).hexdigest()


def example_input(shape: list[int], dtype: str, seed: int = 0):
    """The example input (one tensor) from its shape and dtype, seeded: N(0,1) for floats, 0..9 for ints."""
    import torch

    g = torch.Generator().manual_seed(int(seed))
    tdt = getattr(torch, dtype)
    if tdt.is_floating_point:
        return torch.randn(*shape, generator=g, dtype=torch.float32).to(tdt)
    return torch.randint(0, 10, tuple(shape), generator=g, dtype=tdt)


def spec_inputs(spec: ModelSpec) -> tuple:
    """The example inputs (a tuple, one tensor per model input), seeded: input i uses seed + 1000 * i."""
    return tuple(example_input(s, d, spec.seed + 1000 * i)
                 for i, (s, d) in enumerate(input_list(spec.input_shape, spec.input_dtype)))


def _file_identity(path: str) -> tuple:
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


def spec_key(spec: ModelSpec) -> str:
    d = asdict(spec)
    d["checkpoint_sha256"] = sha256_file(spec.checkpoint)
    if spec.distill_config:
        d["distill_config_sha256"] = sha256_file(spec.distill_config)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def build_model(spec: ModelSpec):
    """The distilled model in eval mode (:func:`amct_core.checkpoint.load_distilled_model`), memoised per
    process until :func:`release_models`.

    Raises ParameterError naming 'model', 'model_kwargs', 'distill_config' or 'checkpoint'.
    """
    from amct_core.checkpoint import LoadError, load_distilled_model

    key = spec_key(spec)
    if key in _MODELS:
        return _MODELS[key][0]
    release_models()  # keep one model alive at a time
    try:
        model = load_distilled_model(spec.model, spec.checkpoint, spec.distill_config, spec_inputs(spec),
                                     model_kwargs=spec.model_kwargs)
    except LoadError as e:
        raise ParameterError(e.what, str(e)) from None
    _MODELS[key] = (model, spec.checkpoint, _file_identity(spec.checkpoint))
    return model


def release_weights() -> None:
    """Give back the memory of the memoised model's weights that stages have read, and keep the model.

    Its weights are memory-mapped from the checkpoint; once read they stay resident while mapped. Mapping
    them afresh (untouched, so not resident) gives those pages back at once and costs no rebuild; a later
    stage reads again only what it uses. The flow calls this between the stages that need the model."""
    from amct_core.checkpoint import load_state_into, read_state_dict

    for model, checkpoint, identity in _MODELS.values():
        try:
            unchanged = _file_identity(checkpoint) == identity
        except OSError:  # the file is gone: nothing to map afresh
            unchanged = False
        if unchanged:
            load_state_into(model, read_state_dict(checkpoint))
    gc.collect()


def release_models() -> None:
    """Forget the memoised model, its weights' memory given back first: something may still hold the
    modules (in a Prefect flow run, the modules outlive the memo; measured with bench.large), and mapped
    afresh their weights cost nothing until read."""
    release_weights()
    _MODELS.clear()
    gc.collect()
