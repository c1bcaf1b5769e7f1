"""Query-adaptive probing of a FAISS IVF index: a per-query nprobe instead of one for all.

Small functions over real FAISS objects (in the style of ``faiss.contrib.ivf_tools``);
they work on any ``faiss.IndexIVF`` (k-means, GMM means, spilled lists), e.g.
``GMMIndexIVF.index``, whose quantizer is flat, an HNSW graph or a projected ranking over the means (fewer
coarse distance evaluations per query at large nlist; :func:`.search.ranked_lists` counts
them either way). Lists are always visited nearest mean first; what adapts is how many
of them a query scans.

The rule: queries are binned by a difficulty feature computed from the coarse step alone,
:func:`distance_spread` = log(d_m / d_1), the spread of the squared distances to the m
nearest means (a query whose means are all about as far as the nearest one has its
neighbours scattered over many lists); under inner product, :func:`similarity_gap` =
(s_1 - s_m) / |q|, the same idea for the m best mean scores. On calibration queries with
known neighbours a :class:`ProbeTable` records, per bin, the recall@k and the codes scanned at every depth
(summed over the bin); asked for a recall it picks every bin's depth by one Lagrange
multiplier (the codes one unit of recall is worth), found by bisection so that the
calibration queries reach that recall at the least total cost. The knob is the recall
wanted. With one bin the table is a calibrated fixed nprobe.

:func:`adaptive_lists` chooses each query's lists; :func:`search_adaptive` then runs FAISS
``search_preassigned`` with them (-1 past a query's nprobe, which FAISS skips) and the true
coarse distances, and deduplicates copies of a vector (:func:`.search.search_preassigned`).
"""
from __future__ import annotations

import numbers
import warnings
from dataclasses import dataclass, field

import faiss
import numpy as np

from .._validation import check_positive_int
from .search import SearchStats, ranked_lists, search_preassigned

__all__ = ["ListMembers", "ProbeTable", "ProbeTables", "adaptive_lists", "distance_spread", "enough_entries",
           "found_within", "list_members", "list_sizes", "neighbor_depths", "query_difficulty", "scan_costs",
           "search_adaptive", "similarity_gap", "truncate_lists"]

SPREAD_RANK = 32  # m of distance_spread: enough lists to tell a crowded neighbourhood from a lone one
_BISECT_STEPS = 100
# Share of a search's queries outside the calibrated feature range above which it warns.
OUTSIDE_WARN_SHARE = 0.05


def distance_spread(coarse_dis: np.ndarray, rank: int = SPREAD_RANK) -> np.ndarray:
    """Difficulty feature log(d_m / d_1) of each query, m = min(rank, columns).

    Parameters
    ----------
    coarse_dis : ndarray of shape (nq, depth), depth >= 1, squared L2 distances, nearest first
        (for the similarities of an inner-product index see :func:`similarity_gap`)
    rank : int >= 1 (1, like one column: 0 for every query)

    Returns
    -------
    ndarray of shape (nq,), float64, >= 0. Small: many means about as near as the nearest;
    0 where there is one column (an index of one list: every query alike).
    """
    coarse_dis = np.asarray(coarse_dis, dtype=np.float64)
    if coarse_dis.ndim != 2 or coarse_dis.shape[1] < 1:
        raise ValueError(f"coarse_dis must have shape (nq, depth >= 1), got {coarse_dis.shape}")
    rank = check_positive_int(rank, "rank")
    m = min(rank, coarse_dis.shape[1])
    # log of a ratio of squared distances; the floor keeps a query sitting on a mean finite.
    tiny = np.finfo(np.float64).tiny
    return np.log(np.maximum(coarse_dis[:, m - 1], tiny)) - np.log(np.maximum(coarse_dis[:, 0], tiny))


