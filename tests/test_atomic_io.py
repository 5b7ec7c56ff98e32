"""amct_core._io: files are replaced atomically and get the mode a plain open() would give them."""
import os

from amct_core._io import atomic_write_bytes


def test_an_atomically_written_file_gets_the_usual_mode_for_the_umask(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    atomic_write_bytes(tmp_path / "f.txt", b"x")
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o666 & ~umask


def test_an_atomic_write_replaces_the_old_content_and_leaves_no_temporary_file(tmp_path):
    (tmp_path / "f.txt").write_bytes(b"old")
    atomic_write_bytes(tmp_path / "f.txt", b"new")
    assert (tmp_path / "f.txt").read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]
