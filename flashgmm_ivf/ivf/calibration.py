"""Calibration queries and their exact neighbours, and the depth table fitted on them.

A :class:`Calibration` holds stand-in queries (held-out training rows, or real queries
given to ``GMMIndexIVF.calibrate``) with their exact ``K_CAL`` nearest ids among the
vectors of the index. The neighbours are kept up to date as vectors are added
(:meth:`Calibration.update`: a brute force of the queries against each added block,
:func:`knn_l2`, merged into the running best), so they are exact for any encoding (PQ and
SQ included) without keeping the raw vectors.

The first copy of a query met among the added vectors (squared L2 distance at most
``SELF_TOLERANCE`` |q - m|^2, m the queries' mean: a product-based distance leaves a
roundoff of ~1e-6 of that on an exact copy) is taken to be the query itself and not
counted as its neighbour: a held-out training row may itself be added to the index
(training on the base set is common), and it would then be found at depth 1 by
construction, making every depth look cheaper than it is for a real query. Further
copies (duplicates in the data) are counted.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import NamedTuple

import faiss
import numpy as np
from tqdm.auto import tqdm

from .coarse import build, install, means_index
from .exact import knn_l2
from .probing import (SPREAD_RANK, ListMembers, ProbeTable, ProbeTables, found_within, list_members,
                      neighbor_depths, query_difficulty, scan_costs)
from .search import dedup_results, ranked_lists

__all__ = ["DEEP_WALKS", "GRAPH_LINKS", "K_CAL", "LINK_MARGIN", "LINK_QUERIES", "LINK_RECALLS", "PROJECTED_DIMS",
           "REACH", "REACH_QUERIES", "SELF_TOLERANCE", "TABLE_CELLS", "WIDTHS", "Calibration",
           "coarse_candidates", "fit_coarse_and_table", "fit_table", "table_depth", "walk_depths"]

K_CAL = 10  # recall@10 is what ``search(..., recall=)`` targets
# A stand-in's own copy: squared distance at most this x |q - m|^2, m the queries' mean (the
# roundoff of a product-based distance is ~1e-6 of that; a distinct row this close is a copy
# for any purpose).
SELF_TOLERANCE = 1e-4
# Widths of a graph quantizer's first walk (its efSearch) a depth table is fitted for.
WIDTHS = (4, 6, 8, 12, 16, 24, 32)
# Deeper walks measured per table (see walk_depths): 16 depths from 4 to 256 lie 1.3x apart.
DEEP_WALKS = 16
# Links per node (HNSW M) tried for a graph whose M is calibrated, and the recall targets whose
# expected costs choose among them.
GRAPH_LINKS = (8, 16, 32)
# Dimensions of the projected rankings tried (those at most d / 4): on 784-d rows 32 rank the
# exact top lists as well as a graph walk for half its cost, on GIST-like 960-d rows 128.
PROJECTED_DIMS = (32, 64, 128)
LINK_RECALLS = (0.8, 0.9, 0.95, 0.99)
# Expected saving a coarse step other than the densest graph must show on the calibration
# queries to be kept (see fit_coarse_and_table).
LINK_MARGIN = 0.05
LINK_QUERIES = 2048  # calibration queries the choice of links is made on
# Mean recall@K_CAL a table's deepest probe reaches on the calibration queries (table_depth),
# measured on this many of them (40,960 neighbours: the 0.995 quantile to about +-0.001).
REACH = 0.995
REACH_QUERIES = 4096
_RANK_BLOCK = 1024  # queries per exact ranking of every list in table_depth
# Cells (calibration queries x depth) of a table deepened for REACH: the fit's float64
# (queries, depth) arrays then take at most 512 MiB each.
TABLE_CELLS = 1 << 26


@dataclass
class Calibration:
    """Calibration queries and their exact K_CAL nearest ids in the index.

    Attributes
    ----------
    queries : ndarray of shape (nc, d), float32 (as the index sees them: normalised for 'cosine')
    ids : ndarray of shape (nc, K_CAL), int64, nearest first, -1 while fewer vectors were added
    distances : ndarray of shape (nc, K_CAL), float32, the matching distances (+inf / -inf where -1)
    metric_type : faiss.METRIC_L2 or faiss.METRIC_INNER_PRODUCT
    source : str, 'training rows' or 'queries'
    self_pending : ndarray of shape (nc,), bool
        True while the query's own copy (its first exact copy, L2 only) has not been met and skipped.
    """

    queries: np.ndarray
    ids: np.ndarray
    distances: np.ndarray
    metric_type: int
    source: str
    self_pending: np.ndarray

    @classmethod
    def empty(cls, queries: np.ndarray, metric_type: int, source: str) -> Calibration:
        """Queries with no neighbours yet (an empty index)."""
        nc = queries.shape[0]
        worst = np.inf if metric_type == faiss.METRIC_L2 else -np.inf
        return cls(np.ascontiguousarray(queries, dtype=np.float32), np.full((nc, K_CAL), -1, np.int64),
                   np.full((nc, K_CAL), worst, np.float32), int(metric_type), source,
                   np.full(nc, metric_type == faiss.METRIC_L2))

    @functools.cached_property
    def _center(self) -> np.ndarray:
        """The queries' mean (d,), float32: the origin of the brute force's products."""
        return self.queries.mean(0, dtype=np.float64).astype(np.float32)

    def spaced(self, n: int) -> Calibration:
        """About n evenly spaced queries with their neighbours (self when it holds no more than 2n)."""
        step = self.queries.shape[0] // max(1, n)
        if step < 2:
            return self
        return dataclasses.replace(self, queries=self.queries[::step], ids=self.ids[::step],
                                   distances=self.distances[::step], self_pending=self.self_pending[::step])

    @property
    def n_found(self) -> int:
        """Fewest neighbours any query has (K_CAL once the index holds enough vectors)."""
        return int((self.ids >= 0).sum(1).min(initial=K_CAL))

    def update(self, x: np.ndarray, ids: np.ndarray) -> None:
        """Merge the vectors ``x`` (with ``ids``), just added to the index, into the running neighbours."""
        if x.shape[0] == 0 or self.queries.shape[0] == 0:
            return
        k = min(K_CAL + 1, x.shape[0])  # one more: the query's own copy may be among them
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.metric_type == faiss.METRIC_L2:
            dis, pos = knn_l2(self.queries, x, k, self._center)
        else:
            dis, pos = faiss.knn(self.queries, x, k, metric=self.metric_type)
        new_ids = np.where(pos >= 0, ids[np.maximum(pos, 0)], -1)
        self.merge_results(dis, new_ids)

    def merge(self, other: Calibration) -> None:
        """Merge the neighbours of ``other`` (same queries, disjoint vectors: another shard)."""
        if other.queries.shape != self.queries.shape or not np.array_equal(other.queries, self.queries):
            raise ValueError("the calibrations hold different queries (indexes from different trainings?)")
        self.self_pending &= other.self_pending  # a shard met the query's own copy: it is skipped
        self.merge_results(other.distances, other.ids, skip_self=False)

    def merge_results(self, dis, ids, *, skip_self=True):
        """Merge search results (nc, m) for the queries, best first, into the running neighbours.

        With ``skip_self``, the first copy (distance <= ``SELF_TOLERANCE`` |q - m|^2, m the
        queries' mean) of a query whose own copy is still pending is skipped (see the module
        docstring).
        """
        l2 = self.metric_type == faiss.METRIC_L2
        dis = np.asarray(dis, dtype=np.float32)
        ids = np.array(ids, dtype=np.int64)
        if l2 and skip_self:
            spread = self.queries - self._center
            tolerance = SELF_TOLERANCE * np.einsum("nd,nd->n", spread, spread, dtype=np.float64)
            zero = (dis <= tolerance[:, None]) & (ids >= 0)
            rows = np.flatnonzero(zero.any(1) & self.self_pending)
            ids[rows, zero[rows].argmax(1)] = -1
            self.self_pending[rows] = False
        all_d = np.hstack([self.distances, dis])
        all_i = np.hstack([self.ids, ids])
        worst = np.inf if l2 else -np.inf
        all_d = np.where(all_i >= 0, all_d, worst)
        order = np.argsort(all_d if l2 else -all_d, axis=1, kind="stable")
        all_d, all_i = np.take_along_axis(all_d, order, 1), np.take_along_axis(all_i, order, 1)
        # One id may come twice (its copies in two lists, or added twice): keep its best.
        self.distances, self.ids, _ = dedup_results(all_d.astype(np.float32), all_i, K_CAL, self.metric_type)


def table_depth(index_ivf: faiss.IndexIVF, calibration: Calibration, members: ListMembers | None = None) -> int:
    """Deepest probe a fitted table may give a query.

    A quarter of the lists, at least 128 (at most nlist), or deeper where the calibration
    queries need more lists for a mean recall@K_CAL of ``REACH``: asked for a recall above
    what the deepest probe reaches, a search can only stop there, and data with little
    cluster structure (near-uniform rows, inner product over rows of varied norms) need far
    more than a quarter of the lists for recall 0.99. The need is read from an exact ranking
    of the lists (the means' flat storage) for at most ``REACH_QUERIES`` calibration
    queries; a deepened table stops at ``TABLE_CELLS`` cells (calibration queries x depth).

    Parameters
    ----------
    index_ivf : faiss.IndexIVF (any coarse step of :mod:`.coarse`), holding the calibration's neighbours
    calibration : Calibration
    members : ListMembers of ``index_ivf``, optional (read from it when not given)

    Returns
    -------
    int in [1, nlist]
    """
    nlist = index_ivf.nlist
    depth = min(nlist, max(128, nlist // 4))
    deepest = min(nlist, max(depth, TABLE_CELLS // max(1, len(calibration.queries))))
    if depth == deepest:
        return depth
    members = list_members(index_ivf) if members is None else members
    subset = calibration.spaced(REACH_QUERIES)
    means = means_index(index_ivf.quantizer)
    for width in (depth, deepest):
        # Blocks of queries bound the (queries, nlist) ranks neighbor_depths builds.
        depths = np.concatenate([
            neighbor_depths(means.search(subset.queries[i:i + _RANK_BLOCK], width)[1], members,
                            subset.ids[i:i + _RANK_BLOCK])
            for i in range(0, len(subset.queries), _RANK_BLOCK)])
        need = int(np.quantile(depths, REACH, method="higher")) + 1  # lists probed, not a 0-based rank
        if need <= width:
            return max(depth, need)
    return deepest


def fit_table(index_ivf: faiss.IndexIVF, calibration: Calibration, n_bins: int,
              widths: tuple[int, ...] = WIDTHS, depth: int | None = None,
              members: ListMembers | None = None) -> ProbeTables:
    """Depth tables for recall@K_CAL, fitted on ``calibration`` over the lists of ``index_ivf``.

    Parameters
    ----------
    index_ivf : faiss.IndexIVF (any coarse step of :mod:`.coarse`), holding the calibration's neighbours
    calibration : Calibration with K_CAL neighbours for every query
    n_bins : int, difficulty bins (1: one depth for all queries, a calibrated nprobe)
    widths : tuple of int
        Widths of a graph's or projected ranking's first walk: one table for each (see
        :class:`.probing.ProbeTables`). A flat quantizer ranks every list at once: one table,
        its feature on ``SPREAD_RANK`` lists.
    depth : int, optional
        Deepest probe of the tables (default: :func:`table_depth`).
    members : ListMembers of ``index_ivf``, optional (read from it when not given)

    Returns
    -------
    ProbeTables. With a graph or a projected ranking (whose cost grows with the depth asked;
    both called walks here) the costs count the coarse walks a search makes
    besides the codes scanned: the first walk's mean distances at every depth, and past
    its width the mean distances of a walk with efSearch = the depth; recall within the
    width is what the first walk's lists reach, past it what that deeper walk's reach.
    """
    if calibration.n_found < K_CAL:
        raise ValueError(f"calibration needs every query to have {K_CAL} neighbours in the index; the index holds "
                         f"too few vectors ({calibration.n_found} found for some query)")
    queries = calibration.queries
    members = list_members(index_ivf) if members is None else members
    depth = table_depth(index_ivf, calibration, members) if depth is None else min(int(depth), index_ivf.nlist)
    binned = n_bins > 1

    def feature(d, rank):
        return query_difficulty(d, queries, rank, index_ivf.metric_type) if binned else np.zeros(len(d))

    def walk(p, ef=None):
        """(coarse distances, the neighbours' depths, codes scanned, distances computed) of a ranking."""
        dis, lists, evaluations = ranked_lists(index_ivf, queries, p, ef_search=ef)
        return dis, neighbor_depths(lists, members, calibration.ids), scan_costs(index_ivf, lists), evaluations
    if isinstance(faiss.downcast_index(index_ivf.quantizer), faiss.IndexFlat):
        width = min(depth, SPREAD_RANK)
        dis, depths, costs, _ = walk(depth)
        return ProbeTables([ProbeTable.fit(feature(dis, width), depths, costs, n_bins=n_bins, width=width)])
    # Past its first walk's width a search walks again with efSearch = the query's nprobe p and
    # scans the first p lists of that walk (``adaptive_lists``): the recall of such a walk is
    # not that of a deeper one cut at p (in high dimension, far from it). They are measured at
    # the depths of ``walk_depths``; a depth between two measured ones gets the recall of the
    # one below and the cost of the one above, so a fitted table keeps to measured walks.
    nq = len(queries)
    grid = walk_depths(depth, widths)
    deep_found, deep_cost = np.empty((nq, len(grid))), np.empty((nq, len(grid)))
    for i, p in enumerate(grid):
        _, depths, costs, evaluations = walk(int(p), int(p))
        deep_found[:, i] = (depths < p).mean(1)
        deep_cost[:, i] = costs[:, -1] + evaluations / nq
    probe = np.arange(1, depth + 1)
    above = np.searchsorted(grid, probe)  # each depth's measured depth at or above it
    below = np.searchsorted(grid, probe, side="right") - 1  # and at or below it
    tables = []
    for width in sorted({min(depth, int(w)) for w in widths}):
        dis, depths, costs, first = walk(width, width)
        found = np.empty((nq, depth))
        found[:, :width] = found_within(depths, width)
        measured = grid[below[width:]] > width
        found[:, width:] = np.where(measured, deep_found[:, below[width:]], found[:, width - 1:width])
        cost = deep_cost[:, above]
        cost[:, :width] = costs
        cost += first / nq
        tables.append(ProbeTable.fit_found(feature(dis, width), found, cost, n_bins=n_bins, width=width))
    return ProbeTables(tables)


def walk_depths(depth: int, widths: tuple[int, ...] = WIDTHS) -> np.ndarray:
    """Depths at which :func:`fit_table` measures a graph's deeper walks: ``DEEP_WALKS`` spaced
    evenly in log from the narrowest first walk to ``depth`` (ndarray of int64, increasing, ending at ``depth``)."""
    return np.unique(np.geomspace(min(min(widths), depth), depth, num=DEEP_WALKS).round().astype(np.int64))


def coarse_candidates(coarse: str, d: int, metric_type: int = faiss.METRIC_L2) -> tuple[str, ...]:
    """Coarse steps a ``coarse`` option chooses among (names for :func:`.coarse.build`), the reference first.

    'auto': graphs with ``GRAPH_LINKS`` links and projected rankings onto ``PROJECTED_DIMS``
    dimensions (those at most d / 4); 'hnsw': the graphs; 'pca': the projected rankings;
    'hnsw<M>', 'pca<p>', 'flat': that one alone. The reference is the densest graph (a single
    projected ranking for 'pca': the most dimensions). Under inner product a graph keeps 32
    links (M is chosen for L2 only).
    """
    links = GRAPH_LINKS if metric_type == faiss.METRIC_L2 else (32,)
    graphs = tuple(f"hnsw{m}" for m in sorted(links, reverse=True))
    projected = tuple(f"pca{p}" for p in sorted(PROJECTED_DIMS, reverse=True) if 4 * p <= d)
    if coarse == "auto":
        return graphs + projected
    if coarse == "hnsw":
        return graphs
    if coarse == "pca":
        return projected or (f"pca{max(1, d // 4)}",)
    return (coarse,)


class CoarseTrial(NamedTuple):
    """One coarse step tried by :func:`try_coarse_steps`."""

    name: str
    quantizer: faiss.Index
    tables: ProbeTables  # fitted on the spaced calibration queries
    predicted: dict  # recall target -> expected distance computations per query

    @property
    def score(self) -> float:
        """Geometric mean of the predicted costs over ``LINK_RECALLS``: what the choice compares."""
        return float(np.exp(np.mean(np.log([self.predicted[r] for r in LINK_RECALLS]))))


def try_coarse_steps(index_ivf: faiss.IndexIVF, calibration: Calibration, n_bins: int, candidates: tuple[str, ...],
                     members: ListMembers, depth: int):
    """Each coarse step of ``candidates`` in turn as the quantizer, with its predicted cost.

    Every step is built (:func:`.coarse.build`) over the current quantizer's means (a graph
    keeps the current efSearch) and installed; depth tables are fitted (:func:`fit_table`) on
    ``LINK_QUERIES`` evenly spaced calibration queries. A new coarse step replaces only the
    quantizer: the lists, and the depth read from exact rankings, are the same for every step.

    Parameters
    ----------
    index_ivf : faiss.IndexIVF holding the calibration's neighbours; its quantizer is replaced
    calibration : Calibration
    n_bins : int
    candidates : tuple of str, e.g. :func:`coarse_candidates`
    members, depth : ``list_members(index_ivf)`` and ``table_depth(index_ivf, calibration, members)``

    Yields
    ------
    CoarseTrial, its step installed in ``index_ivf`` until the next one is built
    """
    old = faiss.downcast_index(index_ivf.quantizer)
    means = means_index(old).reconstruct_n(0, index_ivf.nlist)
    ef = int(old.hnsw.efSearch) if isinstance(old, faiss.IndexHNSW) else None
    subset = calibration.spaced(LINK_QUERIES)
    for name in candidates:
        quantizer = build(name, means, index_ivf.metric_type)
        if ef is not None and isinstance(quantizer, faiss.IndexHNSW):
            quantizer.hnsw.efSearch = ef
        install(index_ivf, quantizer)
        tables = fit_table(index_ivf, subset, n_bins, depth=depth, members=members)
        yield CoarseTrial(name, quantizer, tables,
                          {r: float(tables.for_recall(r).expected_cost(r)) for r in LINK_RECALLS})


def fit_coarse_and_table(index_ivf: faiss.IndexIVF, calibration: Calibration, n_bins: int,
                         candidates: tuple[str, ...]) -> tuple[str, ProbeTables]:
    """The coarse step of ``candidates`` whose recall searches cost least, as the quantizer; its depth tables.

    Each candidate is tried in turn (:func:`try_coarse_steps`: tables on ``LINK_QUERIES``
    evenly spaced calibration queries); the tables of the step kept are then fitted on all of
    them. The first candidate, the reference (:func:`coarse_candidates` puts the densest graph
    first), is kept unless another expects at least ``LINK_MARGIN`` (5%) fewer distance
    computations on the calibration queries (``CoarseTrial.score``; the cheapest such step
    then). The margin is the prediction's error: measured on held-out queries of eight sets
    (``eval/check_coarse_choice.py``), every step predicted at least 5% cheaper than the
    reference cost less at recall 0.9 and at most 0.4% more at 0.95, while steps predicted
    within 5% of it cost from 3% less to 11% more. Fewer links make every walk cheaper but rank
    the lists less well; a projection ranks every list for a fraction of a distance each, and
    wins where the dimension is high and a walk visits many means.

    Parameters
    ----------
    index_ivf : faiss.IndexIVF holding the calibration's neighbours; its quantizer is replaced
    calibration : Calibration
    n_bins : int
    candidates : tuple of str, e.g. :func:`coarse_candidates`

    Returns
    -------
    name : str, the coarse step kept
    tables : ProbeTables fitted on it
    """
    members = list_members(index_ivf)
    depth = table_depth(index_ivf, calibration, members)
    trials = list(tqdm(try_coarse_steps(index_ivf, calibration, n_bins, candidates, members, depth),
                       total=len(candidates), desc="coarse step and depth tables", unit="step", leave=False))
    reference = trials[0]
    kept = min([t for t in trials if t.score <= reference.score * (1 - LINK_MARGIN)] or [reference],
               key=lambda t: t.score)
    install(index_ivf, kept.quantizer)
    if calibration.spaced(LINK_QUERIES) is calibration:  # the trials' tables already use every query
        return kept.name, kept.tables
    return kept.name, fit_table(index_ivf, calibration, n_bins, depth=depth, members=members)
