"""``read_vectors`` / ``write_vectors``: one entry point for every vector file format,
chosen by the file's suffix."""
from __future__ import annotations

from functools import partial
from pathlib import Path

import h5py
import numpy as np

from .bigann import BIN_DTYPES, read_bin, write_bin
from .hdf5 import HDF5_SUFFIXES, read_hdf5_vectors, write_hdf5_vectors
from .npy import read_npy, write_npy
from .texmex import TEXMEX_DTYPES, read_texmex, write_texmex

# suffix -> (reader(path, *, start, count), writer(path, array)); HDF5 is separate: it needs a key.
_FORMATS = {
    **{s: (partial(read_texmex, dtype=t), partial(write_texmex, dtype=t))
       for s, t in TEXMEX_DTYPES.items()},
    **{s: (partial(read_bin, dtype=t), partial(write_bin, dtype=t)) for s, t in BIN_DTYPES.items()},
    ".npy": (read_npy, write_npy),
}

#: Every suffix ``read_vectors`` and ``write_vectors`` accept (compared case-insensitively).
SUPPORTED_SUFFIXES = (*_FORMATS, *HDF5_SUFFIXES)

_DEFAULT_HDF5_KEY = "train"


def _suffix(path: Path, key: str | None) -> str:
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise ValueError(f"{path}: unknown vector file suffix {suffix!r}; supported: "
                         f"{', '.join(SUPPORTED_SUFFIXES)}")
    if key is not None and suffix not in HDF5_SUFFIXES:
        raise ValueError(f"{path}: key={key!r} applies only to HDF5 files "
                         f"({', '.join(HDF5_SUFFIXES)})")
    return suffix


def read_vectors(path, *, start: int = 0, count: int | None = None,
                 key: str | None = None) -> np.ndarray | h5py.Dataset:
    """Read rows ``[start, start + count)`` of a vector file without loading it into memory.

    Parameters
    ----------
    path : str or Path
        A file whose suffix is one of ``SUPPORTED_SUFFIXES``: texmex ``.fvecs .ivecs .bvecs``,
        big-ann ``.fbin .ibin .u8bin .i8bin``, ``.npy``, or HDF5 ``.hdf5 .h5``.
    start : int
        First row.
    count : int or None
        Rows to read; None means up to the end.
    key : str or None
        HDF5 only: the dataset to read (default ``'train'``, the ann-benchmarks base set).

    Returns
    -------
    np.memmap or h5py.Dataset or np.ndarray, shape (count, d)
        A read-only memory map for the binary formats and ``.npy``; for HDF5, see
        ``hdf5.read_hdf5_vectors``.

    Raises
    ------
    ValueError
        Unknown suffix, a window outside the file, or a malformed file.
    """
    path = Path(path)
    suffix = _suffix(path, key)
    if suffix in HDF5_SUFFIXES:
        return read_hdf5_vectors(path, key or _DEFAULT_HDF5_KEY, start=start, count=count)
    return _FORMATS[suffix][0](path, start=start, count=count)


def write_vectors(path, array, *, key: str | None = None) -> None:
    """Write a 2-D array-like to a vector file in the format its suffix names.

    The array is streamed block by block, so memory-mapped or HDF5 sources larger than RAM
    can be converted between formats.

    Parameters
    ----------
    path : str or Path
        Suffix one of ``SUPPORTED_SUFFIXES``.
    array : array-like, shape (n, d)
        Converted to the format's value type; a cast that would change values (floats into
        an integer format, integers out of range) raises.  ``.npy`` and HDF5 keep the dtype.
    key : str or None
        HDF5 only: the dataset to write (default ``'train'``); other datasets are kept.
    """
    path = Path(path)
    suffix = _suffix(path, key)
    if suffix in HDF5_SUFFIXES:
        write_hdf5_vectors(path, key or _DEFAULT_HDF5_KEY, array)
    else:
        _FORMATS[suffix][1](path, array)
