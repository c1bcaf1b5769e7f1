"""NumPy ``.npy`` files, memory-mapped and never unpickled."""
from __future__ import annotations

import math
import tokenize
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
    array = _open_memmap(path)
    n, _ = check_matrix(array, str(path))
    start, stop = row_window(n, start, count, str(path))
    return array[start:stop]


def _open_memmap(path: Path) -> np.memmap:
    """The file's array, memory-mapped after its header and size are checked: a damaged header
    or a file longer or shorter than the header says raises ValueError naming the file."""
    try:
        with open(path, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            offset = f.tell()
    except FileNotFoundError:
        raise
    except (ValueError, SyntaxError, tokenize.TokenError, OSError, EOFError) as err:
        raise ValueError(f"{path}: not a readable .npy file (damaged header?): {err}") from err
    if dtype.hasobject:
        raise ValueError(f"{path}: holds Python objects (dtype {dtype}); only numeric arrays are read")
    expected = offset + math.prod(shape) * dtype.itemsize
    size = path.stat().st_size
    if size != expected:
        raise ValueError(f"{path}: the header says {dtype}{shape}, so the file should be {expected} bytes, "
                         f"but it is {size} bytes" + (" (truncated)" if size < expected else ""))
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


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
