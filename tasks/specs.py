"""What the stages are given, as plain values: the model to rebuild, the graph to export, where to track
it; and the error that names a flow parameter.

Importable without Prefect, torch or MLflow (amct_core, hence torch, is imported only when a model
reference is resolved, which imports the user's model module anyway), so the CLI checks parameters in
about a second before it starts any flow (flows/parameters.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")
DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "uint8")


class ParameterError(ValueError):
    """A flow parameter is invalid; the message starts with the parameter's name."""

    def __init__(self, parameter: str, message: str):
        self.parameter = parameter
        self.message = message
        super().__init__(f"parameter {parameter!r}: {message}")

    def __reduce__(self):  # a task's error crosses processes pickled: rebuilt from both arguments
        return type(self), (self.parameter, self.message)

    @classmethod
    def of(cls, parameter: str, error: Exception) -> "ParameterError":
        """The error of a library rule, blamed on ``parameter`` (its name is not repeated when the library's
        message starts with it: ``input_names has duplicates`` -> ``parameter 'input_names': has duplicates``)."""
        message = str(error)
        if message.startswith(parameter):
            message = message[len(parameter):].removeprefix(":").lstrip()
        return cls(parameter, message)


@dataclass
class ModelSpec:
    """Everything needed to rebuild the distilled torch model, as plain values."""

    checkpoint: str  # a local file (or, before the first stage resolves it, an MLflow URI)
    model: str  # "package.module:callable" or "path/to/file.py:callable"
    model_kwargs: dict = field(default_factory=dict)
    distill_config: str | None = None  # JSON distill config (None: every Conv2d/Linear, default config)
    input_shape: list = field(default_factory=list)  # [1, 3, 8, 8], or one shape per input: [[1, 3, 8, 8], [1, 4]]
    input_dtype: str | list[str] = "float32"  # one dtype, or one per input
    seed: int = 0
    model_source_sha256: str = ""  # of the file defining the callable: a changed definition re-runs the stages

    def inputs(self) -> list[tuple[list[int], str]]:
        """[(shape, dtype)] per model input."""
        return input_list(self.input_shape, self.input_dtype)


@dataclass(frozen=True)
class GraphSpec:
    """The exported graph's target, opset, names and dynamic axes (``save_distill_model``'s arguments)."""

    target: str
    opset: int
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict | None = None  # name -> {axis: dimension name}


@dataclass(frozen=True)
class TrackingSpec:
    """Where and how an export is logged to MLflow."""

    experiment: str = "amct-export"
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else ./mlflow.db
    artifact_location: str | None = None  # of an experiment the logging creates
    registered_model_name: str | None = None
    metrics: dict = field(default_factory=dict)  # the caller's own figures, logged with the run
    retries: int = 3
    retry_delay_seconds: float = 2.0  # the first delay; doubled for each retry
    parent_run_id: str | None = None  # a batch's MLflow run: the export's run is nested under it
    batch_item: str | None = None  # the export's key in that batch (``<name>-<target>``), tagged on its run


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
    return list(zip(shapes, dtypes, strict=True))


def is_mlflow_uri(checkpoint: str) -> bool:
    return str(checkpoint).startswith(MLFLOW_SCHEMES)


def import_callable(ref: str, parameter: str = "model"):
    """Resolve ``package.module:callable`` (or ``file.py:callable``) without touching any checkpoint
    (:func:`amct_core.checkpoint.resolve_callable`, the loader's own rules)."""
    from amct_core.checkpoint import LoadError, resolve_callable

    try:
        return resolve_callable(ref)
    except LoadError as e:
        raise ParameterError(parameter, str(e)) from None


def make_float_model(model_ref: str, model_kwargs: dict | None):
    """``model_ref(**model_kwargs)``: the user's float torch model (:func:`amct_core.checkpoint.build_model`).
    Raises ParameterError naming 'model' or 'model_kwargs'."""
    from amct_core.checkpoint import LoadError, build_model

    try:
        return build_model(model_ref, model_kwargs)
    except LoadError as e:
        raise ParameterError(e.what, str(e)) from None
