"""The clean-tree check of the test session (tests/worktree.py, used by tests/conftest.py) sees the files
a test leaves in a repository, ignored files included, and never blames the user's own files."""
from __future__ import annotations

import os
import subprocess

import pytest

from tests import worktree


@pytest.fixture
def repo(tmp_path):
    r = tmp_path / "repo"
    r.mkdir()
    git = ["git", "-C", str(r), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (r / ".gitignore").write_text("/mlruns/\nmlflow.db\n/.venv/\n")
    (r / "code.py").write_text("x = 1\n")
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "init"], check=True)
    return r


def test_a_clean_tree_has_an_empty_snapshot(repo):
    assert worktree.snapshot(repo) == {}


def test_new_files_count_even_when_gitignore_hides_them(repo):
    before = worktree.snapshot(repo)
    (repo / "mlruns" / "1" / "abc").mkdir(parents=True)
    (repo / "mlruns" / "1" / "abc" / "model.onnx").write_bytes(b"x")
    (repo / "stray.txt").write_text("x")
    left = worktree.changes(before, worktree.snapshot(repo))
    assert left == ["!! mlruns/1/abc/model.onnx", "?? stray.txt"]


def test_the_users_earlier_files_do_not_count_unless_the_session_changes_them(repo):
    (repo / "mlflow.db").write_bytes(b"users own store")
    (repo / "notes.txt").write_text("mine")
    before = worktree.snapshot(repo)
    assert worktree.changes(before, worktree.snapshot(repo)) == []
    st = (repo / "mlflow.db").stat()
    (repo / "mlflow.db").write_bytes(b"overwritten by a test")
    os.utime(repo / "mlflow.db", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    (repo / "notes.txt").unlink()
    left = worktree.changes(before, worktree.snapshot(repo))
    assert left == ["!! mlflow.db", "(no longer reported: was ??) notes.txt"]


def test_edits_of_tracked_files_the_virtualenv_and_caches_do_not_count(repo):
    before = worktree.snapshot(repo)
    (repo / ".venv" / "lib").mkdir(parents=True)
    (repo / ".venv" / "lib" / "x.py").write_text("")
    (repo / "__pycache__").mkdir()
    (repo / "__pycache__" / "code.cpython-311.pyc").write_bytes(b"")
    (repo / ".pytest_cache").mkdir()
    (repo / ".pytest_cache" / "README.md").write_text("")
    (repo / "code.py").write_text("x = 2\n")  # a developer editing while the suite runs
    assert worktree.changes(before, worktree.snapshot(repo)) == []


def test_outside_a_git_work_tree_there_is_nothing_to_check(tmp_path):
    assert worktree.snapshot(tmp_path) is None
