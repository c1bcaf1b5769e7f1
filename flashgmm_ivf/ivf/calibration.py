"""Calibration queries and their exact neighbours, and the depth table fitted on them.

A :class:`Calibration` holds stand-in queries (held-out training rows, or real queries
given to ``GMMIndexIVF.calibrate``) with their exact ``K_CAL`` nearest ids among the
vectors of the index. The neighbours are kept up to date as vectors are added
(:meth:`Calibration.update`: a brute-force ``faiss.knn`` of the queries against each
added block, merged into the running best), so they are exact for any encoding (PQ and
SQ included) without keeping the raw vectors.

The first copy of a query met among the added vectors (squared L2 distance at most
``SELF_TOLERANCE`` |q|^2: FAISS's distance kernels can leave a roundoff of ~1e-6 |q|^2 for an
exact copy, at d >= 512 for most rows) is taken to be the query itself and not counted as its
neighbour: a held-out training row
may itself be added to the index (training on the base set is common), and it would then
be found at depth 1 by construction, making every depth look cheaper than it is for a
real query. Further exact copies (duplicates in the data) are counted.
"""
from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from .probing import ProbeTable, distance_spread, list_members, neighbor_depths, scan_costs
from .search import dedup_results, ranked_lists

__all__ = ["K_CAL", "SELF_TOLERANCE", "Calibration", "fit_table", "table_depth"]

K_CAL = 10  # recall@10 is what ``search(..., recall=)`` targets
# A stand-in's own copy: squared distance at most this x |q|^2 (roundoff of FAISS's kernels is
# ~1e-6 |q|^2; a distinct row this close, 1% of |q| away, is a copy for any purpose).
SELF_TOLERANCE = 1e-4


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

    @property
    def n_found(self) -> int:
        """Fewest neighbours any query has (K_CAL once the index holds enough vectors)."""
        return int((self.ids >= 0).sum(1).min(initial=K_CAL))

    def update(self, x: np.ndarray, ids: np.ndarray) -> None:
        """Merge the vectors ``x`` (with ``ids``), just added to the index, into the running neighbours."""
        if x.shape[0] == 0 or self.queries.shape[0] == 0:
            return
        k = min(K_CAL + 1, x.shape[0])  # one more: the query's own copy may be among them
        dis, pos = faiss.knn(self.queries, np.ascontiguousarray(x, dtype=np.float32), k, metric=self.metric_type)
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

        With ``skip_self``, the first copy (distance <= ``SELF_TOLERANCE`` |q|^2) of a query whose
        own copy is still pending is skipped (see the module docstring).
        """
        l2 = self.metric_type == faiss.METRIC_L2
        dis = np.asarray(dis, dtype=np.float32)
        ids = np.array(ids, dtype=np.int64)
        if l2 and skip_self:
            tolerance = SELF_TOLERANCE * np.einsum("nd,nd->n", self.queries, self.queries, dtype=np.float64)
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


def table_depth(nlist: int) -> int:
    """Deepest probe a fitted table may give a query: a quarter of the lists, at least 128 (at most nlist)."""
    return min(nlist, max(128, nlist // 4))


def fit_table(index_ivf: faiss.IndexIVF, calibration: Calibration, n_bins: int) -> ProbeTable:
    """A :class:`ProbeTable` for recall@K_CAL, fitted on ``calibration`` over the lists of ``index_ivf``.

    Parameters
    ----------
    index_ivf : faiss.IndexIVF (flat or HNSW quantizer), holding the calibration's neighbours
    calibration : Calibration with K_CAL neighbours for every query
    n_bins : int, difficulty bins (1: one depth for all queries, a calibrated nprobe)

    Returns
    -------
    ProbeTable
    """
    if calibration.n_found < K_CAL:
        raise ValueError(f"calibration needs every query to have {K_CAL} neighbours in the index; the index holds "
                         f"too few vectors ({calibration.n_found} found for some query)")
    dis, lists, _ = ranked_lists(index_ivf, calibration.queries, table_depth(index_ivf.nlist))
    # The difficulty feature needs squared L2 distances; an inner-product index is binned as one.
    feature = distance_spread(dis) if index_ivf.metric_type == faiss.METRIC_L2 and n_bins > 1 \
        else np.zeros(len(dis))
    depths = neighbor_depths(lists, list_members(index_ivf), calibration.ids)
    return ProbeTable.fit(feature, depths, scan_costs(index_ivf, lists), n_bins=n_bins)
