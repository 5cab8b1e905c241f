"""All-or-nothing file writes, shared by checkpoints, metrics, downloads and cached classifier weights."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_file(path: str | Path, mode: str = "wb", suffix: str = ".tmp") -> Iterator[IO[Any]]:
    """Yield a file that becomes `path` only if the block finishes: written to a temp file beside it, flushed,
    fsynced, then `os.replace`d; on any exception the temp file is removed and `path` is left as it was.

    The temp file is created with mode 0o666 & ~umask, as `open()` would, not `tempfile.mkstemp`'s 0600: a run's
    metrics, checkpoints and downloaded datasets must stay readable by the rest of a team on a shared filesystem.
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}{suffix}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
