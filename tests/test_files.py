"""Safe files: atomic writes (old content or new, never a part) and the workdir lock."""

import os

import pytest

from mmrec_jax import files


def test_write_atomic_replaces_text_and_bytes(tmp_path):
    path = tmp_path / "config.json"
    files.write_atomic(path, '{"a": 1}')
    assert path.read_text() == '{"a": 1}'
    files.write_atomic(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    path.write_text("old")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        files.write_atomic(path, "new content")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_get_the_usual_permissions(tmp_path, umask):
    previous = os.umask(umask)
    try:
        files.write_atomic(tmp_path / "summary.json", "{}")
        (tmp_path / "plain.json").write_text("{}")  # what open() gives a new file
    finally:
        os.umask(previous)
    mode = (tmp_path / "summary.json").stat().st_mode & 0o777
    assert mode == (tmp_path / "plain.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_exclusive_lock_keeps_a_second_holder_out_until_released(tmp_path):
    lock = tmp_path / ".lock"
    with files.exclusive_lock(lock) as first:
        assert first
        with files.exclusive_lock(lock) as second:  # another open file: refused at once
            assert not second
        with files.exclusive_lock(lock, enabled=False) as unlocked:
            assert unlocked
    with files.exclusive_lock(lock) as again:
        assert again


def test_exclusive_lock_on_a_filesystem_without_locks_warns_and_goes_on(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.warns(UserWarning, match="does not support file locks"):
        with files.exclusive_lock(tmp_path / ".lock") as locked:
            assert locked


def test_too_little_room_warns_with_both_sizes(tmp_path, monkeypatch):
    assert files.too_little_room(tmp_path, 1, "a file") is None  # a byte fits
    usage = files.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(files.shutil, "disk_usage", lambda _: usage._replace(free=3 * 2**20))
    warning = files.too_little_room(tmp_path, 5 * 2**20, "the run's train state")
    assert warning == (
        f"Warning: the disk holding {tmp_path} has 3.0 MiB free, less than the 5.0 MiB of "
        "the run's train state: saving it may fail. Free some space, or pass another folder."
    )
    assert files.too_little_room(tmp_path, 3 * 2**20, "a file") is None


def test_too_little_room_says_nothing_where_it_cannot_tell(tmp_path):
    assert files.too_little_room(tmp_path / "missing", 10**18, "a file") is None
    assert files.too_little_room(tmp_path, 10**18, "a file").startswith("Warning: the disk")
