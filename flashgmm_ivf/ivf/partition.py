"""The lists of a GMM-IVF index: fitting the partition, each vector's primary list, and its spilled copy.

Two partitions, one machinery after them (both end as a fitted ``GaussianMixture`` whose
means are the IVF centroids):

- ``gmm``: a short k-means start (``faiss.Kmeans``) then a few EM iterations of a
  ``GaussianMixture``; a vector's primary list is its most probable component.
- ``kmeans``: ``faiss.Kmeans`` (20 iterations in stages, :func:`fit_kmeans`); per-list weights and
  covariances are computed afterwards from the members of each list, so spill and
  ranking rules that read covariances run on k-means lists too; a vector's primary list is
  its nearest centroid.

Both are fitted on a sample of at most ``POINTS_PER_LIST`` rows per list, as
``faiss.Kmeans`` samples (``max_points_per_centroid``): more rows add time, not quality.

Spill rules (one extra list per spilled vector): ``none``; ``soar`` and ``rair`` (geometric,
:func:`.spill.extra_list`); ``gmm`` (the second most probable component, scored by the
log-responsibility gap, :mod:`.soft_assign`). The budget ``copies`` (mean lists per vector)
is turned into a score threshold on training rows (:func:`spill_threshold`); vectors are
then assigned row by row against it, so an index built in blocks or in shards holds the
same entries as one built at once, and data like the training rows gets ``copies`` lists
per vector on average.
"""
from __future__ import annotations

import math
import warnings

import faiss
import numpy as np
from tqdm.auto import tqdm

from ..mixture import ConvergenceWarning, GaussianMixture
from .exact import nearest_means
from .soft_assign import top_components
from .spill import extra_list, nearest_and_extra

__all__ = ["PARTITIONS", "POINTS_PER_LIST", "REG_COVAR_AUTO", "SPILLS", "assign_lists", "fit_partition",
           "kmeans_mixture", "spill_scores", "spill_threshold"]

PARTITIONS = ("gmm", "kmeans")
SPILLS = ("none", "soar", "rair", "gmm")
POINTS_PER_LIST = 256  # faiss.Kmeans's max_points_per_centroid
# k-means stages (see fit_kmeans): at most this many, the smallest sample with at least this
# many rows per centroid (FAISS's own floor is 39 per centroid, with a warning below it).
KMEANS_STAGES = 4
MIN_STAGE_POINTS = 32
# 'auto' reg_covar: this x the mean per-feature variance of the training rows. An absolute
# floor lets a component whose pixels are all 0 get a variance so small that one non-zero
# pixel costs ~1e10 nats, beyond float32's resolution of the log-likelihoods; 0.1 x the
# data's scale keeps lists balanced on raw-scale (0..255) and unit-norm data alike.
REG_COVAR_AUTO = 1e-1
_SCALE_ROWS = 65536


