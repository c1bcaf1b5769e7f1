"""ann-benchmarks HDF5 files: datasets ``train``, ``test``, ``neighbors``, ``distances`` and
the root attribute ``distance`` (``'euclidean'``, ``'angular'``, ...).

Lazy reads return ``h5py.Dataset`` objects: they keep the file open and read only the rows
that are indexed.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from .arrays import check_matrix, chunk_rows, iter_chunks, row_window

#: Suffixes read as HDF5.
HDF5_SUFFIXES = (".hdf5", ".h5")
#: Datasets every ann-benchmarks file holds.
ANN_KEYS = ("train", "test", "neighbors", "distances")


@dataclass(frozen=True)
class AnnBenchmarksFile:
    """Contents of an ann-benchmarks HDF5 file.

    Attributes
    ----------
    train : h5py.Dataset or np.ndarray, shape (n, d)
        Base vectors.
    test : h5py.Dataset or np.ndarray, shape (nq, d)
        Queries.
    neighbors : h5py.Dataset or np.ndarray, shape (nq, k)
        Ids of each query's exact nearest train rows, nearest first.
    distances : h5py.Dataset or np.ndarray, shape (nq, k)
        Their distances.
    distance : str
        The file's metric name, e.g. ``'euclidean'`` or ``'angular'``.
    """

    train: h5py.Dataset | np.ndarray
    test: h5py.Dataset | np.ndarray
    neighbors: h5py.Dataset | np.ndarray
    distances: h5py.Dataset | np.ndarray
    distance: str


@contextmanager
def _readable(path: Path):
    """HDF5 library errors of a damaged file (h5py raises OSError, KeyError or RuntimeError for
    a bad superblock, object header or heap) as a ValueError naming the file."""
    try:
        yield
    except FileNotFoundError:
        raise
    except (OSError, KeyError, RuntimeError) as err:
        raise ValueError(f"{path}: not a readable HDF5 file (damaged or truncated?): {err}") from err


def _dataset(f: h5py.File, key: str, path: Path) -> h5py.Dataset:
    if key not in f or not isinstance(f[key], h5py.Dataset):
        raise ValueError(f"{path}: no dataset {key!r}; found {sorted(f.keys())}")
    check_matrix(f[key], f"{path}[{key!r}]")
    return f[key]


def _check_consistent(path, train, test, neighbors, distances) -> None:
    """The four datasets describe one ground truth: same d, (nq, k) answers, ids of train rows."""
    (n, d), nq = train.shape, test.shape[0]
    if test.shape[1] != d:
        raise ValueError(f"{path}: test has dimension {test.shape[1]}, train has {d}")
    if neighbors.shape[0] != nq or distances.shape != neighbors.shape:
        raise ValueError(f"{path}: neighbors {neighbors.shape} and distances {distances.shape} must both be "
                         f"(n_test, k) with n_test = {nq}")
    if not np.issubdtype(neighbors.dtype, np.integer):
        raise ValueError(f"{path}: neighbors must hold integer ids, got dtype {neighbors.dtype}")
    for start, block in iter_chunks(neighbors, 1 << 16):
        bad = np.flatnonzero(((block < 0) | (block >= n)).any(axis=1))
        if bad.size:
            row = start + int(bad[0])
            raise ValueError(f"{path}: neighbors row {row} holds id(s) outside [0, {n}) (n_train = {n}): "
                             f"{[int(i) for i in np.asarray(neighbors[row]) if not 0 <= i < n][:5]}")


def read_ann_hdf5(path, *, lazy: bool = True) -> AnnBenchmarksFile:
    """Read an ann-benchmarks HDF5 file.

    Parameters
    ----------
    path : str or Path
    lazy : bool
        True: return ``h5py.Dataset`` objects (the file stays open while they live).
        False: load every dataset into memory and close the file.

    Returns
    -------
    AnnBenchmarksFile

    Raises
    ------
    ValueError
        A dataset of ``ANN_KEYS`` or the ``distance`` attribute is missing; ``test`` and
        ``train`` differ in dimension; ``neighbors`` and ``distances`` are not of shape
        (nq, k); ``neighbors`` is not integer or holds an id outside [0, n) (the first bad
        row is named).
    """
    path = Path(path)
    with ExitStack() as stack, _readable(path):
        f = stack.enter_context(h5py.File(path, "r"))
        missing = [k for k in ANN_KEYS if k not in f]
        if missing:
            raise ValueError(f"{path}: not an ann-benchmarks file: missing dataset(s) {missing}; "
                             f"expected {list(ANN_KEYS)}, found {sorted(f.keys())}")
        if "distance" not in f.attrs:
            raise ValueError(f"{path}: not an ann-benchmarks file: no 'distance' attribute")
        distance = f.attrs["distance"]
        distance = distance.decode() if isinstance(distance, bytes) else str(distance)
        arrays = {k: _dataset(f, k, path) for k in ANN_KEYS}
        _check_consistent(path, **arrays)
        if lazy:
            stack.pop_all()  # the returned datasets keep reading from the open file
        else:
            arrays = {k: v[()] for k, v in arrays.items()}
        return AnnBenchmarksFile(**arrays, distance=distance)


def write_ann_hdf5(path, *, train, test, neighbors, distances, distance: str) -> None:
    """Write an ann-benchmarks HDF5 file (overwriting ``path``).

    Parameters
    ----------
    path : str or Path
    train : array-like, shape (n, d)
    test : array-like, shape (nq, d)
    neighbors : array-like, shape (nq, k)
    distances : array-like, shape (nq, k)
    distance : str
        Metric name stored as the ``distance`` attribute, e.g. ``'euclidean'``.
    """
    path = Path(path)
    with h5py.File(path, "w") as f:
        f.attrs["distance"] = distance
        for key, array in zip(ANN_KEYS, (train, test, neighbors, distances)):
            _copy_into(f, key, array, path)


def read_hdf5_vectors(path, key: str, *, start: int = 0,
                      count: int | None = None) -> h5py.Dataset | np.ndarray:
    """Read one 2-D dataset of an HDF5 file.

    Parameters
    ----------
    path : str or Path
    key : str
        Dataset name, e.g. ``'train'``.
    start : int
        First row.
    count : int or None
        Rows wanted; None means up to the end.

    Returns
    -------
    h5py.Dataset or np.ndarray, shape (count, d)
        The lazy dataset when the whole of it is asked for; otherwise the window, read into
        memory (h5py has no lazy row views).
    """
    path = Path(path)
    with ExitStack() as stack, _readable(path):
        f = stack.enter_context(h5py.File(path, "r"))
        ds = _dataset(f, key, path)
        start, stop = row_window(ds.shape[0], start, count, f"{path}[{key!r}]")
        if (start, stop) == (0, ds.shape[0]):
            stack.pop_all()  # the returned dataset keeps reading from the open file
            return ds
        return ds[start:stop]


def write_hdf5_vectors(path, key: str, array) -> None:
    """Write a 2-D array-like as dataset ``key`` of an HDF5 file, keeping its other datasets.

    Parameters
    ----------
    path : str or Path
        Created if absent.
    key : str
        Dataset name; an existing dataset of that name is replaced.
    array : array-like, shape (n, d)
    """
    path = Path(path)
    with h5py.File(path, "a") as f:
        if key in f:
            del f[key]
        _copy_into(f, key, array, path)


def _copy_into(f: h5py.File, key: str, array, path: Path) -> None:
    # Block by block, so a memory-mapped source larger than RAM can be copied.
    n, d = check_matrix(array, f"{path}[{key!r}]")
    dtype = np.dtype(array.dtype)
    ds = f.create_dataset(key, shape=(n, d), dtype=dtype)
    for start, chunk in iter_chunks(array, chunk_rows(d, dtype.itemsize)):
        ds[start:start + len(chunk)] = chunk
