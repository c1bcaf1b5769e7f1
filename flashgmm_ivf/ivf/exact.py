"""Exact nearest neighbours by squared L2, computed about a centre.

FAISS's flat search takes BLAS products from ``faiss.cvar.distance_compute_blas_threshold``
queries on (128,000 in FAISS 1.15) and forms |q|^2 + |x|^2 - 2 <q, x> in float32: for rows
far from the origin next to their spread (an offset of 1e4 over unit spread) those terms
cancel to noise, and the nearest means of a large block of added vectors would come out
wrong (``faiss.Kmeans`` fails on such rows too, collapsing most of them into a few cells:
``partition.fit_kmeans`` centres its rows). Shifting both sides by a common centre leaves
the distances as they are and makes the cancellation relative to the spread. The index assigns
added vectors to lists and finds calibration neighbours with these functions.
"""
from __future__ import annotations

import faiss
import numpy as np

__all__ = ["knn_l2", "nearest_means", "pair_l2"]

_TILE = 4096  # rows of each side per product of the brute force (a 64 MiB distance tile)


def knn_l2(queries: np.ndarray, x: np.ndarray, k: int, center: np.ndarray):
    """Exact k nearest rows of x for every query by squared L2, by BLAS products in tiles.

    ``faiss.knn`` computes the pairs one by one below 128,000 queries (FAISS's
    ``distance_compute_blas_threshold``), several times slower than a product at d = 50.
    Both sides are shifted by ``center`` first, so the product's cancellation
    (|q|^2 + |x|^2 - 2 <q, x>) is relative to the data's spread, not to its offset.

    Parameters
    ----------
    queries : ndarray of shape (nq, d), float32
    x : ndarray of shape (n, d), float32, n >= k
    k : int
    center : ndarray of shape (d,), float32

    Returns
    -------
    D : ndarray of shape (nq, k), float32, ascending (>= 0)
    I : ndarray of shape (nq, k), int64, row numbers of x
    """
    nq, d = queries.shape
    D = np.empty((nq, k), np.float32)
    I = np.empty((nq, k), np.int64)
    tile = np.empty((min(_TILE, nq), min(_TILE, x.shape[0])), np.float32)
    for i0 in range(0, nq, _TILE):
        q = np.ascontiguousarray(queries[i0:i0 + _TILE] - center)
        heaps = faiss.float_maxheap_array_t()  # FAISS's own top-k merge over the tiles
        heaps.k, heaps.nh = k, q.shape[0]
        heaps.val, heaps.ids = faiss.swig_ptr(D[i0:i0 + _TILE]), faiss.swig_ptr(I[i0:i0 + _TILE])
        heaps.heapify()
        for j0 in range(0, x.shape[0], _TILE):
            xb = np.ascontiguousarray(x[j0:j0 + _TILE] - center)
            out = tile[:q.shape[0], :xb.shape[0]]
            if not out.flags.c_contiguous:  # a shorter last tile of x
                out = np.empty((q.shape[0], xb.shape[0]), np.float32)
            faiss.pairwise_L2sqr(d, q.shape[0], faiss.swig_ptr(q), xb.shape[0], faiss.swig_ptr(xb),
                                 faiss.swig_ptr(out), d, d, xb.shape[0])
            heaps.addn(xb.shape[0], faiss.swig_ptr(out), j0, 0, q.shape[0])
        heaps.reorder()
    np.maximum(D, 0, out=D)  # a product can round a copy's distance below 0
    return D, I


def nearest_means(x: np.ndarray, means: np.ndarray, k: int):
    """The k nearest means of every row of x: FAISS's flat search, both sides about the means' mean.

    A distance may differ in its last bits with the rows searched beside it (FAISS's kernels
    take several queries at a time, and from its BLAS threshold on, products about the centre);
    where a row's value must not depend on its block (a spill score against a threshold), take
    it from ``pair_l2``.

    Parameters
    ----------
    x : ndarray of shape (n, d), float32
    means : ndarray of shape (K, d), float32, K >= k

    Returns
    -------
    D : ndarray of shape (n, k), float32, squared L2, ascending
    I : ndarray of shape (n, k), int64, rows of ``means``
    """
    center = means.mean(0, dtype=np.float64).astype(np.float32)
    flat = faiss.IndexFlatL2(means.shape[1])
    flat.add(np.ascontiguousarray(means - center, dtype=np.float32))
    return flat.search(np.ascontiguousarray(x - center, dtype=np.float32), k)


def pair_l2(x: np.ndarray, means: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Squared L2 from each row of x to the means ``idx`` names, each pair computed on its own
    (``faiss.pairwise_indexed_L2sqr``): a row's values are the same whatever rows come with it.

    Parameters
    ----------
    x : ndarray of shape (n, d), float32
    means : ndarray of shape (K, d), float32
    idx : ndarray of shape (n, m), integer, entries in [0, K)

    Returns
    -------
    ndarray of shape (n, m), float32
    """
    n, m = idx.shape
    out = np.empty((n, m), np.float32)
    rows = np.ascontiguousarray(np.repeat(np.arange(n, dtype=np.int64), m))
    cols = np.ascontiguousarray(idx, dtype=np.int64).ravel()
    x, means = (np.ascontiguousarray(a, dtype=np.float32) for a in (x, means))
    faiss.pairwise_indexed_L2sqr(x.shape[1], n * m, faiss.swig_ptr(x), faiss.swig_ptr(rows), faiss.swig_ptr(means),
                                 faiss.swig_ptr(cols), faiss.swig_ptr(out))
    return out
