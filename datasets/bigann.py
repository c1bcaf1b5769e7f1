"""big-ann-benchmarks ``.fbin`` / ``.ibin`` / ``.u8bin`` / ``.i8bin`` files (Deep1B, BIGANN).

Layout: two little-endian uint32 ``n, d``, then ``n * d`` values in row-major order.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .arrays import cast_rows, check_matrix, chunk_rows, iter_chunks, row_window

#: Value type of each big-ann suffix (all little-endian).
BIN_DTYPES = {".fbin": np.dtype("<f4"), ".ibin": np.dtype("<i4"),
              ".u8bin": np.dtype("u1"), ".i8bin": np.dtype("i1")}

_HEADER_BYTES = 8
_UINT32_MAX = np.iinfo(np.uint32).max


def read_bin(path, dtype, *, start: int = 0, count: int | None = None) -> np.memmap:
    """Memory-map rows ``[start, start + count)`` of a big-ann binary file.

    Parameters
    ----------
    path : str or Path
    dtype : numpy dtype
        Value type: ``BIN_DTYPES[suffix]``.
    start : int
        First row.
    count : int or None
        Rows to map; None means up to the end.

    Returns
    -------
    np.memmap, shape (count, d)
        Read-only; only the window is mapped.

    Raises
    ------
    ValueError
        The file size differs from ``8 + n * d * itemsize`` for the header's ``n, d``.
    """
    path = Path(path)
    dtype = np.dtype(dtype)
    size = path.stat().st_size
    if size < _HEADER_BYTES:
        raise ValueError(f"{path}: {size} bytes is too short for a big-ann header "
                         "(two uint32: n, d)")
    n, d = (int(v) for v in np.fromfile(path, dtype="<u4", count=2))
    expected = _HEADER_BYTES + n * d * dtype.itemsize
    if size != expected:
        raise ValueError(f"{path}: header says n={n}, d={d} ({dtype}), so the file should be "
                         f"{expected} bytes, but it is {size} bytes"
                         + (" (truncated)" if size < expected else ""))
    start, stop = row_window(n, start, count, str(path))
    return np.memmap(path, dtype=dtype, mode="r", offset=_HEADER_BYTES + start * d * dtype.itemsize,
                     shape=(stop - start, d))


def write_bin(path, array, dtype) -> None:
    """Write a 2-D array-like as a big-ann binary file, streaming it in blocks.

    Parameters
    ----------
    path : str or Path
    array : array-like, shape (n, d), n and d < 2**32
        Values must fit ``dtype`` (see ``arrays.cast_rows``).
    dtype : numpy dtype
        Value type: ``BIN_DTYPES[suffix]``.
    """
    path = Path(path)
    dtype = np.dtype(dtype)
    n, d = check_matrix(array, str(path))
    if max(n, d) > _UINT32_MAX:
        raise ValueError(f"{path}: shape ({n}, {d}) does not fit the uint32 header")
    with open(path, "wb") as f:
        np.array([n, d], dtype="<u4").tofile(f)
        for start, chunk in iter_chunks(array, chunk_rows(d, dtype.itemsize)):
            cast_rows(chunk, dtype, str(path), start).tofile(f)
