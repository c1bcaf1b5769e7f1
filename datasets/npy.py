"""NumPy ``.npy`` files, memory-mapped and never unpickled."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .arrays import check_matrix, chunk_rows, iter_chunks, row_window


def read_npy(path, *, start: int = 0, count: int | None = None) -> np.memmap:
    """Memory-map rows ``[start, start + count)`` of a 2-D ``.npy`` file.

    Parameters
    ----------
    path : str or Path
    start : int
        First row.
    count : int or None
        Rows to map; None means up to the end.

    Returns
    -------
    np.memmap, shape (count, d)
        Read-only view in the file's own dtype.
    """
    path = Path(path)
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    n, _ = check_matrix(array, str(path))
    start, stop = row_window(n, start, count, str(path))
    return array[start:stop]


def write_npy(path, array) -> None:
    """Write a 2-D array-like as ``.npy`` in its own dtype, streaming it in blocks.

    Parameters
    ----------
    path : str or Path
    array : array-like, shape (n, d)
    """
    path = Path(path)
    n, d = check_matrix(array, str(path))
    dtype = np.dtype(array.dtype)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(n, d))
    for start, chunk in iter_chunks(array, chunk_rows(d, dtype.itemsize)):
        out[start:start + len(chunk)] = chunk
    out.flush()
