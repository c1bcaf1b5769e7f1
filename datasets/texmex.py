"""Texmex ``.fvecs`` / ``.ivecs`` / ``.bvecs`` files (SIFT1M, GIST1M, BIGANN).

Each row is stored as an int32 dimension ``d`` followed by ``d`` values, so the file is an
array of fixed-size records.  Reading maps it as a structured ``np.memmap`` and returns the
value field: a strided view, nothing is loaded into memory until it is indexed.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .arrays import cast_rows, check_matrix, chunk_rows, iter_chunks, row_window

#: Value type of each texmex suffix (all little-endian).
TEXMEX_DTYPES = {".fvecs": np.dtype("<f4"), ".ivecs": np.dtype("<i4"), ".bvecs": np.dtype("u1")}


def _record(dtype: np.dtype, d: int) -> np.dtype:
    return np.dtype([("dim", "<i4"), ("vec", dtype, (d,))])


def read_texmex(path, dtype, *, start: int = 0, count: int | None = None) -> np.memmap:
    """Memory-map rows ``[start, start + count)`` of a texmex file.

    Parameters
    ----------
    path : str or Path
    dtype : numpy dtype
        Value type: ``TEXMEX_DTYPES[suffix]``.
    start : int
        First row.
    count : int or None
        Rows to map; None means up to the end.

    Returns
    -------
    np.memmap, shape (count, d)
        Read-only strided view (row stride ``4 + d * itemsize`` bytes).

    Raises
    ------
    ValueError
        The file size is not a whole number of records, or a row in the window has a
        dimension header other than row 0's.  Only the window's headers are checked, so
        mapping the first rows of a 1B-row file does not read all of it.
    """
    path = Path(path)
    dtype = np.dtype(dtype)
    size = path.stat().st_size
    if size < 4:
        raise ValueError(f"{path}: {size} bytes is too short for a texmex file "
                         "(each row starts with a 4-byte int32 dimension)")
    d = int(np.fromfile(path, dtype="<i4", count=1)[0])
    if d <= 0:
        raise ValueError(f"{path}: row 0 has dimension header {d}, expected a positive int")
    record = _record(dtype, d)
    if size % record.itemsize:
        raise ValueError(f"{path}: {size} bytes is not a multiple of the record size "
                         f"{record.itemsize} (4-byte header + {d} x {dtype.itemsize}-byte values "
                         f"for d={d} from row 0): truncated, or not a {path.suffix} file")
    start, stop = row_window(size // record.itemsize, start, count, str(path))
    records = np.memmap(path, dtype=record, mode="r", offset=start * record.itemsize,
                        shape=(stop - start,))
    bad = np.flatnonzero(records["dim"] != d)
    if bad.size:
        raise ValueError(f"{path}: row {start + bad[0]} has dimension header "
                         f"{records['dim'][bad[0]]}, expected {d} (the header of row 0)")
    return records["vec"]


def write_texmex(path, array, dtype) -> None:
    """Write a 2-D array-like as a texmex file, streaming it in blocks.

    Parameters
    ----------
    path : str or Path
    array : array-like, shape (n, d), n >= 1, d >= 1
        Values must fit ``dtype`` (see ``arrays.cast_rows``).
    dtype : numpy dtype
        Value type: ``TEXMEX_DTYPES[suffix]``.
    """
    path = Path(path)
    dtype = np.dtype(dtype)
    n, d = check_matrix(array, str(path))
    if n == 0 or d == 0:
        # The dimension lives only in the row headers: an empty file could not be read back.
        raise ValueError(f"{path}: texmex files need at least one row and one column, "
                         f"got shape ({n}, {d})")
    record = _record(dtype, d)
    with open(path, "wb") as f:
        for start, chunk in iter_chunks(array, chunk_rows(d, dtype.itemsize)):
            block = np.empty(len(chunk), dtype=record)
            block["dim"] = d
            block["vec"] = cast_rows(chunk, dtype, str(path), start)
            block.tofile(f)
