"""Small file helpers shared by every writer: temporary files and atomic replace."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def temp_path_for(final: Path) -> Path:
    """A new, unique temporary file next to ``final`` (same filesystem, so a rename is atomic)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    # mkstemp creates 0600; give the file the mode a plain open() would (0666 less the umask).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(name, 0o666 & ~umask)
    return Path(name)


def atomic_write_bytes(final: Path, data: bytes) -> None:
    """Write ``data`` to ``final`` so a crash leaves either the old or the new complete file."""
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
