"""Rules for the export's arguments that need neither torch nor ONNX: graph names and output directories.

``save_distill_model`` and the stages apply them, and so does the pipeline's parameter check before it
starts anything (it can refuse a bad name or directory without loading torch). Each raises ExportError
whose message starts with the argument's name.
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import ExportError


def check_names(names, what: str, count: int | None = None, counted: str = "tensors") -> list[str] | None:
    """``names`` (graph input or output names): None, or a list of distinct non-empty strings, at most
    ``count`` of them when ``count`` is given (the number of the model's ``counted``). Returns them as a list."""
    if names is None:
        return None
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n for n in names):
        raise ExportError(f"{what} must be a list of non-empty strings, got {names!r}")
    if len(set(names)) != len(names):
        raise ExportError(f"{what} has duplicates: {names!r}")
    if count is not None and len(names) > count:
        raise ExportError(f"{what} has {len(names)} names but the model has {count} {counted}")
    return list(names)


def check_output_dir(directory, what: str) -> None:
    """Raise ExportError unless ``directory`` exists as a writable directory or could be created."""
    d = Path(os.path.abspath(directory))
    probe = d
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise ExportError(f"{what}: cannot create directory {str(d)!r}: {str(probe)!r} exists and is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ExportError(f"{what}: cannot create or write directory {str(d)!r}: {str(probe)!r} is not writable")
