"""Helpers shared by the format readers and writers: row windows, chunks and checked casts.

Everything here works on any 2-D array-like with ``.shape`` and row slicing (numpy arrays,
``np.memmap``, ``h5py.Dataset``), so sets larger than memory can be streamed.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def check_matrix(array, where: str) -> tuple[int, int]:
    """Return ``(n, d)`` of a 2-D array-like, or raise naming ``where``.

    Parameters
    ----------
    array : array-like with ``.shape``
        Expected shape (n, d).
    where : str
        What to name in the error (usually a file path).

    Returns
    -------
    (n, d) : tuple of int
    """
    shape = getattr(array, "shape", None)
    if shape is None:
        raise TypeError(f"{where}: expected a 2-D array-like with .shape, "
                        f"got {type(array).__name__}")
    if len(shape) != 2:
        raise ValueError(f"{where}: expected a 2-D array (n, d), got shape {tuple(shape)}")
    return int(shape[0]), int(shape[1])


def row_window(n: int, start: int, count: int | None, where: str) -> tuple[int, int]:
    """Validate the row window ``[start, start + count)`` of an n-row array.

    Parameters
    ----------
    n : int
        Rows available.
    start : int
        First row wanted, ``0 <= start <= n``.
    count : int or None
        Rows wanted; None means up to the end.
    where : str
        What to name in the error (usually a file path).

    Returns
    -------
    (start, stop) : tuple of int
    """
    if start < 0 or start > n:
        raise ValueError(f"{where}: start={start} is outside 0..{n} (the file has {n} rows)")
    if count is None:
        return start, n
    if count < 0:
        raise ValueError(f"{where}: count must be >= 0, got {count}")
    if start + count > n:
        raise ValueError(f"{where}: rows {start}..{start + count} requested but the file has "
                         f"only {n} rows")
    return start, start + count


def iter_chunks(array, chunk_size: int) -> Iterator[tuple[int, np.ndarray]]:
    """Yield consecutive row blocks of a 2-D array-like as in-memory arrays.

    Only one block is in memory at a time, so memory-mapped or HDF5 sets larger than RAM
    can be streamed.

    Parameters
    ----------
    array : array-like, shape (n, d)
        Anything with ``.shape`` and row slicing (ndarray, np.memmap, h5py.Dataset).
    chunk_size : int
        Rows per block (the last block may be shorter).

    Yields
    ------
    start : int
        Index of the block's first row in ``array``.
    chunk : np.ndarray, shape (min(chunk_size, n - start), d)
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)):
        raise TypeError(f"chunk_size must be an int, got {type(chunk_size).__name__}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    n, _ = check_matrix(array, "iter_chunks")
    for start in range(0, n, chunk_size):
        yield start, np.asarray(array[start:start + chunk_size])


def chunk_rows(d: int, itemsize: int, budget_bytes: int = 1 << 26) -> int:
    """Rows of width ``d`` that fit in ``budget_bytes`` (at least 1): a block size for streaming."""
    return max(1, budget_bytes // max(1, d * itemsize))


def cast_rows(rows: np.ndarray, dtype, where: str, first_row: int = 0) -> np.ndarray:
    """Cast a block of rows to a file's value type, refusing casts that would corrupt values.

    Float targets accept any bool/int/float input (float64 -> float32 rounds, as every
    float32 format does).  Integer targets accept only bool/int input whose values fit.

    Parameters
    ----------
    rows : np.ndarray, shape (m, d)
    dtype : numpy dtype
        The file's value type.
    where : str
        What to name in the error (usually a file path).
    first_row : int
        Index of ``rows[0]`` in the whole array, so errors name the global row.

    Returns
    -------
    np.ndarray, shape (m, d), dtype ``dtype``
    """
    dtype = np.dtype(dtype)
    if rows.dtype == dtype:
        return rows
    allowed = "biuf" if dtype.kind == "f" else "biu"
    if rows.dtype.kind not in allowed:
        raise TypeError(f"{where}: cannot store {rows.dtype} values in a {dtype} file")
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        bad = ((rows < info.min) | (rows > info.max)).reshape(len(rows), -1).any(axis=1)
        if bad.any():
            raise ValueError(f"{where}: row {first_row + int(np.argmax(bad))} has values outside "
                             f"the {dtype} range [{info.min}, {info.max}]")
    return rows.astype(dtype)
