"""A vector's lists by GMM responsibility: its most probable component, and the next for the closest calls.

Everything is in log space. In high dimension posteriors are extremely peaked: on
fashion-mnist-784 (spherical GMM, K=256) the gap ``log r_1 - log r_2`` is tens to
hundreds of nats for most rows, far below float32's ``exp`` range, so responsibilities
themselves would underflow to 0 and a budget chosen on them would silently collapse
to one copy per vector. Gaps between log-likelihoods stay finite floats on any data, so
the budget is a threshold on them: keep the ``(copies - 1) * n`` smallest gaps
``(ll_1 - ll_j) / T`` over all rows, i.e. a gap threshold ``delta`` in nats picked so
that the average number of lists per vector is ``copies``.

The GMM is read in blocks (``GaussianMixture.iter_weighted_log_prob``); each block is
reduced to its top components and its log-normaliser before the next one is computed,
so the n x K matrix never exists.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch
from .._validation import check_positive_int

__all__ = ["TopComponents", "SoftAssignment", "top_components", "assign_budget"]


@dataclass
class TopComponents:
    """The ``m`` most probable components of every row.

    Attributes
    ----------
    labels : ndarray of shape (n, m), int64
        Components, most probable first.
    log_resp : ndarray of shape (n, m), float64
        ``log r_j`` at ``temperature`` (log-posterior of each label; the row's full
        log-normaliser over all K components is included, so these are true
        log-responsibilities, not just relative scores).
    temperature : float
    n_components : int
        K, the number of components of the mixture.
    """

    labels: np.ndarray
    log_resp: np.ndarray
    temperature: float
    n_components: int

    @property
    def gaps(self) -> np.ndarray:
        """``log r_1 - log r_j`` for j = 2..m, shape (n, m - 1), float64, >= 0, nondecreasing per row."""
        return self.log_resp[:, :1] - self.log_resp[:, 1:]


@dataclass
class SoftAssignment:
    """Lists of every vector.

    Attributes
    ----------
    lists : ndarray of shape (n, m), int64
        Column 0 is the primary list; further columns are extra copies, -1 where none.
    delta : float or None
        The gap threshold in nats, on ``(ll_1 - ll_j) / T``: the
        largest gap that was kept (``0.0`` when no extra copy was kept).
    """

    lists: np.ndarray
    delta: float | None = None

    @property
    def n_copies(self) -> np.ndarray:
        """Lists per vector, shape (n,), int64, in 1..m."""
        return (self.lists >= 0).sum(1)

    @property
    def copies_per_vector(self) -> float:
        """Average lists per vector (1.0 = hard assignment)."""
        return float(self.n_copies.mean()) if len(self.lists) else 0.0


def top_components(gmm, X, m: int, *, temperature: float = 1.0) -> TopComponents:
    """Top ``m`` components and their log-responsibilities for every row of X.

    Parameters
    ----------
    gmm : fitted GaussianMixture
    X : array-like of shape (n, D)
        Anything ``gmm.iter_weighted_log_prob`` accepts.
    m : int
        Components kept per row (clipped to K).
    temperature : float > 0
        Posterior temperature T: ``r_j ∝ exp(ll_j / T)`` (rescales the gaps).

    Returns
    -------
    TopComponents with arrays of shape (n, min(m, K)).
    """
    m = check_positive_int(m, "m")
    temperature = _check_temperature(temperature)
    k = int(gmm.n_components)
    m = min(m, k)
    labels, log_resp = [], []
    for _, block in gmm.iter_weighted_log_prob(X):
        # Block dtype is the GMM's compute dtype; the normaliser and the top values are
        # taken in it, then moved to float64 so later differences lose nothing more.
        scaled = block / temperature if temperature != 1.0 else block
        log_norm = torch.logsumexp(scaled, dim=1, keepdim=True)
        values, idx = torch.topk(scaled, m, dim=1)
        labels.append(idx.cpu().numpy().astype(np.int64))
        log_resp.append((values.double() - log_norm.double()).cpu().numpy())
        del block, scaled
    labels = np.concatenate(labels) if labels else np.empty((0, m), np.int64)
    log_resp = np.concatenate(log_resp) if log_resp else np.empty((0, m), np.float64)
    if not np.isfinite(log_resp).all():
        bad = np.flatnonzero(~np.isfinite(log_resp).all(1))
        raise ValueError(f"non-finite log-responsibilities in {bad.size} row(s) (first row {int(bad[0])}); "
                         "the GMM log-likelihoods overflow the compute dtype: try compute_dtype='float64' "
                         "or a larger reg_covar")
    return TopComponents(labels, log_resp, temperature, k)


def assign_budget(top: TopComponents, copies: float, max_copies: int | None = None) -> SoftAssignment:
    """Lists chosen by smallest log-responsibility gap so that the mean copies per vector is ``copies``.

    The ``round((copies - 1) * n)`` smallest gaps ``log r_1 - log r_j`` (j >= 2) over all
    rows are kept; ties are broken by row order, so the count is exact. Gaps are finite
    floats, so any budget in [1, max_copies] is reached on any data.

    Parameters
    ----------
    top : TopComponents of shape (n, m)
    copies : float in [1, max_copies]
    max_copies : int or None
        Defaults to m.

    Returns
    -------
    SoftAssignment with ``delta`` (nats) set.
    """
    m = _columns(top, max_copies)
    if isinstance(copies, bool) or not isinstance(copies, numbers.Real) or not 1 <= copies <= m:
        raise ValueError(f"copies must be a number in [1, {m}] (max_copies, clipped to K), got {copies!r}")
    n = top.labels.shape[0]
    lists = np.full((n, m), -1, dtype=np.int64)
    lists[:, 0] = top.labels[:, 0]
    extra = int(round((copies - 1.0) * n))
    delta = 0.0
    if extra and m > 1:
        gaps = top.gaps[:, : m - 1]
        # Stable order on (gap, flat position): within a row gaps are nondecreasing, so the
        # kept set of every row is a prefix of its ranking, never a hole.
        flat = np.argsort(gaps, axis=None, kind="stable")[:extra]
        rows, cols = np.unravel_index(flat, gaps.shape)
        lists[rows, cols + 1] = top.labels[rows, cols + 1]
        delta = float(gaps[rows[-1], cols[-1]])
    return SoftAssignment(lists, delta=delta)


def _columns(top: TopComponents, max_copies):
    m = top.labels.shape[1]
    return m if max_copies is None else min(check_positive_int(max_copies, "max_copies"), m)


def _check_temperature(value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {value!r}")
    return float(value)
