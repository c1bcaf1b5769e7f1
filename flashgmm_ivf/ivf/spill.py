"""Spilling rules: extra IVF lists for a vector, given centroids and its primary list.

The published rules for storing a database vector in more than one list, as small
functions over arrays (vectors, centroids, primary list per vector), so they apply to
any partition: k-means centroids or GMM means (with the GMM's own primary assignment).
Every function returns ``lists`` of shape (n, m): column 0 the primary list, further
columns extra copies, -1 where none, ready for :func:`.quantizer.add_assigned`.

Rules (x a vector, c_1 its primary centroid, r = x - c_1, r_hat = r / |r|):

- ``top2``: the nearest other centroid (naive spill).
- ``soar`` (Sun et al., arXiv 2404.00774): the other centroid minimising
  ``|x - c|^2 + lam * <x - c, r_hat>^2``, which penalises a second residual parallel
  to the first, so the two lists fail on different queries.
- ``rair`` (arXiv 2601.07183): the other centroid minimising
  ``|x - c|^2 + lam * <x - c, r>``, among the ``n_candidates`` nearest.
- ``spann`` closure (Chen et al., arXiv 2111.08566): every list j with
  ``d(x, c_j) <= (1 + eps) d(x, c_1)``, at most ``max_copies`` lists in all.

Budgets. A rule with a fixed threshold gives whatever copies it gives; to compare rules
at equal memory each takes a ``copies`` budget (mean lists per vector) and keeps the
``round((copies - 1) n)`` best-scoring extra lists over all vectors, i.e. the threshold
that meets the budget. The score of an extra list is the rule's own criterion:
the excess ``cost(c) - cost(c_1)`` of its chosen list for the single-extra rules (an
additive threshold, as ScaNN's 'additive' spilling), the ratio
``d(x, c_j) / d(x, c_1)`` for SPANN (its multiplicative threshold 1 + eps).

Candidates are the nearest centroids by squared L2 (:func:`.exact.nearest_means`), primary
excluded; rows are processed in blocks so no (n, m, d) array is formed for all n.
"""
from __future__ import annotations

import numbers

import faiss
import numpy as np

from .._validation import check_nonnegative_float, check_positive_int
from .exact import nearest_means, pair_l2

__all__ = ["RULES", "extra_list", "nearest_and_extra", "spill", "spill_top2", "spill_soar", "spill_rair", "spill_spann", "nearest_other",
           "keep_best"]


def nearest_other(x, centroids, primary, m):
    """The ``m`` nearest centroids of every row other than its primary one.

    Parameters
    ----------
    x : ndarray of shape (n, d), float32
    centroids : ndarray of shape (K, d), float32
    primary : ndarray of shape (n,), int64, entries in [0, K)
    m : int, 1 <= m < K

    Returns
    -------
    cand : ndarray of shape (n, m), int64, nearest first
    cand_d2 : ndarray of shape (n, m), float32, squared L2 distances to ``cand``
    primary_d2 : ndarray of shape (n,), float32, squared L2 distance to the primary centroid
    """
    x, centroids, primary = _check(x, centroids, primary)
    k = centroids.shape[0]
    if not 1 <= m < k:
        raise ValueError(f"m must be in [1, K - 1 = {k - 1}], got {m}")
    # One more than asked for: the primary is among them unless it is not L2-nearest
    # (GMM primaries), in which case the farthest one is dropped instead.
    _, idx = nearest_means(x, centroids, m + 1)
    is_primary = idx == primary[:, None]
    drop = np.where(is_primary.any(1), is_primary.argmax(1), m)
    keep = np.ones_like(is_primary)
    keep[np.arange(len(x)), drop] = False
    cand = idx[keep].reshape(-1, m)
    # Each pair on its own: a row's spill score is then the same in any block of rows.
    return cand, pair_l2(x, centroids, cand), pair_l2(x, centroids, primary[:, None])[:, 0]