def similarity_gap(coarse_sim: np.ndarray, x: np.ndarray, rank: int = SPREAD_RANK) -> np.ndarray:
    """Difficulty feature (s_1 - s_m) / |q| of each query under inner product, m = min(rank, columns).

    Parameters
    ----------
    coarse_sim : ndarray of shape (nq, depth), depth >= 1, inner products with the means, best first
    x : ndarray of shape (nq, d), the queries (the gap is divided by their norms, so that
        scaling a query, which scales all its scores, does not change its bin)
    rank : int >= 1 (1, like one column: 0 for every query)

    Returns
    -------
    ndarray of shape (nq,), float64, >= 0. Small: many means score about as well as the best;
    0 where there is one column.
    """
    coarse_sim = np.asarray(coarse_sim, dtype=np.float64)
    if coarse_sim.ndim != 2 or coarse_sim.shape[1] < 1:
        raise ValueError(f"coarse_sim must have shape (nq, depth >= 1), got {coarse_sim.shape}")
    rank = check_positive_int(rank, "rank")
    m = min(rank, coarse_sim.shape[1])
    norms = np.linalg.norm(np.asarray(x, dtype=np.float64), axis=1)
    return (coarse_sim[:, 0] - coarse_sim[:, m - 1]) / np.maximum(norms, np.finfo(np.float64).tiny)


def query_difficulty(coarse_dis: np.ndarray, x: np.ndarray, rank: int, metric_type: int) -> np.ndarray:
    """The depth table's difficulty feature of each query.

    :func:`distance_spread` for L2, :func:`similarity_gap` for inner product (``x``: the queries).
    """
    if metric_type == faiss.METRIC_L2:
        return distance_spread(coarse_dis, rank)
    return similarity_gap(coarse_dis, x, rank)


@dataclass
class ListMembers:
    """Which inverted lists hold each id of an index (an id added several times has several).

    Attributes
    ----------
    ids : ndarray of shape (u,), int64, the distinct ids, ascending
    lists : ndarray of shape (u, max_copies), int64, the lists of ``ids[i]``; -1 where none
    """

    ids: np.ndarray
    lists: np.ndarray

    def lists_of(self, ids) -> np.ndarray:
        """Lists of each of ``ids`` (any shape), shape ``ids.shape + (max_copies,)``; ValueError for unknown ids."""
        ids = np.asarray(ids)
        if not self.ids.size:
            if ids.size:
                raise ValueError("the index is empty: no id is in it")
            return np.empty(ids.shape + self.lists.shape[1:], np.int64)
        pos = np.minimum(np.searchsorted(self.ids, ids), self.ids.size - 1)
        missing = ids[self.ids[pos] != ids]
        if missing.size:
            raise ValueError(f"{missing.size} id(s) are not in the index, e.g. {int(missing[0])}")
        return self.lists[pos]


def list_members(index_ivf: faiss.IndexIVF) -> ListMembers:
    """The lists holding each id of the index, read from its inverted lists.

    Parameters
    ----------
    index_ivf : faiss.IndexIVF

    Returns
    -------
    ListMembers
    """
    invlists = index_ivf.invlists
    ids, lists = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
    for no in range(index_ivf.nlist):
        size = invlists.list_size(no)
        if size:
            ids.append(faiss.rev_swig_ptr(invlists.get_ids(no), size).copy())
            lists.append(np.full(size, no, np.int64))
    ids, lists = np.concatenate(ids), np.concatenate(lists)
    order = np.argsort(ids, kind="stable")
    ids, lists = ids[order], lists[order]
    distinct, first, copies = np.unique(ids, return_index=True, return_counts=True)
    col = np.arange(ids.size) - np.repeat(first, copies)  # 0, 1, ... within each id's entries
    table = np.full((distinct.size, int(copies.max()) if ids.size else 1), -1, np.int64)
    table[np.repeat(np.arange(distinct.size), copies), col] = lists
    return ListMembers(distinct, table)


