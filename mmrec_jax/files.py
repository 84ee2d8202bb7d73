"""Files written whole or not at all: a temporary file in the same folder, then a rename.

A reader (another process, or the next run after a crash) sees either the old content
or the new one, never a half-written file.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path


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
