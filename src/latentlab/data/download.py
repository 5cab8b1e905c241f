"""Fetch a file from a list of mirrors, safely: md5-verified, retried (bounded), atomic.

A download streams into a temporary file in the destination directory and is moved into place with
`os.replace` only when complete and verified, so an interrupted or corrupted transfer never leaves
a file that looks valid, and concurrent downloaders (one per DDP node) cannot see half a file.
"""

from __future__ import annotations

import hashlib
import http.client
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from latentlab.errors import DataError
from latentlab.files import atomic_file

_CHUNK = 1 << 20


class _AttemptFailed(Exception):
    """One attempt failed; `permanent` means retrying the same mirror cannot help (e.g. HTTP 404)."""

    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


def _fetch_once(url: str, dest: Path, md5: str, size: int | None, timeout: float) -> None:
    """Stream `url` to a temporary file next to `dest`, verify length and md5, then `os.replace`."""
    try:
        digest, received = hashlib.md5(), 0
        with atomic_file(dest, suffix=".part") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            declared = response.headers.get("Content-Length")
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                digest.update(chunk)
                received += len(chunk)
            if declared is not None and received != int(declared):
                raise _AttemptFailed(f"{url}: truncated transfer, {received} of {declared} bytes")
            if size is not None and received != size:
                raise _AttemptFailed(f"{url}: got {received} bytes, expected {size}")
            if digest.hexdigest() != md5:
                raise _AttemptFailed(f"{url}: md5 {digest.hexdigest()} != expected {md5} (corrupted)")
    except urllib.error.HTTPError as exc:
        raise _AttemptFailed(f"{url}: HTTP {exc.code} {exc.reason}", permanent=400 <= exc.code < 500) from exc
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        raise _AttemptFailed(f"{url}: {type(exc).__name__}: {exc}") from exc


def download_file(
    mirrors: Sequence[str],
    filename: str,
    dest: str | Path,
    md5: str,
    *,
    size: int | None = None,
    retries: int = 3,
    timeout: float = 60.0,
    backoff: float = 1.0,
) -> Path:
    """Download `filename` from the first mirror that delivers it intact into `dest`.

    Each mirror (a base URL; the file's URL is mirror + "/" + filename) gets up to `retries`
    attempts with exponential backoff (`backoff`, 2x, 4x ... seconds) on transient failures
    (connection errors, timeouts, truncation, md5 mismatch); an HTTP 4xx moves on at once.
    Raises `DataError` listing every failed attempt when no mirror succeeds.
    """
    if retries < 1:
        raise ValueError(f"retries must be >= 1, got {retries}")
    if not mirrors:
        raise DataError(f"cannot download {filename}: no mirrors configured (data.mirrors is empty); "
                        f"copy the file to {dest} by hand")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    failures: list[str] = []
    for mirror in mirrors:
        url = f"{mirror.rstrip('/')}/{filename}"
        for attempt in range(retries):
            try:
                _fetch_once(url, dest, md5, size, timeout)
                return dest
            except _AttemptFailed as exc:
                failures.append(str(exc))
                if exc.permanent:
                    break
                if attempt + 1 < retries and backoff > 0:
                    time.sleep(backoff * 2**attempt)
    raise DataError(f"could not download {filename} to {dest} from any mirror:\n  " + "\n  ".join(failures)
                    + f"\nCheck the network or data.mirrors, or copy the file there by hand (md5 {md5}).")