def neighbor_depths(list_nos: np.ndarray, members: ListMembers, gt: np.ndarray) -> np.ndarray:
    """Depth (0-based probe rank) at which each true neighbour is first scanned.

    Parameters
    ----------
    list_nos : ndarray of shape (nq, depth), int64, each query's lists in probe order
    members : ListMembers, from :func:`list_members`
    gt : ndarray of shape (nq, k), ids of the true neighbours

    Returns
    -------
    ndarray of shape (nq, k), int64; ``depth`` where the neighbour is in none of the lists.
    """
    list_nos, gt = np.asarray(list_nos), np.asarray(gt)
    if gt.ndim != 2 or gt.shape[0] != list_nos.shape[0]:
        raise ValueError(f"gt must have shape (nq={list_nos.shape[0]}, k), got {gt.shape}")
    lists = members.lists_of(gt)  # (nq, k, m)
    nq, depth = list_nos.shape
    nlist = max(int(list_nos.max(initial=0)), int(lists.max(initial=0))) + 1
    rank = np.full((nq, nlist), depth, np.int64)  # lists beyond the probe order: never scanned
    # A graph quantizer may return fewer than depth lists (-1): those slots rank nothing.
    rows, cols = np.nonzero(list_nos >= 0)
    rank[rows, list_nos[rows, cols]] = cols
    flat = np.maximum(lists, 0).reshape(nq, lists.shape[1] * lists.shape[2])  # explicit: nq may be 0
    depths = np.take_along_axis(rank, flat, 1).reshape(lists.shape)
    return np.where(lists >= 0, depths, depth).min(2)


def found_within(depths: np.ndarray, depth: int) -> np.ndarray:
    """Recall of each query when probing its first 1, 2, ..., ``depth`` lists.

    Parameters
    ----------
    depths : ndarray of shape (nq, k), from :func:`neighbor_depths`
    depth : int

    Returns
    -------
    ndarray of shape (nq, depth), float64: found[q, j] is the share of q's k neighbours
    scanned within its first j + 1 lists.
    """
    nq, k = depths.shape
    hist = np.zeros((nq, depth + 1), np.int64)
    np.add.at(hist, (np.repeat(np.arange(nq), k), np.minimum(depths, depth).ravel()), 1)
    return np.cumsum(hist, 1)[:, :depth] / k


def list_sizes(index_ivf: faiss.IndexIVF) -> np.ndarray:
    """Entries of every inverted list, ndarray of shape (nlist,), float64."""
    return np.array([index_ivf.invlists.list_size(no) for no in range(index_ivf.nlist)], np.float64)


def scan_costs(index_ivf: faiss.IndexIVF, list_nos: np.ndarray, sizes: np.ndarray | None = None) -> np.ndarray:
    """Codes scanned after probing the first 1, 2, ... lists of each query.

    ``sizes``: :func:`list_sizes` of the index when the caller has them (default: read now).

    Returns
    -------
    ndarray of shape (nq, depth), float64, cumulative list sizes along each row (list -1 adds nothing).
    """
    sizes = list_sizes(index_ivf) if sizes is None else sizes
    list_nos = np.asarray(list_nos)
    return np.cumsum(np.where(list_nos >= 0, sizes[np.maximum(list_nos, 0)], 0.0), axis=1)


