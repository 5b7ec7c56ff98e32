"""The files a stage reads and writes, by content: SHA-256 (memoised for large files) and FileRef.

Importable without Prefect or torch.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

CHUNK = 1 << 20
MEMO_MIN_BYTES = 64 << 20

_SHA_MEMO: dict[tuple, str] = {}


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 of a file. Large files are memoised on (path, inode, size, mtime_ns, ctime_ns), so a
    multi-GB checkpoint is read once per process although several stages' cache keys include it (small
    files are always re-read: a same-size rewrite within one clock tick could keep its mtime)."""
    st = os.stat(path)
    memo_key = (os.path.abspath(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if st.st_size < MEMO_MIN_BYTES:
        memo_key = None
    elif memo_key in _SHA_MEMO:
        return _SHA_MEMO[memo_key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    if memo_key is not None:
        if len(_SHA_MEMO) > 1024:
            _SHA_MEMO.clear()
        _SHA_MEMO[memo_key] = digest
    return digest


@dataclass
class FileRef:
    """A file a stage wrote: where it is, its size and SHA-256."""

    path: str
    sha256: str
    size: int

    @classmethod
    def of(cls, path: str | os.PathLike) -> "FileRef":
        p = Path(path).resolve()
        return cls(str(p), sha256_file(p), p.stat().st_size)

    def intact(self) -> bool:
        p = Path(self.path)
        return p.is_file() and p.stat().st_size == self.size and sha256_file(p) == self.sha256


def onnx_files(onnx_path: str | os.PathLike) -> list[FileRef]:
    """The .onnx file and any external-data files it references (same directory)."""
    p = Path(onnx_path).resolve()
    refs = [FileRef.of(p)]
    try:
        from amct_core.onnx.mapped import external_files, open_model

        data = sorted(external_files(open_model(p)) - {str(p)})  # the graph is read, no tensor
    except Exception:  # noqa: BLE001 - hashing must not fail because a model is unreadable; parity will say
        data = []
    return refs + [FileRef.of(f) for f in data]
