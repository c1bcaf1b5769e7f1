"""Exact k-nearest-neighbour ground truth with faiss, cached on disk by content hash."""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import faiss
import numpy as np

from .arrays import check_matrix, chunk_rows, iter_chunks
from .metric import check_metric, faiss_metric, prepare_for_search
from .paths import gt_cache_dir

# float32 bytes of one base block held by faiss at a time: bounds memory for any base size.
_BASE_BLOCK_BYTES = 1 << 28


def _check_inputs(base, queries, k: int, metric: str) -> int:
    """Validate the arguments of a k-NN search; return the dimension d."""
    check_metric(metric)
    n, d = check_matrix(base, "base")
    _, dq = check_matrix(queries, "queries")
    if dq != d:
        raise ValueError(f"queries have d={dq} but base has d={d}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..{n} (the base size), got {k}")
    return d


def exact_knn(base, queries, k: int, metric: str) -> np.ndarray:
    """Exact k nearest base rows of each query, streaming the base in blocks.

    Each block goes into a flat faiss index (``IndexFlatL2``, or ``IndexFlatIP`` for
    ``'ip'`` and normalised ``'angular'``), and the per-block top-k lists are merged with
    ``faiss.ResultHeap``.  Distances are float32, as in faiss: near-ties may swap order.

    Parameters
    ----------
    base : array-like, shape (n, d)
        Any array-like with row slicing (np.memmap, h5py.Dataset, ...).
    queries : array-like, shape (nq, d)
    k : int
        ``1 <= k <= n``.
    metric : {'l2', 'angular', 'ip'}

    Returns
    -------
    np.ndarray, shape (nq, k), int64
        Base row ids, nearest first.
    """
    d = _check_inputs(base, queries, k, metric)
    q = prepare_for_search(queries, metric)
    heap = faiss.ResultHeap(len(q), k, keep_max=faiss_metric(metric) == faiss.METRIC_INNER_PRODUCT)
    for start, block in iter_chunks(base, max(k, chunk_rows(d, 4, _BASE_BLOCK_BYTES))):
        index = faiss.IndexFlat(d, faiss_metric(metric))
        index.add(prepare_for_search(block, metric))
        dist, ids = index.search(q, min(k, len(block)))
        heap.add_result(dist, ids + start)
    heap.finalize()
    return heap.I


def content_key(base, queries, k: int, metric: str) -> str:
    """sha256 (hex) of the base and query bytes, their dtypes and shapes, ``k`` and ``metric``.

    Parameters
    ----------
    base : array-like, shape (n, d)
    queries : array-like, shape (nq, d)
    k : int
    metric : str
    """
    h = hashlib.sha256(f"k={k};metric={metric}".encode())
    for array in (base, queries):
        n, d = check_matrix(array, "array")
        dtype = np.dtype(array.dtype)
        h.update(f";{dtype.str}{(n, d)}".encode())
        for _, chunk in iter_chunks(array, chunk_rows(d, dtype.itemsize)):
            h.update(np.ascontiguousarray(chunk).data)
    return h.hexdigest()


def ground_truth(base, queries, k: int, metric: str = "l2", cache_dir=None) -> np.ndarray:
    """Exact k nearest base rows of each query, computed once and cached as ``.npy``.

    The cache file is ``cache_dir/gt-{metric}-k{k}-{sha256}.npy`` with the sha256 of
    ``content_key``, so a changed base, query set, k or metric never hits a stale entry.

    Parameters
    ----------
    base : array-like, shape (n, d)
    queries : array-like, shape (nq, d)
    k : int
        ``1 <= k <= n``.
    metric : {'l2', 'angular', 'ip'}
    cache_dir : str or Path or None
        Default ``~/.cache/flashgmm-ivf/gt``.

    Returns
    -------
    np.ndarray, shape (nq, k), int64
        Base row ids, nearest first (see ``exact_knn``).
    """
    _check_inputs(base, queries, k, metric)
    nq = queries.shape[0]
    folder = Path(cache_dir) if cache_dir is not None else gt_cache_dir()
    path = folder / f"gt-{metric}-k{k}-{content_key(base, queries, k, metric)}.npy"
    if path.exists():
        ids = np.load(path, allow_pickle=False)
        if ids.shape != (nq, k):
            raise ValueError(f"{path}: cached ground truth has shape {ids.shape}, expected "
                             f"{(nq, k)}; delete the file to recompute it")
        return ids
    ids = exact_knn(base, queries, k, metric)
    _save_atomic(path, ids)
    return ids


def _save_atomic(path: Path, array: np.ndarray) -> None:
    # Write then rename, so a concurrent reader never sees a half-written cache file.
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
        np.save(f, array, allow_pickle=False)
    os.replace(f.name, path)
