"""What every file-producing stage shares: its result, its cost, and its cache policy.

A stage's cache key is made of its parameter values with every *input* file replaced by its SHA-256,
the task's source and amct_core's source; output locations are keyed by path only.
"""
from __future__ import annotations

import hashlib
import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Iterator

from prefect.cache_policies import TASK_SOURCE, CachePolicy
from prefect.utilities.hashing import hash_objects

from .files import FileRef, sha256_file


@dataclass
class StageResult:
    """What a file-producing stage wrote, with its cost."""

    stage: str
    files: list[FileRef]
    seconds: float
    peak_rss_mb: float
    info: dict = field(default_factory=dict)

    @property
    def path(self) -> str:
        return self.files[0].path

    def intact(self) -> bool:
        return all(f.intact() for f in self.files)


@dataclass
class StageMetrics:
    seconds: float = 0.0
    peak_rss_mb: float = 0.0


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@contextmanager
def measured() -> Iterator[StageMetrics]:
    m = StageMetrics()
    t0 = time.perf_counter()
    try:
        yield m
    finally:
        m.seconds = time.perf_counter() - t0
        m.peak_rss_mb = peak_rss_mb()


# ---- cache policy ------------------------------------------------------------------------------

def _amct_core_fingerprint() -> str:
    """Hash of amct_core's source: a change of the library invalidates every cached stage."""
    import amct_core  # noqa: F401  (only to locate it)

    root = Path(sys.modules["amct_core"].__file__).parent
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.suffix in (".py", ".proto") and "__pycache__" not in p.parts:
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


_FINGERPRINT: str | None = None


def amct_core_fingerprint() -> str:
    global _FINGERPRINT
    if _FINGERPRINT is None:
        _FINGERPRINT = _amct_core_fingerprint()
    return _FINGERPRINT


def _content_view(value: Any) -> Any:
    """Replace every existing file path inside ``value`` by (path, sha256) so the key follows the content."""
    if is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    if isinstance(value, dict):
        return {str(k): _content_view(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_content_view(v) for v in value]
    if isinstance(value, (str, Path)) and value and len(str(value)) < 4096:
        p = Path(value)
        try:
            if p.is_file():
                return {"path": str(p.resolve()), "sha256": sha256_file(p)}
        except OSError:
            pass
        return str(value)
    return value


@dataclass
class FileContentInputs(CachePolicy):
    """Cache key from the task's inputs where every *input* file is represented by its SHA-256.

    ``outputs`` names parameters that are output locations: they are keyed by their value only (a
    file there is what the stage writes, not what it reads). The key also covers amct_core's source.
    """

    outputs: tuple[str, ...] = ()

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs):
        view = {}
        for k, v in (inputs or {}).items():
            view[k] = str(v) if k in self.outputs else _content_view(v)
        view["__amct_core__"] = amct_core_fingerprint()
        return hash_objects(view, raise_on_failure=True)


def stage_cache(*outputs: str) -> CachePolicy:
    return FileContentInputs(outputs=tuple(outputs)) + TASK_SOURCE