def reg_covar_auto(x: np.ndarray) -> float:
    """``REG_COVAR_AUTO`` x the mean per-feature variance of x (float64; 1e-6 for constant data).

    A scale, not a fitted statistic: measured on at most ``_SCALE_ROWS`` evenly spaced rows.
    """
    sample = x[:: max(1, x.shape[0] // _SCALE_ROWS)]
    scale = mean_variance(sample) if sample.shape[0] > 1 else 0.0
    return REG_COVAR_AUTO * scale if scale > 0 else 1e-6


def mean_variance(x: np.ndarray, rows: int = 4096) -> float:
    """The mean over features of x's per-feature variance, two passes in float64 over blocks of
    ``rows`` rows: ``x.var(0, dtype=np.float64).mean()`` to round-off, without its float64 copies
    of x (60,000 x 784 rows: 0.13 against 1.15 s on two cores)."""
    n = x.shape[0]
    mean = sum(x[i:i + rows].sum(0, dtype=np.float64) for i in range(0, n, rows)) / n
    squares = np.zeros(x.shape[1])
    for i in range(0, n, rows):
        centred = x[i:i + rows] - mean
        squares += np.einsum("nd,nd->d", centred, centred)
    return float(squares.mean() / n)


def fit_kmeans(x: np.ndarray, nlist: int, niter: int, seed: int) -> np.ndarray:
    """``faiss.Kmeans`` centroids (nlist, d), float32: ``niter`` iterations over nested samples of x.

    The iterations run in stages on nested random samples that double in size and end on
    all rows of x (at most ``KMEANS_STAGES`` stages, the smallest with at least
    ``MIN_STAGE_POINTS`` rows per centroid; each stage starts from the previous one's
    centroids): early iterations move the centroids far and need few rows, the last
    ones refine and balance them on every row. Each sample stage runs
    ``niter // (stages + 1)`` iterations, the last stage (all rows) the rest: 20 in four
    stages are 4, 4, 4 and 8, the cost of ~11.5 iterations on all rows. Rows too few for a second stage give
    plain k-means on x.
    """
    # About the rows' mean: faiss.Kmeans on rows far from the origin next to their spread (1e4
    # over unit spread) collapses most of them into a few cells (``exact`` has why).
    center = x.mean(0, dtype=np.float64).astype(np.float32)
    x = np.ascontiguousarray(x - center, dtype=np.float32)
    n = x.shape[0]
    stages = 1
    while stages < KMEANS_STAGES and n >> stages >= MIN_STAGE_POINTS * nlist and niter >= stages + 1:
        stages += 1
    order = np.random.default_rng(seed).permutation(n) if stages > 1 else None
    centroids = None
    # disable only when True: an explicit False would override TQDM_DISABLE.
    hide = {"disable": True} if stages == 1 else {}
    with tqdm(total=niter, desc="k-means", unit="iter", leave=False, **hide) as bar:
        for stage in reversed(range(stages)):  # stage s holds the first n / 2^s rows of one permutation
            rows = x if stage == 0 else x[np.sort(order[:n >> stage])]
            iterations = niter // (stages + 1) if stage else niter - (stages - 1) * (niter // (stages + 1))
            # A sample stage is small on purpose: FAISS's too-few-points warning is for the last stage only.
            floor = {"min_points_per_centroid": MIN_STAGE_POINTS} if stage else {}
            km = faiss.Kmeans(x.shape[1], nlist, niter=iterations, seed=seed,
                              max_points_per_centroid=max(1, len(rows)), verbose=False, **floor)
            km.train(rows, init_centroids=centroids)
            centroids = km.centroids.copy()
            bar.set_postfix_str(f"{len(rows):,} rows")
            bar.update(iterations)
    return centroids + center


def kmeans_mixture(x: np.ndarray, centroids: np.ndarray, covariance_type: str, reg_covar: float,
                   **gmm_params) -> GaussianMixture:
    """The mixture of a k-means partition: member fractions, centroids, member covariances (+ reg_covar).

    Parameters
    ----------
    x : ndarray of shape (n, d), float32, the rows the centroids were fitted on
    centroids : ndarray of shape (nlist, d)
    covariance_type : 'spherical', 'diag' or 'full'
    reg_covar : float, added to every variance (an empty list gets the mean variance of x)
    **gmm_params : GaussianMixture constructor arguments

    Returns
    -------
    GaussianMixture, fitted (no EM), means = centroids
    """
    nlist, d = centroids.shape
    labels = _nearest(centroids, x)
    counts = np.bincount(labels, minlength=nlist).astype(np.float64)
    weights = np.maximum(counts, 1e-3) / np.maximum(counts, 1e-3).sum()
    r = x - centroids[labels]  # float32 residuals; every sum over them accumulates in float64
    occupied = counts > 0
    denom = np.maximum(counts, 1.0)
    overall = mean_variance(r) if x.shape[0] > 1 and not occupied.all() else 1.0
    if covariance_type == "spherical":
        cov = np.bincount(labels, weights=np.einsum("nd,nd->n", r, r, dtype=np.float64), minlength=nlist) / denom / d
        cov = np.where(occupied, cov, overall) + reg_covar
    elif covariance_type == "diag":
        cov = np.zeros((nlist, d))
        np.add.at(cov, labels, np.square(r, dtype=np.float64))
        cov = np.where(occupied[:, None], cov / denom[:, None], overall) + reg_covar
    else:
        cov = np.empty((nlist, d, d))
        order = np.argsort(labels, kind="stable")
        bounds = np.searchsorted(labels[order], np.arange(nlist + 1))
        for j in range(nlist):
            rj = r[order[bounds[j]:bounds[j + 1]]].astype(np.float64)
            # About the members' own mean: a centroid off it by float32 round-off (rows at 1e15:
            # ~1e8) would add a rank-one term that leaves the covariance singular but for reg_covar.
            if len(rj):
                rj -= rj.mean(0)
                cov[j] = rj.T @ rj / len(rj)
            else:
                cov[j] = overall * np.eye(d)
        cov += reg_covar * np.eye(d)
    return GaussianMixture.from_parameters(weights, centroids, cov, covariance_type=covariance_type,
                                           reg_covar=reg_covar, **gmm_params)


def fit_partition(x: np.ndarray, nlist: int, *, partition: str = "gmm", covariance_type: str = "spherical",
                  kmeans_iter: int = 10, em_iter: int = 5, reg_covar="auto", seed: int = 1234,
                  **gmm_params) -> GaussianMixture:
    """Fit the partition on x (already sampled to at most ``POINTS_PER_LIST * nlist`` rows).

    Parameters
    ----------
    x : ndarray of shape (n, d), float32, n >= nlist
    nlist : int
    partition : 'gmm' or 'kmeans'
    covariance_type : 'spherical', 'diag' or 'full'
    kmeans_iter : int, k-means iterations (the GMM's start, or the whole k-means partition)
    em_iter : int, EM iterations after the k-means start ('gmm' only; exactly this many)
    reg_covar : float or 'auto' (see ``REG_COVAR_AUTO``)
    seed : int
    **gmm_params : GaussianMixture constructor arguments (device, compute_dtype, estep, ...)

    Returns
    -------
    GaussianMixture, fitted; its means are the lists' centroids.
    """
    if partition not in PARTITIONS:
        raise ValueError(f"partition must be one of {PARTITIONS}, got {partition!r}")
    if x.shape[0] < nlist:
        raise ValueError(f"training needs at least nlist={nlist} rows, got {x.shape[0]}")
    reg = reg_covar_auto(x) if reg_covar == "auto" else float(reg_covar)
    centroids = fit_kmeans(x, nlist, kmeans_iter, seed)
    if partition == "kmeans":
        return kmeans_mixture(x, centroids, covariance_type, reg, random_state=seed, **gmm_params)
    gmm = GaussianMixture(nlist, covariance_type=covariance_type, max_iter=em_iter, tol=0.0, reg_covar=reg,
                          means_init=centroids, random_state=seed, **gmm_params)
    with warnings.catch_warnings():
        # A fixed number of EM iterations is the recipe: not converging to tol 0 is expected.
        warnings.simplefilter("ignore", ConvergenceWarning)
        gmm.fit(x)
    return gmm


def spill_scores(gmm: GaussianMixture, x: np.ndarray, *, partition: str, spill_rule: str):
    """Every row's primary list, the rule's second list and the score that ranks spilling it (lower first).

    Parameters
    ----------
    gmm : fitted GaussianMixture (the index's partition), K >= 2 for a spill rule
    x : ndarray of shape (n, d), float32
    partition : 'gmm' (primary = most probable component) or 'kmeans' (nearest centroid); with
        spill 'gmm' the two lists are the two most probable components whatever the partition
    spill_rule : one of ``SPILLS``

    Returns
    -------
    primary : ndarray of shape (n,), int64
    second : ndarray of shape (n,), int64 (-1 for spill 'none')
    score : ndarray of shape (n,), float64: the rule's excess cost (soar, rair: squared-distance
        units) or the log-responsibility gap log r_1 - log r_2 (gmm: nats); +inf for 'none'
    """
    if spill_rule not in SPILLS:
        raise ValueError(f"spill must be one of {SPILLS}, got {spill_rule!r}")
    n = x.shape[0]
    if spill_rule == "gmm" or partition == "gmm":
        top = top_components(gmm, x, min(2, gmm.n_components))
        primary = top.labels[:, 0].copy()
    elif spill_rule in ("soar", "rair") and gmm.n_components >= 2:
        # One centroid search gives the nearest centroid and the rule's candidates.
        return nearest_and_extra(x, gmm.means_.astype(np.float32), rule=spill_rule)
    else:
        primary = _nearest(gmm.means_.astype(np.float32), x)
    if spill_rule == "none" or gmm.n_components < 2:
        return primary, np.full(n, -1, np.int64), np.full(n, np.inf)
    if spill_rule == "gmm":
        return primary, top.labels[:, 1].copy(), top.gaps[:, 0].copy()
    second, excess = extra_list(x, gmm.means_.astype(np.float32), primary, rule=spill_rule)
    return primary, second, excess


def spill_threshold(score: np.ndarray, copies: float, population: int | None = None) -> float:
    """The score at or below which ``(copies - 1) * n`` of the n rows get their second list (-inf: none).

    Fewer when the rows are a sample of a larger population (see ``population``).

    Parameters
    ----------
    score : ndarray of shape (n,), the rows' spill scores (:func:`spill_scores`)
    copies : float in [1, 2], mean lists per row
    population : int, optional
        When ``score`` holds a random sample of ``population`` rows, ``copies`` is a ceiling
        for them all: the fraction spilled is set two standard errors of a sample
        proportion below ``copies - 1`` (sampling leaves the population's fraction above
        the sample's about half the time otherwise; at 65,536 rows that is 0.004 copies).

    Returns
    -------
    float
    """
    n = score.size
    fraction = copies - 1.0
    if population is not None and population > n:
        fraction -= 2.0 * math.sqrt(fraction * (1.0 - fraction) / n * (1.0 - n / population))
    extra = int(round(fraction * n))
    if extra <= 0:
        return -math.inf
    threshold = np.partition(score, extra - 1)[extra - 1]
    if np.count_nonzero(score <= threshold) > extra:
        # Tied scores (duplicate rows score alike) at the threshold would all spill, past the
        # budget: stop below them.
        below = score[score < threshold]
        return float(below.max()) if below.size else -math.inf
    return float(threshold)


def assign_lists(gmm: GaussianMixture, x: np.ndarray, *, partition: str, spill_rule: str,
                 threshold: float) -> np.ndarray:
    """Primary list and spilled copy of every row of x, row by row (the same whatever the blocks or shards).

    Parameters
    ----------
    gmm, x, partition, spill_rule : see :func:`spill_scores`
    threshold : float, a row whose score is <= this gets its second list (set on training rows
        by :func:`spill_threshold` for a copies budget)

    Returns
    -------
    ndarray of shape (n, 2), int64: column 0 the primary list, column 1 the copy or -1
    """
    primary, second, score = spill_scores(gmm, x, partition=partition, spill_rule=spill_rule)
    return np.stack([primary, np.where(score <= threshold, second, -1)], 1)


def _nearest(centroids: np.ndarray, x: np.ndarray) -> np.ndarray:
    return nearest_means(x, centroids, 1)[1][:, 0]
