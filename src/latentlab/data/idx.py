"""Read the IDX format (MNIST, Fashion-MNIST) with numpy: torchvision is not usable here."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np

from latentlab.errors import DataError

# IDX type codes -> numpy dtypes (big-endian, as the format stores them).
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def md5sum(path: str | Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_idx(path: str | Path) -> np.ndarray:
    """Parse an IDX file (optionally gzipped) into an array of its declared shape and dtype."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:  # gzip raises these on truncation/corruption
        raise DataError(f"cannot read {path}: {exc}. The file is corrupted or truncated; delete it and "
                        f"download it again (data.download=true) or copy a good one.") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number); replace it with the original file.")
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(f"{path} holds {len(raw)} bytes but its header promises {expected} for shape {shape}; "
                        f"the file is truncated or corrupted. Delete it and download it again.")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