def keep_best(scores, extra):
    """Mask of the ``extra`` smallest scores over all rows; each row's kept set is a prefix.

    Parameters
    ----------
    scores : ndarray of shape (n, m), nondecreasing along each row (inf = never kept)
    extra : int, 0 <= extra <= n * m

    Returns
    -------
    keep : ndarray of shape (n, m), bool
    threshold : float
        The largest kept score (nan when nothing is kept).
    """
    keep = np.zeros(scores.shape, dtype=bool)
    if extra <= 0:
        return keep, float("nan")
    # Stable order on (score, flat position) breaks ties by row, so the count is exact and
    # a row never keeps column j + 1 without column j.
    flat = np.argsort(scores, axis=None, kind="stable")[:extra]
    keep.flat[flat] = True
    return keep, float(scores.flat[flat[-1]])


def spill_top2(x, centroids, primary, copies):
    """Naive spill: the nearest other centroid, for the vectors closest to it.

    Parameters
    ----------
    x : ndarray of shape (n, d)
    centroids : ndarray of shape (K, d)
    primary : ndarray of shape (n,), int
    copies : float in [1, 2]
        Mean lists per vector; the extra copies go to the vectors with the smallest
        ``|x - c_2|^2 - |x - c_1|^2``.

    Returns
    -------
    lists : ndarray of shape (n, 2), int64
    threshold : float
        The largest kept excess (squared-distance units; nan if none kept).
    """
    return _single_extra(x, centroids, primary, copies, lam=0.0, kind="top2", n_candidates=1)


def spill_soar(x, centroids, primary, copies, *, lam=1.0, n_candidates=16):
    """SOAR: the other centroid minimising ``|x - c|^2 + lam <x - c, r_hat>^2``.

    Parameters
    ----------
    x : ndarray of shape (n, d)
    centroids : ndarray of shape (K, d)
    primary : ndarray of shape (n,), int
    copies : float in [1, 2]
    lam : float >= 0
        Weight of the parallel-residual penalty (SOAR's lambda; 0 is top2 among the candidates).
    n_candidates : int
        Nearest other centroids searched (SOAR's minimiser is almost always among them).

    Returns
    -------
    lists : ndarray of shape (n, 2), int64
    threshold : float
        The largest kept excess ``cost(c) - (1 + lam) |r|^2`` (nan if none kept).
    """
    return _single_extra(x, centroids, primary, copies, lam=lam, kind="soar", n_candidates=n_candidates)


def spill_rair(x, centroids, primary, copies, *, lam=0.5, n_candidates=10):
    """RAIR: the other centroid minimising ``|x - c|^2 + lam <x - c, r>`` among the nearest.

    Parameters
    ----------
    x : ndarray of shape (n, d)
    centroids : ndarray of shape (K, d)
    primary : ndarray of shape (n,), int
    copies : float in [1, 2]
    lam : float >= 0
    n_candidates : int
        Nearest other centroids considered (10 in the paper).

    Returns
    -------
    lists : ndarray of shape (n, 2), int64
    threshold : float
        The largest kept excess ``cost(c) - (1 + lam) |r|^2`` (nan if none kept).
    """
    return _single_extra(x, centroids, primary, copies, lam=lam, kind="rair", n_candidates=n_candidates)


def spill_spann(x, centroids, primary, copies, *, max_copies=8):
    """SPANN closure: lists j with ``d(x, c_j) <= (1 + eps) d(x, c_1)``, eps set by the budget.

    Parameters
    ----------
    x : ndarray of shape (n, d)
    centroids : ndarray of shape (K, d)
    primary : ndarray of shape (n,), int
    copies : float in [1, max_copies]
    max_copies : int
        Most lists per vector (SPANN caps at 8).

    Returns
    -------
    lists : ndarray of shape (n, max_copies), int64
    eps : float
        The closure threshold meeting the budget, on plain (not squared) L2 distance
        (nan if no extra copy is kept).
    """
    check_positive_int(max_copies, "max_copies")
    x, centroids, primary = _check(x, centroids, primary)
    m = min(max_copies, centroids.shape[0]) - 1
    lists, extra = _start(primary, copies, m + 1)
    if not extra:
        return lists, float("nan")
    cand, cand_d2, primary_d2 = nearest_other(x, centroids, primary, m)
    # Squared-distance ratio; a vector on its centroid (d_1 = 0) is never spilled.
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(primary_d2[:, None] > 0, cand_d2 / primary_d2[:, None], np.inf)
    keep, threshold = keep_best(ratio, extra)
    lists[:, 1:] = np.where(keep, cand, -1)
    return lists, float(np.sqrt(threshold) - 1.0)


