"""Helpers shared by the stage tasks: file hashes, timing, the content-hash cache policy, model rebuild.

Stages hand each other paths and small records only. A stage that needs the torch model rebuilds it
from a :class:`ModelSpec` (checkpoint path + model reference + distill config + example input); the
rebuild is memoised per process, so a flow that runs its stages in one process builds it once.
"""
from __future__ import annotations

import gc
import hashlib
import json
import os
import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Iterator

from prefect.cache_policies import TASK_SOURCE, CachePolicy
from prefect.utilities.hashing import hash_objects

from ._params import DTYPES, ParameterError, import_callable, input_list  # noqa: F401 (re-exported)

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


# ---- the model ---------------------------------------------------------------------------------

@dataclass
class ModelSpec:
    """Everything needed to rebuild the distilled torch model, as plain values."""

    checkpoint: str  # local file
    model: str  # "package.module:callable" or "path/to/file.py:callable"
    model_kwargs: dict = field(default_factory=dict)
    distill_config: str | None = None  # JSON distill config (None: every Conv2d/Linear, default config)
    input_shape: list = field(default_factory=list)  # [1, 3, 8, 8], or one shape per input: [[1, 3, 8, 8], [1, 4]]
    input_dtype: str | list[str] = "float32"  # one dtype, or one per input
    seed: int = 0


def example_input(shape: list[int], dtype: str, seed: int = 0):
    """The example input (one tensor) from its shape and dtype, seeded: N(0,1) for floats, 0..9 for ints."""
    import torch

    g = torch.Generator().manual_seed(int(seed))
    tdt = getattr(torch, dtype)
    if tdt.is_floating_point:
        return torch.randn(*shape, generator=g, dtype=torch.float32).to(tdt)
    return torch.randint(0, 10, tuple(shape), generator=g, dtype=tdt)


# spec key -> (model, checkpoint file its weights are mapped from, that file's identity when it was mapped)
_MODELS: dict[str, tuple[Any, str, tuple]] = {}


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


def spec_inputs(spec: ModelSpec) -> tuple:
    """The example inputs (a tuple, one tensor per model input), seeded: input i uses seed + 1000 * i."""
    return tuple(example_input(s, d, spec.seed + 1000 * i)
                 for i, (s, d) in enumerate(input_list(spec.input_shape, spec.input_dtype)))
