"""What the test session may not do: leave files in the repository's working tree.

:func:`snapshot` lists every file git reports as untracked **or ignored** (a ``.gitignore`` entry must
not hide a stray ``mlruns/``), with its size and modification time; the session compares the snapshot
after the run with the one before it (tests/conftest.py), so the user's own untracked files and earlier
outputs never count, while any file the tests add, overwrite or delete there does. Left out: edits of
tracked files (a developer may edit the code while the suite runs), the virtualenv, bytecode caches and
pytest's cache, which running Python and pytest write by design.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

EXCLUDED = (":(exclude).venv", ":(exclude,glob)**/__pycache__/**", ":(exclude).pytest_cache")


def snapshot(repo: Path) -> dict[str, tuple] | None:
    """``{path: ('??' or '!!', (size, mtime_ns))}`` of every untracked or ignored file; None outside a git
    work tree."""
    try:
        r = subprocess.run(["git", "-C", str(repo), "status", "--porcelain=v1", "-z", "--ignored",
                            "--untracked-files=all", "--", ".", *EXCLUDED], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode != 0:
        return None
    entries: dict[str, tuple] = {}
    items = r.stdout.decode("utf-8", errors="surrogateescape").split("\0")
    skip_next = False
    for item in items:
        if skip_next:  # the source path of a rename/copy entry ("R  new\0old\0")
            skip_next = False
            continue
        if not item:
            continue
        status, path = item[:2], item[3:]
        skip_next = status[0] in "RC"
        if status not in ("??", "!!"):
            continue
        try:
            st = (repo / path).lstat()
        except FileNotFoundError:  # gone since git listed it
            continue
        entries[path] = (status, (st.st_size, st.st_mtime_ns))
    return entries


def changes(before: dict[str, tuple], after: dict[str, tuple]) -> list[str]:
    """Paths added, changed or cleaned between two snapshots, each with its git status ('!!' = ignored)."""
    out = [f"{after[p][0]} {p}" for p in sorted(after) if before.get(p) != after[p]]
    out += [f"(no longer reported: was {before[p][0]}) {p}" for p in sorted(set(before) - set(after))]
    return out
