"""Radius pruning of a FAISS IVF search: skip the lists that cannot beat the k-th neighbour found so far.

A query visits its lists nearest mean first, one rank at a time, and keeps its best k
distinct ids. Every vector is stored (at least) in the list of its nearest mean, so a
vector of list j lies in the half-space of points nearer to c_j than to c_1 (the
query's nearest mean), and its distance to the query q is at least

    b_j = (|q - c_j|^2 - |q - c_1|^2) / (2 |c_j - c_1|)

(the distance from q to that half-space's boundary). List j is scanned only while
``b_j <= scale * r``, r the distance of the query's ``rank``-th neighbour so far (default
the k-th; a smaller rank prunes for recall@rank while still returning k results). At
``scale = 1`` no vector's primary copy that could enter the first ``rank`` results is
skipped, so on a hard partition they are exactly what scanning all ``nprobe`` lists gives; a smaller
scale trades recall for codes, like a smaller nprobe, but per query: a query whose
neighbours are close stops early, one whose k-th neighbour is far goes on. ``nprobe``
caps the depth. Copies added by spilling rules (SOAR, ...) sit outside their list's
half-space; they are scanned or skipped with it.

Cost: the codes scanned plus the coarse step (:func:`.probing.ranked_lists`) plus the
mean-to-mean distances |c_j - c_1| the bounds need (one per list rank beyond the first).
Works on any ``faiss.IndexIVF`` with an L2 metric and any coarse step of :mod:`.coarse` (an
angular set: normalise the rows and index them by L2).
"""
from __future__ import annotations

import numbers

import faiss
import numpy as np

from .search import SearchStats, dedup_results, preassigned_raw, ranked_lists

__all__ = ["halfspace_bounds", "search_pruned"]


def halfspace_bounds(centroids: np.ndarray, coarse_dis: np.ndarray, list_nos: np.ndarray) -> np.ndarray:
    """Lower bound on the distance from each query to the vectors whose nearest mean is each of its lists.

    Parameters
    ----------
    centroids : ndarray of shape (nlist, d), the lists' means
    coarse_dis : ndarray of shape (nq, depth), squared L2 distances to the means of ``list_nos``, nearest first
    list_nos : ndarray of shape (nq, depth), int64; column 0 is the query's nearest mean, -1 = no list

    Returns
    -------
    ndarray of shape (nq, depth), float64, >= 0; 0 in column 0, +inf where ``list_nos`` is -1
    """
    coarse_dis = np.asarray(coarse_dis, dtype=np.float64)
    list_nos = np.asarray(list_nos)
    if coarse_dis.shape != list_nos.shape or coarse_dis.ndim != 2:
        raise ValueError(f"coarse_dis and list_nos must both be (nq, depth), got {coarse_dis.shape} and "
                         f"{list_nos.shape}")
    if list_nos.size and (list_nos[:, 0] < 0).any():
        raise ValueError(f"every query needs its nearest list in column 0; first row without: "
                         f"{int(np.flatnonzero(list_nos[:, 0] < 0)[0])}")
    centroids = np.asarray(centroids, dtype=np.float64)
    valid = list_nos >= 0
    nearest = centroids[list_nos[:, 0]]
    # Column by column: an (nq, depth, d) block of means would take gigabytes at large nprobe.
    spacing = np.empty(list_nos.shape)
    for j in range(list_nos.shape[1]):
        spacing[:, j] = np.linalg.norm(centroids[np.where(valid[:, j], list_nos[:, j], 0)] - nearest, axis=1)
    gap = np.maximum(coarse_dis - coarse_dis[:, :1], 0.0)
    # Two means at one point (spacing 0) split nothing: no bound.
    with np.errstate(divide="ignore", invalid="ignore"):
        bounds = np.where(spacing > 0, gap / (2 * spacing), 0.0)
    bounds[:, 0] = 0.0
    bounds[~valid] = np.inf
    return bounds


