"""Safe file handling: files written whole or not at all, and folders one process owns.

`write_atomic` writes a temporary file in the same folder, then renames it: a reader
(another process, or the next run after a crash) sees either the old content or the new
one, never a half-written file. `exclusive_lock` keeps a second process out of a folder
(a training run's workdir) while the first works in it. `unwritable_reason` tells before
any work whether a folder can take a command's output, `too_little_room` whether its
disk has room for it. `error_line` puts the error of a file that cannot be read into one
line of a message.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

# What flock raises where the filesystem has no locks (not "held by another process").
_NO_LOCKS = {errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP}


def unwritable_reason(folder: str | Path) -> str | None:
    """Why files cannot be written into `folder` (created if missing), or None if they can.

    Probes by creating (and removing) an empty file, which also catches read-only
    filesystems and permissions that `os.access` does not see for every user.
    """
    folder = Path(folder)
    probe = folder / f".write-test-{os.getpid()}-{uuid.uuid4().hex}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        probe.unlink()
    except OSError as error:
        return error.strerror or str(error)
    return None


def too_little_room(folder: str | Path, needed: int, what: str) -> str | None:
    """A warning when the disk holding `folder` has less room than `needed` bytes for
    `what` (say, "the run's train state", which a checkpoint may store compressed); None
    when it has enough or cannot tell."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return None
    if free >= needed:
        return None
    mib = 2**20
    return (
        f"Warning: the disk holding {folder} has {free / mib:.1f} MiB free, less than the "
        f"{needed / mib:.1f} MiB of {what}: saving it may fail. Free some space, or pass "
        "another folder."
    )


def free_path(path: Path) -> Path:
    """`path`, or the first of path_1, path_2, ... (same suffix) that does not exist."""
    candidate, number = path, 1
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}_{number}{path.suffix}")
        number += 1
    return candidate


def error_line(error: BaseException, limit: int = 300) -> str:
    """Says `error` in one line: "TypeName: the first line of its message" (cut after
    `limit` characters, with "..."); its repr stands in for a message it lacks."""
    lines = str(error).strip().splitlines() or [repr(error)]
    first = lines[0] if len(lines[0]) <= limit else f"{lines[0][:limit]}..."
    return f"{type(error).__name__}: {first}"


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Writes `data` (text as UTF-8) to `path`, replacing it in one step.

    The bytes go to a temporary file beside `path`, are flushed to disk, and the file is
    renamed over `path`; on any failure the temporary file is removed and `path` keeps
    its old content. The file gets the permissions `open` would give a new file (0666
    less the umask), not a private 0600 like `tempfile.mkstemp`'s.
    """
    path = Path(path)
    payload = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def exclusive_lock(path: str | Path, enabled: bool = True) -> Iterator[bool]:
    """Holds an exclusive, non-blocking `flock` on the file `path` for the `with` block.

    Yields True when this process holds the lock, False when another process holds it
    (nothing waits). The lock goes with the process: a killed holder leaves no stale
    lock behind, only the empty file. Where `enabled` is False (or the platform has no
    `fcntl`) it yields True without locking, and so it does, with a warning, on a
    filesystem that does not support locks (a Lustre mount without `-o flock`, say).
    """
    try:
        import fcntl
    except ImportError:  # not POSIX
        enabled = False
    if not enabled:
        yield True
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        except OSError as error:
            if error.errno not in _NO_LOCKS:
                raise
            warnings.warn(
                f"{path}: this filesystem does not support file locks ({error.strerror}); "
                "nothing keeps a second process out of this folder.",
                stacklevel=3,
            )
        yield True
    finally:
        os.close(fd)  # closing releases the lock