def extra_list(x, centroids, primary, *, rule="soar", lam=None, n_candidates=None):
    """The second list a single-extra rule would give every row, and the rule's excess cost for it.

    Parameters
    ----------
    x : ndarray of shape (n, d)
    centroids : ndarray of shape (K, d), K >= 2
    primary : ndarray of shape (n,), int
    rule : 'top2', 'soar' or 'rair'
    lam : float >= 0, the rule's lambda (default: soar 1.0, rair 0.5; top2 has none)
    n_candidates : int, nearest other centroids searched (default: soar 16, rair 10, top2 1)

    Returns
    -------
    cand : ndarray of shape (n,), int64, the rule's choice of second list
    excess : ndarray of shape (n,), float64, ``cost(cand) - cost(primary)``: keeping the rows whose
        excess is below a threshold spills the vectors the rule finds closest to a border
    """
    lam, n_candidates = _rule_params(rule, lam, n_candidates)
    x, centroids, primary = _check(x, centroids, primary)
    m = min(check_positive_int(n_candidates, "n_candidates"), centroids.shape[0] - 1)
    cand, cost, primary_d2 = nearest_other(x, centroids, primary, m)
    return _rule_choice(x, centroids, primary, cand, cost, primary_d2, rule, lam)


def nearest_and_extra(x, centroids, *, rule="soar", lam=None, n_candidates=None):
    """Every row's nearest centroid and :func:`extra_list`'s choice for it, from one centroid search.

    Returns
    -------
    primary : ndarray of shape (n,), int64, the nearest centroid
    cand, excess : as :func:`extra_list` with this ``primary``
    """
    lam, n_candidates = _rule_params(rule, lam, n_candidates)
    x, centroids, _ = _check(x, centroids, np.zeros(len(x), np.int64))
    m = min(check_positive_int(n_candidates, "n_candidates"), centroids.shape[0] - 1)
    # The m + 1 nearest: the first is the primary, the others its candidates.
    _, idx = nearest_means(x, centroids, m + 1)
    # Each pair on its own, ranked again (ties by index): a row's lists and spill score are then
    # the same in any block of rows.
    d2 = pair_l2(x, centroids, idx)
    order = np.lexsort((idx, d2), axis=-1)
    idx, d2 = np.take_along_axis(idx, order, 1), np.take_along_axis(d2, order, 1)
    primary = idx[:, 0].copy()
    return (primary, *_rule_choice(x, centroids, primary, idx[:, 1:], d2[:, 1:], d2[:, 0], rule, lam))


def _rule_params(rule, lam, n_candidates):
    defaults = {"top2": (0.0, 1), "soar": (1.0, 16), "rair": (0.5, 10)}
    if rule not in defaults:
        raise ValueError(f"rule must be one of {sorted(defaults)}, got {rule!r}")
    lam = check_nonnegative_float(defaults[rule][0] if lam is None else lam, "lam")
    return lam, defaults[rule][1] if n_candidates is None else n_candidates