@dataclass
class ProbeTable:
    """Per-query nprobe from a difficulty feature, calibrated on training queries.

    Attributes
    ----------
    edges : ndarray of shape (n_bins - 1,), float64
        Bin edges of the feature (quantiles of the training queries' values).
    recall : ndarray of shape (n_bins, depth), float64
        Sum over the bin's training queries of recall@k when probing 1..depth lists.
    cost : ndarray of shape (n_bins, depth), float64
        Sum over the bin's training queries of the codes scanned at 1..depth lists.
    counts : ndarray of shape (n_bins,), int64
        Training queries per bin.
    width : int, default SPREAD_RANK
        Lists the first coarse walk of a search ranks for every query (the feature is
        computed on them); a graph quantizer walks again, as deep as the bin asks, only for
        queries whose bin asks for more.
    low, high : float, default -inf, inf
        Range of the training queries' feature. The bins say nothing of queries outside it
        (queries unlike every training query, e.g. far from all the data): they get the
        deepest depth any bin needs (:meth:`nprobe`).
    """

    edges: np.ndarray
    recall: np.ndarray
    cost: np.ndarray
    counts: np.ndarray
    width: int = SPREAD_RANK
    low: float = -np.inf
    high: float = np.inf
    # bin_nprobe per recall asked: its bisection costs milliseconds, a search of one query less.
    _bin_nprobe: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def fit(cls, feature, depths, costs, n_bins: int = 16, width: int = SPREAD_RANK) -> ProbeTable:
        """Calibrate on training queries whose lists come from one ranking.

        Parameters
        ----------
        feature : ndarray of shape (nq,), e.g. :func:`distance_spread`
        depths : ndarray of shape (nq, k), from :func:`neighbor_depths`
        costs : ndarray of shape (nq, depth), from :func:`scan_costs`, plus the coarse
            distances a search at that depth computes where they depend on it
        n_bins : int
            Quantile bins of the feature (fewer when values repeat).
        width : int, the first walk's width (see the class)

        Returns
        -------
        ProbeTable
        """
        depths, costs = np.asarray(depths), np.asarray(costs, dtype=np.float64)
        if depths.ndim != 2 or costs.ndim != 2 or depths.shape[0] != costs.shape[0]:
            raise ValueError(f"depths (nq, k) and costs (nq, depth) must agree, got {depths.shape}, {costs.shape}")
        return cls.fit_found(feature, found_within(depths, costs.shape[1]), costs, n_bins, width)

    @classmethod
    def fit_found(cls, feature, found, costs, n_bins: int = 16, width: int = SPREAD_RANK) -> ProbeTable:
        """Calibrate on training queries from their recall at every depth.

        Parameters
        ----------
        feature : ndarray of shape (nq,)
        found : ndarray of shape (nq, depth), recall@k of each query when probing 1..depth
            lists (:func:`found_within` of one ranking, or pieced from several walks)
        costs, n_bins, width : as :meth:`fit`

        Returns
        -------
        ProbeTable
        """
        feature = np.asarray(feature, dtype=np.float64)
        found, costs = np.asarray(found, dtype=np.float64), np.asarray(costs, dtype=np.float64)
        n_bins = check_positive_int(n_bins, "n_bins")
        nq = feature.shape[0]
        if feature.ndim != 1 or found.shape != costs.shape or costs.ndim != 2 or costs.shape[0] != nq:
            raise ValueError(f"feature (nq,), found (nq, depth) and costs (nq, depth) must agree, got "
                             f"{feature.shape}, {found.shape}, {costs.shape}")
        if nq == 0:
            raise ValueError("no training queries")
        if not np.isfinite(feature).all():
            raise ValueError("feature holds NaN or infinity")
        edges = np.unique(np.quantile(feature, np.linspace(0, 1, n_bins + 1)[1:-1]))
        bins = np.searchsorted(edges, feature, side="right")
        nb = edges.size + 1
        recall, cost = np.zeros((nb, costs.shape[1])), np.zeros((nb, costs.shape[1]))
        np.add.at(recall, bins, found)
        np.add.at(cost, bins, costs)
        return cls(edges, recall, cost, np.bincount(bins, minlength=nb), check_positive_int(width, "width"),
                   float(feature.min()), float(feature.max()))

    @property
    def depth(self) -> int:
        """Most lists a query may be given."""
        return self.recall.shape[1]

    @property
    def nbytes(self) -> int:
        return self.edges.nbytes + self.recall.nbytes + self.cost.nbytes + self.counts.nbytes

    @property
    def reach(self) -> float:
        """Mean recall@k of the training queries at the deepest probe: the most a recall target gets."""
        return float(self.recall[:, -1].sum() / max(1, self.counts.sum()))

    def bin_nprobe(self, recall: float) -> np.ndarray:
        """nprobe of every bin for a mean training recall of ``recall`` at the least cost.

        Parameters
        ----------
        recall : float in (0, 1]
            Mean recall@k wanted on the training queries; above what ``depth`` lists reach,
            every bin gets ``depth``.

        Returns
        -------
        ndarray of shape (n_bins,), int64 in [1, depth]
        """
        if isinstance(recall, bool) or not isinstance(recall, numbers.Real) or not 0 < recall <= 1:
            raise ValueError(f"recall must be a number in (0, 1], got {recall!r}")
        if float(recall) not in self._bin_nprobe:
            self._bin_nprobe[float(recall)] = self._solve_bin_nprobe(float(recall))
        return self._bin_nprobe[float(recall)].copy()

    def _solve_bin_nprobe(self, recall: float) -> np.ndarray:
        total = self.counts.sum()
        target = recall * total
        if self.recall[:, -1].sum() < target:
            return np.full(self.counts.shape, self.depth, np.int64)

        def pick(log_lam):
            # Each bin maximises lam * recall - cost over its depths (the Lagrangian of the
            # cost-minimisation under a recall constraint); ties go to the shallower depth.
            return np.argmax(np.exp(log_lam) * self.recall - self.cost, axis=1)
        lo, hi = -30.0, 60.0  # lam in [1e-13, 1e26] codes per unit of recall summed over queries
        for _ in range(_BISECT_STEPS):
            mid = 0.5 * (lo + hi)
            if self.recall[np.arange(self.counts.size), pick(mid)].sum() >= target:
                hi = mid
            else:
                lo = mid
        return pick(hi) + 1

    def expected_cost(self, recall: float) -> float:
        """Mean cost per calibration query (``cost``'s unit) at the depths chosen for ``recall``."""
        depth = self.bin_nprobe(recall)
        return float(self.cost[np.arange(depth.size), depth - 1].sum() / max(1, self.counts.sum()))

    def nprobe(self, feature, recall: float) -> np.ndarray:
        """nprobe of every query.

        Parameters
        ----------
        feature : ndarray of shape (nq,), the same feature as at ``fit``
        recall : float in (0, 1], see :meth:`bin_nprobe`

        Returns
        -------
        ndarray of shape (nq,), int64 in [1, depth]; queries whose feature lies outside
        [low, high] get the largest of the bins' depths (with a RuntimeWarning when they are
        more than ``OUTSIDE_WARN_SHARE`` of the queries).
        """
        feature = np.asarray(feature, dtype=np.float64)
        if feature.ndim != 1:
            raise ValueError(f"feature must be 1-D (nq,), got shape {feature.shape}")
        depth = self.bin_nprobe(recall)
        nprobe = depth[np.searchsorted(self.edges, feature, side="right")]
        outside = (feature < self.low) | (feature > self.high)
        if self.edges.size and outside.any():  # one bin: the feature is not used
            nprobe[outside] = depth.max()
            if outside.mean() > OUTSIDE_WARN_SHARE:
                warnings.warn(f"{int(outside.sum())} of {feature.size} queries are unlike the calibration queries "
                              "(their difficulty feature lies outside the calibrated range): they get the deepest "
                              "calibrated depth, and their recall is not calibrated; calibrate with queries like "
                              "them (index.calibrate(queries))", RuntimeWarning, stacklevel=2)
        return nprobe


