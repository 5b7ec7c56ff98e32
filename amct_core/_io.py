"""Small file helpers shared by every writer: temporary files, atomic replace, and the writer lock.

Every file an export writes goes through one pattern: take the lock of each output file, remove what
a killed writer of those files left behind, write temporaries, rename them into place, release.

* Temporary files are ``.<file name>.<8 random characters>.tmp`` beside the final file
  (:func:`temp_path_for`), so a rename is atomic.
* The lock of an output file is ``.<file name>.amct.lock`` beside it, an ``fcntl.flock`` lock held by
  :func:`output_lock` from before the first temporary file to after the last rename. A second writer
  of the same file waits until the first releases it (the kernel releases it when a writer dies, even
  by SIGKILL). ``AMCT_LOCK_TIMEOUT`` (seconds) bounds the wait: past it, an :class:`OutputLockedError`
  names the lock file and the holder's pid. The lock files are empty but for the holder's pid and stay
  in place (removing one could let two writers hold "the" lock at once).
* Holding the locks, the writer removes the temporaries of its output files that a killed writer left
  (:func:`remove_stale_temps`): only names of the exact pattern above, for exactly these files; a live
  writer of them cannot exist, since it would hold the lock.
"""
from __future__ import annotations

import errno
import fcntl
import os
import re
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import ExportError

LOCK_SUFFIX = ".amct.lock"
LOCK_TIMEOUT_ENV = "AMCT_LOCK_TIMEOUT"
_TEMP_SUFFIX = ".tmp"
# tempfile.mkstemp's random part: 8 characters of [a-z0-9_]
_RANDOM = r"[a-z0-9_]{8}"


class OutputLockedError(ExportError):
    """Another writer held an output file's lock for longer than ``AMCT_LOCK_TIMEOUT`` seconds."""


def temp_path_for(final: Path) -> Path:
    """A new, unique temporary file next to ``final`` (same filesystem, so a rename is atomic)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=_TEMP_SUFFIX, dir=final.parent)
    os.close(fd)
    # mkstemp creates 0600; give the file the mode a plain open() would (0666 less the umask).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(name, 0o666 & ~umask)
    return Path(name)


def is_temp_of(final: Path, candidate: Path) -> bool:
    """``candidate`` is a temporary file :func:`temp_path_for` makes for ``final`` (same directory, exact pattern)."""
    pattern = re.compile(r"\." + re.escape(Path(final).name) + r"\." + _RANDOM + re.escape(_TEMP_SUFFIX))
    return Path(candidate).parent == Path(final).parent and pattern.fullmatch(Path(candidate).name) is not None


def stale_temps(final: Path) -> list[Path]:
    """The temporaries of ``final`` present beside it (left by a killed writer when no writer holds the lock)."""
    final = Path(final)
    if not final.parent.is_dir():
        return []
    return sorted(p for p in final.parent.glob(f".{glob_escape(final.name)}.*{_TEMP_SUFFIX}")
                  if is_temp_of(final, p) and not p.is_symlink() and p.is_file())


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def remove_stale_temps(finals: Iterable[Path]) -> list[Path]:
    """Remove the temporaries a killed writer left for ``finals``; call it holding their locks. Returns them."""
    removed = []
    for final in finals:
        for p in stale_temps(final):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def lock_path_for(final: Path) -> Path:
    final = Path(final)
    return final.parent / f".{final.name}{LOCK_SUFFIX}"


def _timeout() -> float | None:
    raw = os.environ.get(LOCK_TIMEOUT_ENV, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ExportError(f"environment variable {LOCK_TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if not value >= 0:
        raise ExportError(f"environment variable {LOCK_TIMEOUT_ENV}={raw!r} must be >= 0 seconds")
    return value


def _acquire(lock: Path, deadline: float | None) -> int:
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        delay = 0.01
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            if deadline is not None and time.monotonic() >= deadline:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                raise OutputLockedError(
                    f"output lock {str(lock)!r} is held by another export (pid {holder}) for more than "
                    f"{LOCK_TIMEOUT_ENV}={os.environ.get(LOCK_TIMEOUT_ENV)} s; wait for it to finish, or raise "
                    f"{LOCK_TIMEOUT_ENV} (unset: wait as long as it takes)")
            time.sleep(delay)
            delay = min(delay * 2, 0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd
    except BaseException:
        os.close(fd)
        raise


@contextmanager
def output_lock(finals: Iterable[Path]) -> Iterator[list[Path]]:
    """Hold the locks of the output files ``finals`` (taken in path order, so two writers of overlapping
    sets cannot deadlock), after removing the temporaries killed writers left for them. Yields those."""
    paths = sorted({Path(os.path.abspath(f)) for f in finals})
    locks = sorted({lock_path_for(p) for p in paths})
    timeout = _timeout()
    deadline = None if timeout is None else time.monotonic() + timeout
    fds: list[int] = []
    try:
        for lock in locks:
            lock.parent.mkdir(parents=True, exist_ok=True)
            fds.append(_acquire(lock, deadline))
        yield remove_stale_temps(paths)
    finally:
        for fd in reversed(fds):
            try:
                os.ftruncate(fd, 0)
            finally:
                os.close(fd)  # closing the descriptor releases the flock


def atomic_write_bytes(final: Path, data: bytes) -> None:
    """Write ``data`` to ``final`` so a crash leaves either the old or the new complete file. The caller
    holds ``final``'s :func:`output_lock` when other writers may write it."""
    final = Path(final)
    tmp = temp_path_for(final)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
