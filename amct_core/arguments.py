"""Rules for the export's arguments that need neither torch nor ONNX: graph names, paths and output directories.

``save_distill_model`` and the stages apply them, and so does the pipeline's parameter check before it
starts anything (it can refuse a bad name or directory without loading torch). Each raises ExportError
whose message starts with the argument's name.
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import ExportError

NAME_MAX = 255  # bytes in one file name (ext4, xfs, btrfs, tmpfs, APFS)
# A writer derives file names from an output's name: its temporary file ``.<name>.<8 random>.tmp``, its external
# data file ``<name>.<8 hex>.data``. An output's name leaves them this many bytes below NAME_MAX.
DERIVED_NAME_BYTES = 16
OUTPUT_NAME_MAX = NAME_MAX - DERIVED_NAME_BYTES


def check_path(path, what: str) -> None:
    """Raise ExportError naming ``what`` when ``path`` holds a NUL byte or a component longer than NAME_MAX
    bytes: no file system takes either, and the OS error would come late and name a temporary file."""
    text = os.fspath(path)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if "\x00" in text:
        raise ExportError(f"{what} {text!r} holds a NUL byte (\\x00), which no file path may contain")
    for part in Path(text).parts:
        n = len(os.fsencode(part))
        if n > NAME_MAX:
            raise ExportError(f"{what}: the path component {_cut(part)!r} has {n} bytes; a file or directory name "
                              f"may have at most {NAME_MAX}")


def check_output_file(path, what: str) -> None:
    """:func:`check_path`, and the file's own name at most OUTPUT_NAME_MAX bytes (its writer's temporary and
    data files add up to DERIVED_NAME_BYTES). ``path`` is the file as written, suffixes included."""
    check_path(path, what)
    name = Path(os.fspath(path)).name
    n = len(os.fsencode(name))
    if n > OUTPUT_NAME_MAX:
        raise ExportError(f"{what}: the output file name {_cut(name)!r} has {n} bytes; an output file name may have "
                          f"at most {OUTPUT_NAME_MAX} (the file system's {NAME_MAX}, less {DERIVED_NAME_BYTES} for its "
                          "temporary and external-data files): give a shorter name")


def _cut(text: str, keep: int = 24) -> str:
    return text if len(text) <= 2 * keep + 3 else f"{text[:keep]}...{text[-keep:]}"


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
