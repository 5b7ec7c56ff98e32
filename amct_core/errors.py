"""Exceptions raised by amct_core. Every message names the thing that is wrong and what is expected."""


class AmctError(Exception):
    """Base class of every error amct_core raises on purpose."""


class ConfigError(AmctError, ValueError):
    """A distill config (JSON or simple config) is malformed; the message names the key."""


class RecordError(AmctError, ValueError):
    """A record file fails validation; the message names the layer and the field."""


class DistillError(AmctError, ValueError):
    """distill() refused its arguments or could not run; the message names what is wrong."""


class ExportError(AmctError, ValueError):
    """save_distill_model refused its input; nothing was written."""


class TargetError(AmctError, ValueError):
    """Unknown target, or an opset outside the target's range."""