@dataclass
class ProbeTables:
    """Depth tables of one index for several first-walk widths; each recall target uses the cheapest.

    A wide first walk costs more coarse distances for every query but ranks enough lists
    for most of them; a narrow one is cheap but sends more queries to a second, deeper walk.
    Which is cheaper depends on the recall asked, so every table is kept and
    :meth:`for_recall` picks, per target, the one with the least expected cost on the
    calibration queries.

    Attributes
    ----------
    tables : tuple of ProbeTable, widths increasing, all of one depth
    """

    tables: tuple
    _chosen: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        self.tables = tuple(self.tables)
        if not self.tables or not all(isinstance(t, ProbeTable) for t in self.tables):
            raise ValueError("ProbeTables needs at least one ProbeTable")
        if len({t.depth for t in self.tables}) != 1:
            raise ValueError("the tables must share one depth")

    @property
    def depth(self) -> int:
        return self.tables[0].depth

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tables)

    def for_recall(self, recall: float) -> ProbeTable:
        """The table with the least expected cost (:meth:`ProbeTable.expected_cost`) at ``recall``."""
        key = float(recall)
        if key not in self._chosen:
            costs = [t.expected_cost(recall) for t in self.tables]
            self._chosen[key] = self.tables[int(np.argmin(costs))]
        return self._chosen[key]


