"""One export id in every file of one export, so that a mixed set of files cannot go unnoticed.

Three files cannot be replaced atomically together: a kill between two renames leaves new and old
files side by side. Each export therefore stamps one id (a uuid4 as 32 hex digits) into all of them,
and every reader of a set compares them:

* both models: ``metadata_props`` ``amct.export_id`` (:mod:`amct_core.onnx.metadata`), and
  ``amct.record_sha256``, the SHA-256 of the content of the record file the model was built from;
* the record file: a first line ``# amct.export_id: <id>``, a protobuf text-format comment, which
  every text-format reader (AMCT's too) skips; the rest of the file is exactly what it was before.

The record's content is the file without its leading ``# amct.`` lines, so no file contains its own
hash, and checking a set reads the record (small) and the models' metadata (no graph, no tensor):
it costs the same for a multi-GB model as for a small one. A model's weights are not hashed into the
set; the deploy simulation of ``verify`` compares the two models layer by layer, and the flow's
``manifest.json`` holds the SHA-256 of every file.

Files without an id (AMCT's own, or exports older than the id) are accepted; :func:`check_set` says
so in a note. Files whose ids differ, or a record whose content is not the one the models were built
from, make :func:`check_set` raise :class:`MixedSetError` naming the files and both ids.
"""
from __future__ import annotations

import hashlib
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ExportError

RECORD_HEADER_PREFIX = b"# amct."
RECORD_ID_KEY = "amct.export_id"
_ID_RE = re.compile(r"[0-9a-f]{32}")
_HEADER_LINE = re.compile(rb"# (amct\.[a-z_0-9]+): ?([^\r\n]*)\r?\n?")


class MixedSetError(ExportError):
    """Files that should come from one export come from different ones; the message names them and their ids."""


def new_export_id() -> str:
    return uuid.uuid4().hex


def record_header(export_id: str) -> str:
    """The header line of a record file of export ``export_id``."""
    if not _ID_RE.fullmatch(export_id):
        raise ValueError(f"export id must be 32 lowercase hex digits, got {export_id!r}")
    return f"# {RECORD_ID_KEY}: {export_id}\n"


def split_record(data: bytes) -> tuple[dict[str, str], bytes]:
    """The ``# amct.`` header entries at the top of a record file's bytes, and the content after them."""
    header: dict[str, str] = {}
    pos = 0
    while data.startswith(RECORD_HEADER_PREFIX, pos):
        m = _HEADER_LINE.match(data, pos)
        if m is None:
            break
        header[m.group(1).decode()] = m.group(2).decode("utf-8", errors="replace").strip()
        pos = m.end()
    return header, data[pos:]


def record_content_sha256(data: bytes) -> str:
    """SHA-256 of a record file's content (its bytes without the leading ``# amct.`` header lines)."""
    return hashlib.sha256(split_record(data)[1]).hexdigest()


@dataclass(frozen=True)
class FileStamp:
    """What one file of a set says about its export."""

    role: str  # "fake-quant model", "deploy model", "record file", "traced model"
    path: str
    export_id: str | None
    record_sha256: str | None = None  # models: the record content they were built from; record: its own content

    def describe(self) -> str:
        return f"{self.role} {self.path!r} (export id {self.export_id or 'none'})"


def model_stamp(role: str, path) -> FileStamp:
    """The stamp of an ONNX file, read from its ``metadata_props`` alone (no graph, no tensor)."""
    from .onnx.mapped import read_metadata
    from .onnx.metadata import EXPORT_ID, RECORD_SHA256

    props = read_metadata(path)
    return FileStamp(role, str(path), props.get(EXPORT_ID) or None, props.get(RECORD_SHA256) or None)


def record_stamp(path, role: str = "record file") -> FileStamp:
    data = Path(path).read_bytes()
    header, _ = split_record(data)
    return FileStamp(role, str(path), header.get(RECORD_ID_KEY) or None, record_content_sha256(data))


@dataclass
class SetCheck:
    """The outcome of :func:`check_set` when the set is consistent: its id (None when no file has one) and notes."""

    export_id: str | None
    files: list[FileStamp]
    notes: list[str] = field(default_factory=list)


def check_set(models: list[FileStamp], record: FileStamp | None = None, *, record_given: bool = False) -> SetCheck:
    """Check that the files come from one export.

    * every model and the record that carries an id carry the same one;
    * a model that carries ``amct.record_sha256`` was built from the record's content;
    * ``record_given``: the record is the user's own file (the flow's ``record_file``); its id may differ
      (it came from another export), the content must still be the one the models were built from.

    Files without an id are accepted with a note. Raises :class:`MixedSetError` naming the files and ids."""
    notes: list[str] = []
    ids = {s.export_id for s in models if s.export_id}
    if len(ids) > 1:
        raise MixedSetError("these files come from different exports (a killed or concurrent export left a "
                            "mixed set; export again): " + "; ".join(s.describe() for s in models))
    model_id = next(iter(ids), None)
    if record is not None:
        for s in models:
            if s.record_sha256 and record.record_sha256 and s.record_sha256 != record.record_sha256:
                raise MixedSetError(
                    f"{s.describe()} was built from another record than {record.describe()}: its record content "
                    f"has SHA-256 {s.record_sha256}, the file's is {record.record_sha256} (a killed or concurrent "
                    "export left a mixed set, or the record was edited after the export; export again)")
        if record.export_id and model_id and record.export_id != model_id and not record_given:
            raise MixedSetError("these files come from different exports (a killed or concurrent export left a "
                                "mixed set; export again): "
                                + "; ".join(s.describe() for s in [*models, record]))
    stamps = [*models, *([record] if record is not None else [])]
    unstamped = [s for s in stamps if not s.export_id]
    if unstamped:
        notes.append("no export id in " + ", ".join(f"{s.role} {s.path!r}" for s in unstamped)
                     + " (written by AMCT or an older export): the set could not be checked for mixed exports")
    return SetCheck(model_id or (record.export_id if record is not None else None), stamps, notes)