def search_pruned(index_ivf: faiss.IndexIVF, x: np.ndarray, k: int, nprobe, scale: float, rank: int | None = None,
                  ranked=None, stats: SearchStats | None = None):
    """k nearest distinct ids, each query skipping the lists its radius bound rules out.

    Parameters
    ----------
    index_ivf : faiss.IndexIVF, L2 metric, any coarse step of :mod:`.coarse`; vectors may sit in several lists
    x : ndarray of shape (nq, d), float32
    k : int
    nprobe : int, or ndarray of shape (nq,) of ints (e.g. from a :class:`.probing.ProbeTable`): most lists
        a query scans (its nearest ``nprobe`` means)
    scale : float > 0, bound multiplier (1: exact over the ``nprobe`` lists for a hard partition)
    rank : int in [1, k], optional
        Prune against the distance of the query's rank-th neighbour so far (default k): at
        scale 1 the first ``rank`` results are exact over the ``nprobe`` lists.
    ranked : tuple (coarse_dis, list_nos, evaluations), optional
        The queries' ranked lists, already found (as :func:`.search.ranked_lists` returns them).
    stats : :class:`.search.SearchStats`, optional
        Output: this search's counts are added to it; ``ncoarse`` counts the coarse walk and
        the mean-to-mean distances of the bounds, ``nlists`` the lists actually scanned.

    Returns
    -------
    D : ndarray of shape (nq, k), float32, squared L2, best first
    I : ndarray of shape (nq, k), int64, distinct ids, -1 padded (distance: float32 max, as FAISS)
    """
    if index_ivf.metric_type != faiss.METRIC_L2:
        raise ValueError("radius pruning needs an L2 index (normalise angular data and index it by L2)")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not scale > 0:
        raise ValueError(f"scale must be a number > 0, got {scale!r}")
    rank = k if rank is None else rank
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or not 1 <= rank <= k:
        raise ValueError(f"rank must be an integer in [1, k={k}], got {rank!r}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    nq = x.shape[0]
    caps = np.asarray(nprobe)
    if caps.dtype.kind not in "iu" or caps.shape not in ((), (nq,)) \
            or (nq and (caps.min() < 1 or caps.max() > index_ivf.nlist)):
        raise ValueError(f"nprobe must be an integer, or {nq} integers (one per query), in "
                         f"[1, nlist={index_ivf.nlist}]")
    caps = np.broadcast_to(caps, (nq,))
    width = int(caps.max(initial=1))
    coarse_dis, list_nos, evaluations = ranked if ranked is not None else ranked_lists(index_ivf, x, width)
    coarse_dis, list_nos = np.asarray(coarse_dis)[:, :width], np.asarray(list_nos)[:, :width]
    if list_nos.shape != (nq, width):
        raise ValueError(f"ranked lists must be at least (nq={nq}, {width}), got {list_nos.shape}")
    list_nos = np.where(np.arange(list_nos.shape[1]) < caps[:, None], list_nos, -1)
    centroids = index_ivf.quantizer.reconstruct_n(0, index_ivf.nlist)
    bounds = halfspace_bounds(centroids, coarse_dis, list_nos)
    evaluations += int((list_nos[:, 1:] >= 0).sum())
    D = np.full((nq, k), np.inf, np.float32)
    I = np.full((nq, k), -1, np.int64)
    scanned = np.zeros(nq, np.int64)
    faiss.cvar.indexIVF_stats.reset()
    for col in range(list_nos.shape[1]):
        radius = np.sqrt(D[:, rank - 1].astype(np.float64))  # inf until rank ids are found
        rows = np.flatnonzero(bounds[:, col] <= scale * radius)
        if rows.size == 0:
            continue
        # A list holds an id once, so k results per list are enough to merge.
        d_new, i_new = preassigned_raw(index_ivf, x[rows], k, list_nos[rows, col:col + 1],
                                       coarse_dis[rows, col:col + 1])
        d_all = np.hstack([D[rows], d_new])
        i_all = np.hstack([I[rows], i_new])
        order = np.argsort(d_all, axis=1, kind="stable")
        d_all, i_all = np.take_along_axis(d_all, order, 1), np.take_along_axis(i_all, order, 1)
        D[rows], I[rows], _ = dedup_results(d_all, i_all, k, index_ivf.metric_type)
        scanned[rows] += 1
    # Rows that never filled k slots keep +inf from the start: FAISS pads with float32 max.
    D[I < 0] = np.finfo(np.float32).max
    if stats is not None:
        stats.add(SearchStats(nq, int(faiss.cvar.indexIVF_stats.ndis), evaluations, int(scanned.sum())))
    return D, I