def adaptive_lists(index_ivf: faiss.IndexIVF, x: np.ndarray, table: ProbeTable | ProbeTables, recall: float):
    """Each query's lists under ``table`` asked for ``recall``, ranked only as deep as needed.

    A flat quantizer ranks every query once, as deep as the deepest bin (its cost does not
    depend on the depth). A graph (or projected ranking) is walked first with efSearch ``table.width``
    for that many nearest means (the difficulty feature), then again with efSearch = its
    nprobe, only for the queries whose bin asks for more; both walks are counted.

    Parameters
    ----------
    index_ivf : faiss.IndexIVF, the index ``table`` was fitted on (any coarse step of :mod:`.coarse`)
    x : ndarray of shape (nq, d), float32
    table : ProbeTable, or ProbeTables (the one :meth:`ProbeTables.for_recall` picks)
    recall : float in (0, 1], see :meth:`ProbeTable.bin_nprobe`

    Returns
    -------
    coarse_dis, list_nos : ndarrays of shape (nq, width), as :func:`ranked_lists`; entries
        past a query's nprobe may be -1 (list) and 0 (distance)
    nprobe : ndarray of shape (nq,), int64
    evaluations : int, query-to-mean distances computed, summed over the queries
    """
    if isinstance(table, ProbeTables):
        table = table.for_recall(recall)
    deepest = int(table.bin_nprobe(recall).max())
    one_pass = isinstance(faiss.downcast_index(index_ivf.quantizer), faiss.IndexFlat)
    # One bin (a calibrated fixed nprobe) needs no feature: one walk as deep as that nprobe.
    first = min(table.depth, max(table.width, deepest) if one_pass or not table.edges.size else table.width)
    dis, lists, evaluations = ranked_lists(index_ivf, x, first, ef_search=first)
    nprobe = table.nprobe(query_difficulty(dis, x, table.width, index_ivf.metric_type), recall)
    width = max(first, int(nprobe.max(initial=1)))
    if width > first:
        dis = np.concatenate([dis, np.zeros((len(dis), width - first), dis.dtype)], 1)
        lists = np.concatenate([lists, np.full((len(lists), width - first), -1, lists.dtype)], 1)
        # Queries of one bin share an nprobe: one deeper walk per distinct depth.
        for p in np.unique(nprobe[nprobe > first]):
            rows = np.flatnonzero(nprobe == p)
            dis[rows, :p], lists[rows, :p], more = ranked_lists(index_ivf, x[rows], int(p), ef_search=int(p))
            evaluations += more
    return dis, lists, nprobe, evaluations


