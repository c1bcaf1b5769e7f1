"""A vector's most probable components under a GMM, with log-responsibilities that never underflow.

Everything is in log space. In high dimension posteriors are extremely peaked: on
fashion-mnist-784 (spherical GMM, K=256) the gap ``log r_1 - log r_2`` is tens to
hundreds of nats for most rows, far below float32's ``exp`` range, so responsibilities
themselves would underflow to 0 and a spill budget chosen on them would silently collapse
to one copy per vector. Gaps between log-likelihoods stay finite floats on any data, so
the ``gmm`` spill rule thresholds the gap (:mod:`.partition`).

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

__all__ = ["TopComponents", "top_components"]


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


def _check_temperature(value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {value!r}")
    return float(value)
