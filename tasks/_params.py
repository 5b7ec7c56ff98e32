"""Parameter values shared by the stage tasks and the flow's parameter checks: the error that names a
parameter, model references, example-input specs, checkpoint URIs.

Importable without Prefect, torch or MLflow (torch is imported only inside :func:`make_float_model`), so
the CLI checks parameters in about a second before it starts any flow (flows/parameters.py).
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path

MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")


class ParameterError(ValueError):
    """A flow parameter is invalid; the message starts with the parameter's name."""

    def __init__(self, parameter: str, message: str):
        self.parameter = parameter
        super().__init__(f"parameter {parameter!r}: {message}")


DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "uint8")


def import_callable(ref: str, parameter: str = "model"):
    """Resolve ``package.module:callable`` (or ``file.py:callable``) without touching any checkpoint."""
    if not isinstance(ref, str) or ref.count(":") != 1:
        raise ParameterError(parameter, f"{ref!r} must look like 'package.module:callable' (or 'path/file.py:callable')")
    mod_name, attr = ref.split(":")
    if not mod_name or not attr:
        raise ParameterError(parameter, f"{ref!r} must look like 'package.module:callable'")
    try:
        if mod_name.endswith(".py") or os.sep in mod_name:
            path = Path(mod_name).resolve()
            if not path.is_file():
                raise ParameterError(parameter, f"{ref!r}: file {str(path)!r} does not exist")
            name = "amct_user_model_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
            module = sys.modules.get(name)
            if module is None:
                spec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module
                spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.append(os.getcwd())
            module = importlib.import_module(mod_name)
    except ParameterError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ParameterError(parameter, f"{ref!r}: module {mod_name!r} does not import: {type(e).__name__}: {e}") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ParameterError(parameter, f"{ref!r}: module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ParameterError(parameter, f"{ref!r}: {attr!r} is not callable")
    return obj


def input_list(shape, dtype) -> list[tuple[list[int], str]]:
    """[(shape, dtype)] per model input from ``input_shape`` (one shape or a list of shapes) and ``input_dtype``
    (one dtype for all, or one per input). Raises ParameterError naming the parameter."""
    if isinstance(shape, (list, tuple)) and shape and all(isinstance(s, (list, tuple)) for s in shape):
        shapes = [list(s) for s in shape]
    else:
        shapes = [list(shape) if isinstance(shape, (list, tuple)) else shape]
    for s in shapes:
        if not isinstance(s, list) or not s or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in s):
            raise ParameterError("input_shape", f"must be a non-empty list of positive ints such as [1, 1, 8, 8] "
                                                f"(or a list of such lists, one per input), got {shape!r}")
    dtypes = list(dtype) if isinstance(dtype, (list, tuple)) else [dtype] * len(shapes)
    if len(dtypes) != len(shapes):
        raise ParameterError("input_dtype", f"gives {len(dtypes)} dtypes for {len(shapes)} inputs: {dtype!r}")
    for d in dtypes:
        if d not in DTYPES:
            raise ParameterError("input_dtype", f"{d!r} is not one of {list(DTYPES)}")
    return list(zip(shapes, dtypes))

def is_mlflow_uri(checkpoint: str) -> bool:
    return str(checkpoint).startswith(MLFLOW_SCHEMES)


def make_float_model(model_ref: str, model_kwargs: dict | None):
    """``model_ref(**model_kwargs)``: the user's float torch model. Raises ParameterError naming 'model' or
    'model_kwargs'."""
    import torch

    factory = import_callable(model_ref, "model")
    try:
        model = factory(**(model_kwargs or {}))
    except Exception as e:  # noqa: BLE001
        raise ParameterError("model_kwargs", f"{model_ref}(**{model_kwargs!r}) failed: {type(e).__name__}: {e}") from None
    if not isinstance(model, torch.nn.Module):
        raise ParameterError("model", f"{model_ref} returned a {type(model).__name__}, not a torch.nn.Module")
    return model
