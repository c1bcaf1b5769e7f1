"""Searching a FAISS IndexIVF whose vectors may sit in several lists: the coarse step, the scan, the counts.

Small functions over real FAISS objects (in the style of ``faiss.contrib.ivf_tools``).
Every search function here and in :mod:`.probing` / :mod:`.pruning` returns ``(D, I)``
as FAISS does: ``D`` (nq, k) float32 and ``I`` (nq, k) int64, each row's ids distinct
(copies of one vector deduplicated, the best kept), -1 (distance +/-3.4e38, as FAISS)
only where the probed lists hold fewer than k distinct ids. Costs come back as FAISS's
``search_preassigned`` returns them through its ``IndexIVFStats*`` argument: pass
``stats=SearchStats()`` and the function adds its counts (from FAISS's own counters) to it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import faiss
import numpy as np

from .._validation import check_positive_int
from .coarse import means_index, ranking_cost

__all__ = ["PAD", "SearchStats", "cosine_from_l2", "dedup_results", "fetch_slots", "preassigned_raw",
           "range_search_nprobe", "ranked_lists", "search_nprobe", "search_preassigned"]

PAD = float(np.finfo(np.float32).max)  # FAISS's distance for a missing result (+ for L2, - for IP)


@dataclass
class SearchStats:
    """Cost of one search, in distance computations (one per D-dimensional product).

    Attributes
    ----------
    nq : int
        Queries.
    ndis : int
        Codes scanned in the inverted lists (``faiss.cvar.indexIVF_stats.ndis``), copies of
        one vector and re-fetches included.
    ncoarse : int
        Coarse-step distances: nlist per query for a flat quantizer, the distances the HNSW
        walks evaluated (``faiss.cvar.hnsw_stats.ndis``) for a graph, plus any distance the
        probing rule computes besides (e.g. mean-to-mean distances of radius pruning).
    nlists : int
        Lists scanned, summed over the queries.
    n_refetch : int
        Query rows searched again: with a larger over-fetch because copies crowded out
        distinct ids (only when an id was added more often than the over-fetch assumed), or
        over every list because the lists a recall target chose held fewer than k ids.
    """

    nq: int = 0
    ndis: int = 0
    ncoarse: int = 0
    nlists: int = 0
    n_refetch: int = 0

    @property
    def total(self) -> int:
        """Distance computations: ``ndis + ncoarse``."""
        return self.ndis + self.ncoarse

    @property
    def per_query(self) -> float:
        """Distance computations per query."""
        return self.total / self.nq if self.nq else 0.0

    def __add__(self, other: SearchStats) -> SearchStats:
        return SearchStats(self.nq + other.nq, self.ndis + other.ndis, self.ncoarse + other.ncoarse,
                           self.nlists + other.nlists, self.n_refetch + other.n_refetch)

    def add(self, other: SearchStats) -> None:
        """Add ``other``'s counts to these, in place (as FAISS's ``IndexIVFStats::add``)."""
        self.nq, self.ndis, self.ncoarse = self.nq + other.nq, self.ndis + other.ndis, self.ncoarse + other.ncoarse
        self.nlists, self.n_refetch = self.nlists + other.nlists, self.n_refetch + other.n_refetch


def cosine_from_l2(D, I):
    """Squared L2 distances of unit rows as cosine similarities (|q - x|^2 = 2 - 2 cos), in place.

    Missing results (``I == -1``) get -3.4e38, as FAISS pads inner-product results.
    """
    D *= -0.5
    D += 1.0
    D[I < 0] = -PAD
    return D


def ranked_lists(index_ivf: faiss.IndexIVF, x: np.ndarray, depth: int, *, ef_search: int | None = None):
    """The ``depth`` nearest lists of every query, their true coarse distances and what finding them cost.

    Parameters
    ----------
    index_ivf : faiss.IndexIVF whose quantizer is flat (``IndexFlat``: it evaluates all
        nlist means), an HNSW graph over the means (``IndexHNSW``, searched with efSearch
        at least ``depth``: it evaluates the means its walk visits) or a projected ranking
        (``IndexRefine`` of :func:`.coarse.projected_ranker`: counted by :func:`.coarse.ranking_cost`)
    x : ndarray of shape (nq, d), float32
    depth : int in [1, nlist]
    ef_search : int, optional
        efSearch of an HNSW walk, raised to ``depth`` (default: the graph's own
        ``hnsw.efSearch``, raised to ``depth``); ignored by a flat quantizer.

    Returns
    -------
    coarse_dis : ndarray of shape (nq, depth), float32, nearest first (squared L2 or inner product)
    list_nos : ndarray of shape (nq, depth), int64 (-1 where a graph walk found fewer lists)
    evaluations : int, query-to-mean distances computed, summed over the queries
    """
    depth = check_positive_int(depth, "depth")
    if depth > index_ivf.nlist:
        raise ValueError(f"depth must be <= nlist={index_ivf.nlist}, got {depth}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    quantizer = faiss.downcast_index(index_ivf.quantizer)
    if isinstance(quantizer, (faiss.IndexHNSW, faiss.IndexRefine)) and depth == index_ivf.nlist:
        # Every list: read from the means' flat storage, as a walk or a projection may miss some.
        coarse_dis, list_nos = means_index(quantizer).search(x, depth)
        return coarse_dis, list_nos, x.shape[0] * int(index_ivf.nlist)
    if isinstance(quantizer, faiss.IndexHNSW):
        ef = int(quantizer.hnsw.efSearch) if ef_search is None else check_positive_int(ef_search, "ef_search")
        params = faiss.SearchParametersHNSW(efSearch=max(ef, depth))
        faiss.cvar.hnsw_stats.reset()
        coarse_dis, list_nos = quantizer.search(x, depth, params=params)
        return coarse_dis, list_nos, int(faiss.cvar.hnsw_stats.ndis)
    if isinstance(quantizer, faiss.IndexRefine):
        k_factor = min(float(quantizer.k_factor), index_ivf.nlist / depth)  # no more than every mean re-ranked
        coarse_dis, list_nos = quantizer.search(x, depth, params=faiss.IndexRefineSearchParameters(k_factor=k_factor))
        return coarse_dis, list_nos, math.ceil(x.shape[0] * ranking_cost(quantizer, depth, k_factor))
    if isinstance(quantizer, faiss.IndexFlat):
        coarse_dis, list_nos = quantizer.search(x, depth)
        return coarse_dis, list_nos, x.shape[0] * int(index_ivf.nlist)
    raise TypeError(f"the quantizer must be a faiss.IndexFlat, IndexHNSW or IndexRefine (their distance evaluations "
                    f"are known), got {type(quantizer).__name__}")


def dedup_results(D, I, k, metric_type=faiss.METRIC_L2):
    """Keep the first (best) occurrence of every id, then the first k per row.

    Parameters
    ----------
    D : ndarray of shape (n, kk), float32, each row best first (FAISS order)
    I : ndarray of shape (n, kk), int64, -1 = no result
    k : int
    metric_type : faiss metric, chooses the padding distance (+max for L2, -max for IP)

    Returns
    -------
    D : ndarray of shape (n, k)
    I : ndarray of shape (n, k), distinct ids per row, -1 padded
    count : ndarray of shape (n,), distinct ids found per row (<= k)
    """
    n, kk = I.shape
    valid = I >= 0
    # Copies of a vector usually sit side by side (Flat codes: the same distance). Rows whose
    # repeats are all adjacent are deduplicated by comparing neighbours; the others (repeats
    # apart: PQ / SQ copies, ties) by sorting the ids.
    keep = valid.copy()
    keep[:, 1:] &= I[:, 1:] != I[:, :-1]
    ids = np.sort(I, axis=1)
    repeats = ((ids[:, 1:] == ids[:, :-1]) & (ids[:, 1:] >= 0)).sum(1)
    apart = np.flatnonzero(repeats != valid.sum(1) - keep.sum(1))
    if apart.size:
        order = np.argsort(I[apart], axis=1, kind="stable")  # equal ids together, best (earliest) first
        sorted_ids = np.take_along_axis(I[apart], order, 1)
        first = np.ones(order.shape, dtype=bool)
        first[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
        rows = np.empty_like(first)
        np.put_along_axis(rows, order, first, 1)
        keep[apart] = rows & valid[apart]
    if kk < k:  # fewer slots than asked for: pad the slots themselves
        pad_cols = k - kk
        D = np.hstack([D, np.zeros((n, pad_cols), D.dtype)])
        I = np.hstack([I, np.full((n, pad_cols), -1, I.dtype)])
        keep = np.hstack([keep, np.zeros((n, pad_cols), bool)])
    pos = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # kept slots first, in distance order
    count = np.minimum(keep.sum(1), k)
    Dk = np.take_along_axis(D, pos, 1)
    Ik = np.take_along_axis(I, pos, 1)
    missing = np.arange(k)[None, :] >= count[:, None]
    Ik[missing] = -1
    Dk[missing] = PAD if metric_type == faiss.METRIC_L2 else -PAD
    return Dk, Ik, count


def preassigned_raw(index_ivf: faiss.IndexIVF, x, k, list_nos, coarse_dis):
    """``IndexIVF.search_preassigned`` with the probe width taken from ``list_nos`` (list -1 is skipped).

    The contrib wrapper asserts ``index.nprobe``; this passes the width as search
    parameters instead, so the index's own nprobe is left alone. No deduplication.
    """
    n = x.shape[0]
    x = np.ascontiguousarray(x, dtype=np.float32)
    list_nos = np.ascontiguousarray(list_nos, dtype=np.int64)
    coarse_dis = np.ascontiguousarray(coarse_dis, dtype=np.float32)
    D = np.empty((n, k), dtype=np.float32)
    I = np.empty((n, k), dtype=np.int64)
    params = faiss.SearchParametersIVF(nprobe=max(1, list_nos.shape[1]))
    index_ivf.search_preassigned_c(n, faiss.swig_ptr(x), k, faiss.swig_ptr(list_nos), faiss.swig_ptr(coarse_dis),
                                   faiss.swig_ptr(D), faiss.swig_ptr(I), False, params)
    return D, I


def fetch_slots(k: int, max_dup: int = 1, copies: float | None = None) -> int:
    """Results fetched per query before deduplication, for k distinct ids.

    ``k * max_dup`` can never fall short, but FAISS's result heaps cost more the more slots
    they hold (a third more search time at k=100 and d=50). Given the mean ``copies`` per
    vector it is ``k + (copies - 1) k / 2 + 3 sqrt(k)``, at most ``k * max_dup``: repeats
    among a query's best results are a fraction of the vectors with a copy (at 1.5 copies,
    on average under 15% of them and at most 31% in any query of four benchmark sets), plus
    room for their spread from query to query; for small k this is the full ``k * max_dup``.
    A row still short of k distinct ids is fetched again with twice the slots
    (:func:`search_preassigned`): a low guess costs a second scan of that row, never results.
    """
    full = k * max_dup
    if copies is None or max_dup <= 1:
        return full
    return min(full, k + math.ceil((float(copies) - 1.0) / 2.0 * k + 3.0 * math.sqrt(k)))


def search_preassigned(index_ivf: faiss.IndexIVF, x, k, list_nos, coarse_dis, *, max_dup=1, copies=None, ncoarse=0,
                       stats=None):
    """k nearest distinct ids, each query scanning the lists given for it (FAISS's ``search_preassigned``).

    Over-fetches :func:`fetch_slots` results (k for a row probing one list), keeps each id's
    first (best) occurrence, and fetches rows again with twice the slots while copies crowded
    out distinct ids.

    Parameters
    ----------
    index_ivf : faiss.IndexIVF
    x : ndarray of shape (nq, d), float32
    k : int >= 1
    list_nos : ndarray of shape (nq, p), int64; -1 entries are skipped (a per-query depth)
    coarse_dis : ndarray of shape (nq, p), float32, true distances to the means of ``list_nos``
        (IVFPQ / IVFSQ use them as a term of their decomposed distances)
    max_dup : int, most lists any id was added to (sizes the over-fetch; a larger true count
        only costs re-fetches)
    copies : float, optional, mean lists per id (a smaller over-fetch, see :func:`fetch_slots`)
    ncoarse : int, the coarse-step distances that chose ``list_nos`` (added to ``stats.ncoarse``)
    stats : SearchStats, optional
        Output: this search's counts are added to it.

    Returns
    -------
    D : ndarray of shape (nq, k), float32
    I : ndarray of shape (nq, k), int64
    """
    k = check_positive_int(k, "k")
    x = np.ascontiguousarray(x, dtype=np.float32)
    list_nos = np.asarray(list_nos, dtype=np.int64)
    if list_nos.ndim != 2 or list_nos.shape[0] != x.shape[0] or np.shape(coarse_dis) != list_nos.shape:
        raise ValueError(f"list_nos and coarse_dis must both be (nq={x.shape[0]}, p), got {list_nos.shape} and "
                         f"{np.shape(coarse_dis)}")
    faiss.cvar.indexIVF_stats.reset()
    entries = int(index_ivf.ntotal)
    coarse_dis = np.asarray(coarse_dis)
    nq = x.shape[0]
    # A row probing one list cannot meet a vector twice (copies of a vector sit in distinct
    # lists), so it fetches only k: every slot of FAISS's result heap costs on each code scanned.
    one_list = (list_nos[:, 1:] < 0).all(1)
    slots = np.where(one_list, k, min(fetch_slots(k, max_dup, copies), max(k, entries)))
    D = np.empty((nq, k), np.float32)
    I = np.empty((nq, k), np.int64)
    rows, n_refetch = np.arange(nq), -nq
    while rows.size:
        n_refetch += rows.size
        short = []
        for kk in np.unique(slots[rows]):
            part = rows[slots[rows] == kk]
            sub = slice(None) if part.size == nq else part  # all rows: views, not copies
            raw_d, raw_i = preassigned_raw(index_ivf, x[sub], int(kk), list_nos[sub], coarse_dis[sub])
            D[sub], I[sub], count = dedup_results(raw_d, raw_i, k, index_ivf.metric_type)
            # Short rows whose kk slots were all filled (no -1): copies crowded out distinct ids
            # and the lists hold more, so fetch those rows again with twice the slots.
            short.append(part[(count < k) & (raw_i[:, -1] >= 0) & (kk < entries)])
        rows = np.concatenate(short)
        slots[rows] = np.minimum(2 * slots[rows], entries)
    if stats is not None:
        stats.add(SearchStats(x.shape[0], int(faiss.cvar.indexIVF_stats.ndis), int(ncoarse),
                              int((list_nos >= 0).sum()), n_refetch))
    return D, I


def search_nprobe(index_ivf: faiss.IndexIVF, x, k, nprobe, *, max_dup=1, copies=None, stats=None):
    """k nearest distinct ids scanning the ``nprobe`` nearest lists of every query (FAISS's IVF search).

    Parameters
    ----------
    index_ivf : faiss.IndexIVF with a flat or HNSW quantizer (an HNSW walk is given
        efSearch >= nprobe)
    x : ndarray of shape (nq, d), float32
    k, nprobe : int
    max_dup, copies, stats : see :func:`search_preassigned`

    Returns
    -------
    D, I : as :func:`search_preassigned`
    """
    coarse_dis, list_nos, evaluations = ranked_lists(index_ivf, x, nprobe)
    return search_preassigned(index_ivf, x, k, list_nos, coarse_dis, max_dup=max_dup, copies=copies,
                              ncoarse=evaluations, stats=stats)


def range_search_nprobe(index_ivf: faiss.IndexIVF, x, radius, nprobe, *, stats=None):
    """All ids within ``radius`` in the ``nprobe`` nearest lists of every query, each id once.

    Parameters
    ----------
    index_ivf : faiss.IndexIVF with a flat or HNSW quantizer
    x : ndarray of shape (nq, d), float32
    radius : float, FAISS's meaning (L2: distances below it; inner product: above it)
    nprobe : int
    stats : SearchStats, optional, output: this search's counts are added to it

    Returns
    -------
    lims, D, I : FAISS's range-search result (query i's results are ``lims[i]:lims[i+1]``),
        copies of a vector kept once (the best), each query's results best first
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = x.shape[0]
    coarse_dis, list_nos, evaluations = ranked_lists(index_ivf, x, nprobe)
    list_nos = np.ascontiguousarray(list_nos, dtype=np.int64)
    coarse_dis = np.ascontiguousarray(coarse_dis, dtype=np.float32)
    faiss.cvar.indexIVF_stats.reset()
    res = faiss.RangeSearchResult(n)
    params = faiss.SearchParametersIVF(nprobe=nprobe)
    index_ivf.range_search_preassigned_c(n, faiss.swig_ptr(x), float(radius), faiss.swig_ptr(list_nos),
                                         faiss.swig_ptr(coarse_dis), res, False, params)
    lims = faiss.rev_swig_ptr(res.lims, n + 1).copy().astype(np.int64)
    D = faiss.rev_swig_ptr(res.distances, int(lims[-1])).copy()
    I = faiss.rev_swig_ptr(res.labels, int(lims[-1])).copy()
    query = np.repeat(np.arange(n), np.diff(lims))
    key = D if index_ivf.metric_type == faiss.METRIC_L2 else -D  # smaller = better
    order = np.lexsort((key, I, query))  # per query, equal ids together, best first
    first = np.ones(order.size, dtype=bool)
    first[1:] = (query[order][1:] != query[order][:-1]) | (I[order][1:] != I[order][:-1])
    kept = order[first]
    kept = kept[np.lexsort((key[kept], query[kept]))]
    lims = np.concatenate([[0], np.cumsum(np.bincount(query[kept], minlength=n))]).astype(np.int64)
    if stats is not None:
        stats.add(SearchStats(n, int(faiss.cvar.indexIVF_stats.ndis), evaluations, int((list_nos >= 0).sum())))
    return lims, D[kept], I[kept]
