"""Scratch folders of one benchmark process, removed when it exits.

Each latentlab variant writes a run folder (checkpoint, logs: ~16 MB for the MNIST VAE), the workers their
logs, pythae its saved model, the estimator benchmark its test tensor: under /tmp, left behind, they piled up
to gigabytes over a week of runs. Everything now goes under one folder per process, deleted at exit
(a worker's error message quotes its log rather than pointing to a file that will be gone).
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

_ROOT: list[Path] = []


def scratch_dir(prefix: str = "run-") -> Path:
    """A new empty folder under this process's scratch root (created on first use, removed at exit)."""
    if not _ROOT:
        _ROOT.append(Path(tempfile.mkdtemp(prefix="latentlab-bench-")))
        atexit.register(shutil.rmtree, _ROOT[0], ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=_ROOT[0]))
