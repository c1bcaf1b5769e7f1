"""Metric names and the angular -> L2 reduction.

For unit vectors ``||a - b||^2 = 2 - 2 cos(a, b)``, so once rows are normalised to unit
norm, L2 distance ranks neighbours exactly as cosine similarity does.  That is how the
``'angular'`` metric is handled everywhere: normalise, then search by L2 (or inner product,
which ranks the same on unit vectors).
"""
from __future__ import annotations

import faiss
import numpy as np

#: Supported metrics: squared Euclidean, cosine (angular), maximum inner product.
METRICS = ("l2", "angular", "ip")


def check_metric(metric: str) -> str:
    """Return ``metric`` if it is one of ``METRICS``, else raise ValueError."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
    return metric


def faiss_metric(metric: str) -> int:
    """The faiss metric constant that ranks like ``metric`` (angular: inner product on
    normalised rows)."""
    return faiss.METRIC_L2 if check_metric(metric) == "l2" else faiss.METRIC_INNER_PRODUCT


def normalize_rows(x) -> np.ndarray:
    """Scale rows to unit L2 norm.

    Parameters
    ----------
    x : array-like, shape (n, d)

    Returns
    -------
    np.ndarray, shape (n, d), float32
        A new C-contiguous array.  All-zero rows have no direction and stay zero.
    """
    out = np.array(x, dtype=np.float32, order="C", copy=True)
    faiss.normalize_L2(out)
    return out


def prepare_for_search(x, metric: str) -> np.ndarray:
    """Rows as faiss searches them for ``metric``: float32, C order, unit norm if angular.

    Parameters
    ----------
    x : array-like, shape (n, d)
    metric : str

    Returns
    -------
    np.ndarray, shape (n, d), float32
    """
    if check_metric(metric) == "angular":
        return normalize_rows(x)
    return np.ascontiguousarray(x, dtype=np.float32)