def search_adaptive(index_ivf: faiss.IndexIVF, x: np.ndarray, k: int, table: ProbeTable | ProbeTables, recall: float, *,
                    max_dup: int = 1, copies: float | None = None, stats: SearchStats | None = None):
    """k nearest distinct ids, each query scanning as many lists as ``table`` gives it for ``recall``.

    Parameters
    ----------
    index_ivf : faiss.IndexIVF, the index ``table`` was fitted on (any coarse step of :mod:`.coarse`)
    x : ndarray of shape (nq, d), float32
    k : int
    table : ProbeTable or ProbeTables (see :func:`adaptive_lists`)
    recall : float in (0, 1]
    max_dup : int, most lists any id was added to (see :func:`.search.search_preassigned`)
    copies : float, optional, mean lists per id (see :func:`.search.fetch_slots`)
    stats : SearchStats, optional
        Output: this search's counts are added to it; ``ncoarse`` counts every coarse walk
        :func:`adaptive_lists` made.

    Returns
    -------
    D, I : as :func:`.search.search_preassigned`
    """
    dis, lists, nprobe, evaluations = adaptive_lists(index_ivf, x, table, recall)
    nprobe = enough_entries(index_ivf, lists, nprobe, k)
    return search_preassigned(index_ivf, x, k, *truncate_lists(lists, dis, nprobe), max_dup=max_dup, copies=copies,
                              ncoarse=evaluations, stats=stats)


def enough_entries(index_ivf: faiss.IndexIVF, list_nos: np.ndarray, nprobe: np.ndarray, k: int, *,
                   sizes: np.ndarray | None = None) -> np.ndarray:
    """``nprobe`` raised, where the ranked lists allow, until each query's first lists hold at least k entries.

    A depth chosen for recall@10 may give a query lists holding fewer than the k results
    asked (small lists, large k); scanning one more ranked list costs far less than
    searching the query again deeper.

    Parameters
    ----------
    index_ivf : faiss.IndexIVF
    list_nos : ndarray of shape (nq, width), int64, each query's ranked lists (-1: not ranked)
    nprobe : ndarray of shape (nq,), ints in [1, width]
    k : int
    sizes : ndarray of shape (nlist,), optional, :func:`list_sizes` of the index

    Returns
    -------
    ndarray of shape (nq,), int64: max(nprobe, lists needed for k entries), at most the
    query's ranked lists.
    """
    costs = scan_costs(index_ivf, list_nos, sizes)
    ranked = (np.asarray(list_nos) >= 0).sum(1)
    needed = np.minimum((costs < k).sum(1) + 1, np.maximum(ranked, 1))
    return np.maximum(np.asarray(nprobe, np.int64), needed)


def truncate_lists(list_nos: np.ndarray, coarse_dis: np.ndarray, nprobe: np.ndarray):
    """Each query's first ``nprobe[i]`` lists, -1 past them (FAISS's ``search_preassigned`` skips list -1).

    Parameters
    ----------
    list_nos, coarse_dis : ndarrays of shape (nq, depth), e.g. from :func:`.search.ranked_lists`
    nprobe : ndarray of shape (nq,), integers in [1, depth]

    Returns
    -------
    list_nos : ndarray of shape (nq, max(nprobe)), int64
    coarse_dis : ndarray of shape (nq, max(nprobe)), float32 (0 past a query's nprobe)
    """
    list_nos, coarse_dis, nprobe = np.asarray(list_nos), np.asarray(coarse_dis), np.asarray(nprobe)
    nq, depth = list_nos.shape
    if coarse_dis.shape != list_nos.shape or nprobe.shape != (nq,):
        raise ValueError(f"list_nos and coarse_dis must be (nq, depth) and nprobe (nq,), got {list_nos.shape}, "
                         f"{coarse_dis.shape}, {nprobe.shape}")
    if nq and (nprobe.dtype.kind not in "iu" or nprobe.min() < 1 or nprobe.max() > depth):
        raise ValueError(f"nprobe must hold integers in [1, depth={depth}]")
    width = int(nprobe.max()) if nq else 1
    keep = np.arange(width)[None] < nprobe[:, None]
    return (np.where(keep, list_nos[:, :width], -1).astype(np.int64),
            np.where(keep, coarse_dis[:, :width], 0).astype(np.float32))
