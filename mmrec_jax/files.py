"""Files written whole or not at all: a temporary file in the same folder, then a rename.

A reader (another process, or the next run after a crash) sees either the old content
or the new one, never a half-written file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _read_umask() -> int:
    """The process's umask. Reading it means setting it, so it is read once, on import
    (before the threads that write checkpoints exist), and set straight back."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Writes `data` (text as UTF-8) to `path`, replacing it in one step.

    The bytes go to a temporary file beside `path`, are flushed to disk, and the file is
    renamed over `path`; on any failure the temporary file is removed and `path` keeps
    its old content. The file gets the permissions `open` would give a new file (0666
    less the umask), not the temporary file's private 0600.
    """
    path = Path(path)
    payload = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
