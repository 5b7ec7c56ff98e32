"""Parameter values shared by the stage tasks and the flow's parameter checks: the error that names a
parameter, model references, example-input specs, checkpoint URIs.

Importable without Prefect, torch or MLflow (amct_core, hence torch, is imported only when a model
reference is resolved, which imports the user's model module anyway), so the CLI checks parameters in
about a second before it starts any flow (flows/parameters.py).
"""
from __future__ import annotations

MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")


class ParameterError(ValueError):
    """A flow parameter is invalid; the message starts with the parameter's name."""

    def __init__(self, parameter: str, message: str):
        self.parameter = parameter
        super().__init__(f"parameter {parameter!r}: {message}")


DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "uint8")


def import_callable(ref: str, parameter: str = "model"):
    """Resolve ``package.module:callable`` (or ``file.py:callable``) without touching any checkpoint
    (:func:`amct_core.checkpoint.resolve_callable`, the loader's own rules)."""
    from amct_core.checkpoint import LoadError, resolve_callable

    try:
        return resolve_callable(ref)
    except LoadError as e:
        raise ParameterError(parameter, str(e)) from None


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
    """``model_ref(**model_kwargs)``: the user's float torch model (:func:`amct_core.checkpoint.build_model`).
    Raises ParameterError naming 'model' or 'model_kwargs'."""
    from amct_core.checkpoint import LoadError, build_model

    try:
        return build_model(model_ref, model_kwargs)
    except LoadError as e:
        raise ParameterError(e.what, str(e)) from None