def _rule_choice(x, centroids, primary, cand, cost, primary_d2, rule, lam):
    """The rule's best candidate of every row and its excess cost over the primary list."""
    cost = cost.astype(np.float64)
    primary_d2 = primary_d2.astype(np.float64)
    if rule != "top2":
        # <x - c_j, r> = <x - c_j, x - c_1> = (|x - c_j|^2 + |x - c_1|^2 - |c_j - c_1|^2) / 2: the
        # search's distances and the distance between the two centroids (FAISS computes those
        # pairs by index), so no (rows, candidates, d) gather is needed.
        between = np.empty(cand.shape, np.float32)
        first = np.ascontiguousarray(np.repeat(primary, cand.shape[1]), dtype=np.int64)
        second = np.ascontiguousarray(cand, dtype=np.int64)
        faiss.pairwise_indexed_L2sqr(centroids.shape[1], first.size, faiss.swig_ptr(centroids), faiss.swig_ptr(first),
                                     faiss.swig_ptr(centroids), faiss.swig_ptr(second), faiss.swig_ptr(between))
        dot = (cost + primary_d2[:, None] - between) / 2
        if rule == "soar":
            with np.errstate(divide="ignore", invalid="ignore"):
                # <x - c_j, r_hat>^2 = <x - c_j, r>^2 / |r|^2 (0 when r = 0: no direction)
                cost += lam * np.where(primary_d2[:, None] > 0, dot**2 / primary_d2[:, None], 0)
        else:
            cost += lam * dot
    best = cost.argmin(1)
    rows = np.arange(len(x))
    # The same rule's cost at the primary list is (1 + lam) |r|^2 for soar and rair.
    return cand[rows, best], cost[rows, best] - (1.0 + lam) * primary_d2


RULES = {"top2": spill_top2, "soar": spill_soar, "rair": spill_rair, "spann": spill_spann}


def spill(rule, x, centroids, primary, copies, **params):
    """Dispatch to ``spill_<rule>``; see there for ``params``.

    Returns
    -------
    lists : ndarray of shape (n, m), int64
    threshold : float
    """
    if rule not in RULES:
        raise ValueError(f"unknown spill rule {rule!r}; known: {sorted(RULES)}")
    return RULES[rule](x, centroids, primary, copies, **params)


# ---------------------------------------------------------------------- helpers
def _single_extra(x, centroids, primary, copies, *, lam, kind, n_candidates):
    """One extra list per spilled vector: argmin of the rule's cost, kept by smallest excess."""
    x, centroids, primary = _check(x, centroids, primary)
    lists, extra = _start(primary, copies, 2)
    if not extra:
        return lists, float("nan")
    cand, excess = extra_list(x, centroids, primary, rule=kind, lam=lam, n_candidates=n_candidates)
    keep, threshold = keep_best(excess[:, None], extra)
    lists[:, 1] = np.where(keep[:, 0], cand, -1)
    return lists, threshold


def _start(primary, copies, m):
    """(n, m) lists holding only the primary, and the number of extra copies the budget allows."""
    n = np.asarray(primary).shape[0]
    if isinstance(copies, bool) or not isinstance(copies, numbers.Real) or not 1 <= copies <= m:
        raise ValueError(f"copies must be a number in [1, {m}], got {copies!r}")
    lists = np.full((n, m), -1, dtype=np.int64)
    lists[:, 0] = primary
    return lists, int(round((copies - 1.0) * n))


def _check(x, centroids, primary):
    x = np.ascontiguousarray(x, dtype=np.float32)
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    primary = np.asarray(primary)
    if x.ndim != 2 or centroids.ndim != 2 or x.shape[1] != centroids.shape[1]:
        raise ValueError(f"x {x.shape} and centroids {centroids.shape} must be 2-D with the same d")
    if primary.shape != (x.shape[0],) or primary.dtype.kind not in "iu":
        raise ValueError(f"primary must be integers of shape ({x.shape[0]},), got {primary.dtype} {primary.shape}")
    if primary.size and not (0 <= primary.min() and primary.max() < centroids.shape[0]):
        raise ValueError(f"primary lists must be in [0, {centroids.shape[0]})")
    return x, centroids, primary.astype(np.int64)
