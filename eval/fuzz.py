"""Fuzzing the public API, each case in its own process: crashes, hangs and silent garbage are counted.

Three groups of cases, each generated from a seed (numpy's ``default_rng``), so any case can be
replayed alone (``--replay family:seed``):

* inputs: ``GaussianMixture`` fit / predict / score / score_samples / predict_proba / save + load on
  generated data (shapes, dtypes, scales 1e-30 .. 1e20, far offsets, constant and duplicate
  columns, spikes, NaN, non-contiguous views, lists, tensors) and parameters, and misuse of every
  entry point (invalid parameters, shapes, types); ``index_factory`` with varied specs (Flat, PQ,
  SQ, HNSW and flat coarse steps, IDMap prefixes, metrics, recipe options), train / add /
  add_with_ids / search (nprobe, recall, ``SearchParametersIVF``) / range_search / remove_ids /
  write_index + read_index, and misuse of each.
* files: GaussianMixture and index files, truncated, bit-flipped, overwritten, with header
  fields or arrays edited (with and without a recomputed checksum), arrays swapped, other format
  versions, zip structures damaged, members missing or added.
* data files: ``.npy``, ``.fvecs``, ``.ivecs``, ``.bvecs``, ``.fbin``, ``.u8bin``, HDF5 vectors and
  ann-benchmarks HDF5 files damaged the same ways, read through ``flashgmm_ivf.datasets`` and fitted.

A parent process imports everything once and forks one child per case (a fresh interpreter
would cost ~2 s of imports per case). Outcomes:

* ``ok``: results that pass every check against float64 / brute-force references (and a damaged
  file that loads only if what it loads equals the original, or is a valid re-signed edit);
* ``clean_error``: a ValueError or TypeError (``raised_outside`` counts those raised by a third-
  party library rather than the package's own checks);
* ``wrong_exception``: any other exception (a bug);
* ``garbage``: results that fail a check (NaN / inf outputs, -1 ids with enough vectors, repeated
  ids, probabilities not summing to 1, wrong shapes, values off the reference), or invalid input
  accepted silently;
* ``crash``: the child died of a signal (or exited without a result); ``hang``: it ran past
  ``--timeout`` and was killed.

Run: ``nice -n 10 python -m flashgmm_ivf.eval.fuzz --inputs 10000 --files 1000 --data-files 1000
--out eval/results/fuzz_long.json``
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import resource
import select
import shutil
import signal
import sys
import tempfile
import time
import traceback
import warnings
import zipfile
from collections import Counter, defaultdict
from pathlib import Path

import faiss
import numpy as np
import torch
from tqdm.auto import tqdm

import flashgmm_ivf
from flashgmm_ivf import GaussianMixture
from flashgmm_ivf import datasets as fds

OUTCOMES = ("ok", "clean_error", "wrong_exception", "garbage", "crash", "hang")
INPUT_FAMILIES = ("gmm", "gmm", "gmm", "gmm", "gmm_misuse", "index", "index", "index", "index_misuse")
FILE_FAMILIES = ("gmm_file", "index_file")
DATA_FAMILIES = ("npy", "fvecs", "ivecs", "bvecs", "fbin", "u8bin", "hdf5", "ann_hdf5")
# Source folders of the package: a ValueError raised in code outside them is a third party's.
_PACKAGE_DIRS = tuple(str(Path(m.__file__).resolve().parent) for m in (flashgmm_ivf, fds, flashgmm_ivf.kernels))
_LOG_2PI = math.log(2 * math.pi)
# Extra address space a case may take beyond what the parent holds (a damaged file claiming
# billions of entries must fail as an error, not take the machine).
MEMORY_LIMIT_BYTES = 3 << 30


class Garbage(Exception):
    """A result that fails a check, or invalid input accepted."""


def check(condition, message):
    if not condition:
        raise Garbage(message)


class Trace:
    """The entry point a case is in (outcomes are counted per entry point)."""

    def __init__(self):
        self.stage, self.visited = "setup", []

    def at(self, stage):
        self.stage = stage
        self.visited.append(stage)


def refused(trace, stage, f, *args, **kwargs):
    """Call ``f`` with input it must refuse; a clean refusal continues the case."""
    trace.at(stage)
    try:
        result = f(*args, **kwargs)
    except (ValueError, TypeError):
        return
    raise Garbage(f"{stage}: invalid input accepted (returned {type(result).__name__})")


def pick(rng, options):
    return options[int(rng.integers(len(options)))]


# ---------------------------------------------------------------------------------------- data
def gen_rows(rng, n, d, *, allow_bad=True):
    """(n, d) rows of a generated kind, scale, offset and dtype (the fuzzed data distribution)."""
    kind = pick(rng, ["normal", "blobs", "uniform", "integers", "constant", "duplicates", "spiky", "heavy"])
    scale = 10.0 ** pick(rng, [-30, -12, -3, 0, 0, 0, 3, 8, 12, 15] + ([16, 20] if allow_bad else []))
    offset = pick(rng, [0.0, 0.0, 1.0, -1e6, 1e12] + ([1e15] if allow_bad else []))
    if kind == "blobs":
        centres = rng.standard_normal((3, d)) * 10
        x = centres[rng.integers(3, size=n)] + rng.standard_normal((n, d))
    elif kind == "uniform":
        x = rng.random((n, d))
    elif kind == "integers":
        x = rng.integers(0, 256, (n, d)).astype(np.float64)
        scale, offset = 1.0, 0.0
    elif kind == "constant":
        x = np.repeat(rng.standard_normal((1, d)), n, 0)
    elif kind == "duplicates":
        x = rng.standard_normal((n, d))
        x[n // 2:] = x[: n - n // 2]
    elif kind == "heavy":
        x = rng.standard_cauchy((n, d))
    else:
        x = rng.standard_normal((n, d))
    x = offset + scale * x
    if kind == "spiky":  # ~10% of the entries far out (raw data with a few huge values)
        mask = rng.random((n, d)) < 0.1
        x[mask] = rng.choice([-1, 1], mask.sum()) * 10.0 ** rng.uniform(14, 15, mask.sum())
    if d > 1 and rng.random() < 0.2:  # some constant columns
        cols = rng.random(d) < 0.5
        x[:, cols] = x[0, cols]
    if allow_bad and rng.random() < 0.04:
        x[rng.integers(n), rng.integers(d)] = pick(rng, [np.nan, np.inf, -np.inf])
    dtype = pick(rng, ["float32", "float32", "float64", "float64", "float16", "uint8", "int64"])
    if dtype == "float16" and not np.abs(x).max() < 6e4:
        dtype = "float32"
    if dtype in ("uint8", "int64"):
        info = np.iinfo(dtype)
        x = np.clip(np.nan_to_num(np.round(x)), info.min, info.max)
        x = np.clip(x, -2**62, 2**62)
    with np.errstate(all="ignore"):
        return x.astype(dtype)


def layouts(rng, x):
    """x in one of the forms an estimator accepts: array, view with odd strides, list, tensor."""
    form = pick(rng, ["array"] * 6 + ["fortran", "reversed", "strided", "list", "tensor", "memmap_like"])
    if form == "fortran":
        return np.asfortranarray(x)
    if form == "reversed":
        return x[::-1]
    if form == "strided":
        wide = np.repeat(x, 2, axis=1)
        return wide[:, ::2]
    if form == "list":
        return x.tolist()
    if form == "tensor" and x.dtype != np.uint16:
        return torch.from_numpy(np.ascontiguousarray(x))
    if form == "memmap_like":
        y = np.ascontiguousarray(x)
        y.setflags(write=False)
        return y
    return x


# ---------------------------------------------------------------------------------------- GMM reference
def reference_log_prob(g, x):
    """Exact float64 log pi_k + log N(x | k), (n, K), from the fitted parameters with (x - mu)^2
    computed directly; also the scale of the terms the expanded form cancels, (n,), and the
    error a full covariance's conditioning allows, (n,)."""
    x = np.asarray(x, dtype=np.float64)
    w, mu, cov = g.weights_, g.means_, g.covariances_
    d = x.shape[1]
    with np.errstate(all="ignore"):
        diff = x[:, None, :] - mu[None]
        if g.covariance_type == "full":
            chol = np.linalg.cholesky(cov)
            y = np.linalg.solve(chol[None], diff[..., None])[..., 0]
            maha = (y * y).sum(-1)
            log_det = 2 * np.log(np.diagonal(chol, axis1=1, axis2=2)).sum(-1)
            eigenvalues = np.linalg.eigvalsh(cov)
            prec_max = 1.0 / eigenvalues.min(-1)
            condition = (eigenvalues.max(-1) * prec_max).max()
        elif g.covariance_type == "diag":
            maha = (diff * diff / cov[None]).sum(-1)
            log_det = np.log(cov).sum(1)
            prec_max = 1.0 / cov.min(1)
        else:
            maha = (diff * diff).sum(-1) / cov[None]
            log_det = d * np.log(cov)
            prec_max = 1.0 / cov
        ll = np.log(w)[None] - 0.5 * (maha + log_det[None] + d * _LOG_2PI)
        shift = w @ mu
        # float32 E-steps take rows and means about a float32-representable shift (up to
        # u |shift| from the exact one, u the unit round-off): distances grow by as much.
        slack = np.abs(shift) * (np.finfo(np.float32).eps if g.compute_dtype == "float32" else 0.0)
        spread = ((np.abs(x - shift) + slack) ** 2).sum(1)[:, None] + ((np.abs(mu - shift) + slack) ** 2).sum(1)[None]
        scale = (spread * prec_max[None]).max(1)
        # A precision factor of an ill-conditioned covariance is exact only to eps cond: a row's
        # term along the weakest direction moves by up to ~eps cond |x - mu|^2 / lambda_min.
        conditioning = np.finfo(np.float64).eps * condition * scale if g.covariance_type == "full" else 0 * scale
    return ll, scale, conditioning


def logsumexp(a):
    top = a.max(1, keepdims=True)
    with np.errstate(all="ignore"):
        return (top + np.log(np.exp(a - top).sum(1, keepdims=True)))[:, 0]


def tolerance(g, ll, scale, conditioning):
    """Per-row absolute tolerance of log-densities (docs/numerics.md): float64 to 1e-6 relative
    and the rounding of rows and means to the shift they are taken about (eps |x - s| per
    coordinate, ~2 eps |x - s| sqrt(P) sqrt(maha) nats); float32 also to the round-off of its
    expanded form about the shift."""
    top = np.abs(ll).max(1)
    if g.compute_dtype == "float64":
        return 1e-6 * (1 + top) + 8 * np.finfo(np.float64).eps * np.sqrt(scale * (1 + top)) + 4 * conditioning
    return 1e-4 * (1 + top) + 4e-6 * scale + 4 * conditioning


def check_fitted(g, k, d, max_iter):
    check(g.weights_.shape == (k,) and g.means_.shape == (k, d), f"fitted shapes {g.weights_.shape} {g.means_.shape}")
    for name in ("weights_", "means_", "covariances_", "precisions_cholesky_"):
        check(np.isfinite(getattr(g, name)).all(), f"fitted {name} not finite")
    check((g.weights_ >= 0).all() and abs(g.weights_.sum() - 1) < 1e-6, f"weights sum {g.weights_.sum()}")
    if g.covariance_type == "full":
        # On the correlation matrices: eigenvalues of features with variances 1 and 1e28 side by
        # side come out with round-off ~1e12, negative for a matrix that is positive definite.
        scale = 1 / np.sqrt(np.diagonal(g.covariances_, axis1=1, axis2=2))
        corr = g.covariances_ * scale[:, :, None] * scale[:, None, :]
        check((np.diagonal(g.covariances_, axis1=1, axis2=2) > 0).all() and (np.linalg.eigvalsh(corr) > 0).all(),
              "covariance not positive definite")
    else:
        check((g.covariances_ > 0).all(), "variance <= 0")
    if max_iter > 0:
        check(np.isfinite(g.lower_bound_) and np.isfinite(g.lower_bounds_).all(), f"lower bound {g.lower_bound_}")
    check(0 <= g.n_iter_ <= max_iter, f"n_iter_ {g.n_iter_}")


def check_inference(trace, g, x):
    """predict / score_samples / score / predict_proba of rows x against the float64 reference."""
    xs = np.asarray(x.cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    ll, scale, conditioning = reference_log_prob(g, xs)
    finite = np.isfinite(ll).all()
    trace.at("score_samples")
    try:
        s = g.score_samples(x)
    except ValueError:
        if finite:
            raise
        return  # refused: a row too far out for float64 (the reference overflows too)
    check(finite, "score_samples answered rows whose exact log-densities overflow float64")
    ref = logsumexp(ll)
    tol = tolerance(g, ll, scale, conditioning)
    check(s.shape == (len(xs),), f"score_samples shape {s.shape}")
    check(np.isfinite(s).all(), f"score_samples not finite: {s[~np.isfinite(s)][:3]}")
    err = np.abs(s - ref)
    bad = np.flatnonzero(err > tol)
    check(bad.size == 0, lambda_msg("score_samples", bad, err, tol, s, ref))
    trace.at("score")
    m = g.score(x)
    check(abs(m - s.mean()) <= 1e-9 * (1 + abs(m)), f"score {m} != mean of score_samples {s.mean()}")
    trace.at("predict")
    labels = g.predict(x)
    check(labels.shape == (len(xs),) and labels.dtype.kind == "i", f"predict {labels.dtype}{labels.shape}")
    check(((labels >= 0) & (labels < g.n_components)).all(), "predict out of range")
    margin = ll.max(1) - ll[np.arange(len(xs)), labels]
    bad = np.flatnonzero(margin > 2 * tol)
    check(bad.size == 0, f"predict row {bad[:1]} chose a component {margin[bad[:1]]} nats below the best "
                         f"(tol {tol[bad[:1]]})")
    trace.at("predict_proba")
    p = g.predict_proba(x)
    check(p.shape == (len(xs), g.n_components), f"predict_proba shape {p.shape}")
    check(np.isfinite(p).all() and (p >= 0).all(), "predict_proba not finite or negative")
    check(np.abs(p.sum(1) - 1).max() < 1e-6, f"predict_proba rows sum to {p.sum(1)[:3]}")
    with np.errstate(all="ignore"):
        p_ref = np.exp(ll - ref[:, None])
    err = np.abs(p - p_ref).max(1)
    bad = np.flatnonzero(err > np.maximum(1e-6, 2 * tol))
    check(bad.size == 0, lambda_msg("predict_proba", bad, err, 2 * tol, None, None))


def lambda_msg(what, bad, err, tol, got, ref):
    if not bad.size:
        return ""
    i = bad[0]
    extra = f" (got {got[i]:.6g}, exact {ref[i]:.6g})" if got is not None else ""
    return f"{what}: {bad.size} row(s) off the float64 reference; row {i} by {err[i]:.3g} > tol {tol[i]:.3g}{extra}"


# ---------------------------------------------------------------------------------------- GMM cases
def case_gmm(rng, trace, ctx):
    n = int(pick(rng, [1, 2, 3, 5, 8, 13, 20, 40, 60]))
    d = int(pick(rng, [1, 2, 3, 5, 8]))
    x = gen_rows(rng, n, d)
    cov = pick(rng, ["spherical", "diag", "full"])
    k = int(min(pick(rng, [1, 2, 3, 4]), n + int(rng.random() < 0.05)))
    params = dict(n_components=k, covariance_type=cov, max_iter=int(pick(rng, [0, 1, 2, 3, 5])),
                  reg_covar=float(pick(rng, [1e-6, 1e-6, 0.0, 1e-3, 1.0])),
                  compute_dtype=pick(rng, ["float32", "float64"]), n_init=int(pick(rng, [1, 1, 2])),
                  init_params=pick(rng, ["kmeans", "k-means++", "random_from_data"]),
                  tol=float(pick(rng, [1e-3, 0.0])), random_state=int(rng.integers(2**31)), device="cpu",
                  # blocks of a few rows: statistics, bounds and worst rows summed across blocks
                  chunk_size=int(pick(rng, [262144, 262144, 262144, 1, 3, 7])))
    if cov != "full" and rng.random() < 0.1:
        params.update(estep="truncated", n_candidates=int(rng.integers(1, 4)), n_neighbors=int(rng.integers(1, 4)))
    if rng.random() < 0.1 and k <= n:
        xf = np.asarray(x, np.float64)
        params["means_init"] = xf[rng.choice(n, k, replace=False)] if np.isfinite(xf).all() else np.zeros((k, d))
    if rng.random() < 0.05:
        params["weights_init"] = np.full(k, 1.0 / k)
    trace.at("fit")
    g = GaussianMixture(**params)
    g.fit(layouts(rng, x))
    check_fitted(g, k, d, params["max_iter"])
    check_inference(trace, g, x)
    nq = int(rng.integers(1, 6))
    q = gen_rows(rng, nq, d)
    if rng.random() < 0.3:  # far but finite queries
        q = np.asarray(q, np.float64) * 0 + pick(rng, [1e10, 1e19, 1e20, -1e30, 1e150, 1e300])
    if np.isfinite(np.asarray(q, np.float64)).all():
        check_inference(trace, g, layouts(rng, q))
    else:
        refused(trace, "score_samples", g.score_samples, q)
    if rng.random() < 0.3:
        trace.at("save")
        buffer = io.BytesIO()
        g.save(buffer)
        buffer.seek(0)
        trace.at("load")
        h = GaussianMixture.load(buffer)
        x64 = np.asarray(x, np.float64)
        check(np.array_equal(h.score_samples(x64), g.score_samples(x64)), "load gives other scores")
    if rng.random() < 0.2:
        trace.at("sample")
        xs, ys = g.sample(int(rng.integers(1, 20)))
        check(np.isfinite(xs).all() and ((ys >= 0) & (ys < k)).all(), "sample not finite")
    if rng.random() < 0.15:
        trace.at("fit(warm_start)")
        g.set_params(warm_start=True)
        g.fit(x)
        check_fitted(g, k, d, params["max_iter"])


_BAD_PARAMS = {
    "n_components": [0, -1, 1.5, "3", True, 10**30, None],
    "covariance_type": ["tied", "DIAG", None, 3],
    "tol": [-1.0, float("nan"), float("inf"), "1e-3"],
    "reg_covar": [-1e-6, float("nan"), float("inf"), None],
    "max_iter": [-1, 1.5, "10", None],
    "n_init": [0, -2, 2.0, 10**30],
    "init_params": ["kmeans2", None, ""],
    "random_state": [-1, 2**40, "seed", 1.5],
    "chunk_size": [0, -5, 2.5],
    "device": ["gpu", "cuda:7", None],
    "compute_dtype": ["float16", "bfloat16", np.float64],
    "precision": ["fp8", None],
    "variance_floor": [-1.0, float("nan"), "none"],
    "estep": ["sparse", None],
    "n_candidates": [0, -1, 1.5],
    "n_neighbors": [0, -3],
    "verbose": [-1, "yes"],
    "warm_start": ["no", 2],
    "cache_data": ["sometimes", 0.5],
}


def case_gmm_misuse(rng, trace, ctx):
    """Invalid parameters and inputs: each must be refused with a ValueError/TypeError."""
    d = int(rng.integers(1, 5))
    x = np.random.default_rng(0).standard_normal((30, d))
    for name in rng.choice(sorted(_BAD_PARAMS), size=3, replace=False):
        value = pick(rng, _BAD_PARAMS[name])
        params = {"n_components": 2, "device": "cpu", name: value}
        refused(trace, f"fit({name}={value!r})", GaussianMixture(**params).fit, x)
    bad_inputs = [np.empty((0, d)), np.empty((5, 0)), x[:, 0], x[None], [[1.0, 2.0], [3.0]], np.array([["a"] * d] * 4),
                  x.astype(np.complex128), {"x": 1}, None, "data", np.array([[None] * d] * 4), 3.0,
                  (row for row in x), np.full((4, d), np.nan)]
    for i in rng.choice(len(bad_inputs), size=3, replace=False):
        refused(trace, "fit(X)", GaussianMixture(2, device="cpu").fit, bad_inputs[i])
    cov = pick(rng, ["spherical", "diag", "full"])
    k = 2
    bad_init = {"weights_init": [np.array([0.5, 0.6]), np.array([1.0]), np.array([-0.5, 1.5]), np.array([np.nan, 1])],
                "means_init": [np.zeros((3, d)), np.zeros((k, d + 1)), np.full((k, d), np.inf)],
                "precisions_init": [{"spherical": -np.ones(k), "diag": -np.ones((k, d)),
                                     "full": -np.tile(np.eye(d), (k, 1, 1))}[cov], np.ones((k + 1, d, d)),
                                    {"spherical": np.zeros(k), "diag": np.zeros((k, d)),
                                     "full": np.zeros((k, d, d))}[cov]]}
    name = pick(rng, sorted(bad_init))
    refused(trace, f"fit({name})", GaussianMixture(k, covariance_type=cov, device="cpu",
                                                   **{name: pick(rng, bad_init[name])}).fit, x)
    g = GaussianMixture(k, covariance_type=cov, device="cpu", max_iter=2)
    for method in ("predict", "score_samples", "predict_proba", "score", "sample"):
        refused(trace, f"{method}(unfitted)", getattr(g, method), *(() if method == "sample" else (x,)))
    trace.at("fit")
    g.fit(x)
    for what, q in (("d", x[:, :max(1, d - 1)] if d > 1 else np.ones((3, 2))), ("1-D", x[0]), ("empty", np.empty((0, d))),
                    ("nan", np.full((2, d), np.nan)), ("complex", x.astype(np.complex64)), ("ragged", [[1.0] * d, [2.0] * (d + 1)])):
        method = pick(rng, ["predict", "score_samples", "predict_proba", "score"])
        refused(trace, f"{method}(X {what})", getattr(g, method), q)
    refused(trace, "sample(n)", g.sample, pick(rng, [0, -1, 1.5]))
    trace.at("load")
    refused(trace, "load", GaussianMixture.load, io.BytesIO(pick(rng, [b"", b"junk", b"PK\x03\x04"])))


# ---------------------------------------------------------------------------------------- index cases
def index_spec(rng, d, nlist):
    encoding = pick(rng, ["Flat"] * 5 + ["PQ", "PQ", "SQ8", "SQ4", "SQfp16", "SQ6", "junk"])
    if encoding == "PQ":
        divisors = [m for m in range(1, d + 1) if d % m == 0]
        m = pick(rng, divisors) if rng.random() < 0.9 else d + 1
        nbits = pick(rng, [1, 2, 4, 4, 6, 8] + ([0, 9, 17] if rng.random() < 0.2 else []))
        encoding = f"PQ{m}x{nbits}"
    elif encoding == "junk":
        encoding = pick(rng, ["LSH", "PQ", "PQ0", "SQ3", "IVF4,Flat", "Flat,Flat", "RFlat", "PQ2x4fs"])
    options = []
    if rng.random() < 0.5:
        options.append(pick(rng, ["spherical", "diag", "full", "dense"]))
    for key, values in (("partition", ["gmm", "kmeans"]),
                        ("coarse", ["flat", "hnsw4", "hnsw32", "hnsw2", "auto", "pca", "pca1", "pca3"]),
                        ("spill", ["soar", "rair", "gmm", "none"]), ("copies", ["1", "1.25", "2"]),
                        ("probe", ["adaptive", "radius", "fixed"]), ("iter", ["1", "2"]),
                        ("kmeans_iter", ["1", "3"]), ("calibration_rows", ["1", str(nlist), "7"])):
        if rng.random() < 0.3:
            options.append(f"{key}={pick(rng, values)}")
    prefix = pick(rng, [""] * 6 + ["IDMap,", "IDMap2,"])
    opts = f"({','.join(options)})" if options else ""
    return f"{prefix}IVF{nlist}_GMM{opts},{encoding}", encoding


def exact_distances(metric, q, xb):
    q, xb = np.asarray(q, np.float64), np.asarray(xb, np.float64)
    if metric == "cosine":
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        xb = xb / np.linalg.norm(xb, axis=1, keepdims=True)
    if metric == "l2":
        return ((q[:, None] - xb[None]) ** 2).sum(-1)
    return q @ xb.T


def check_knn(index, stored, metric, flat, q, k, D, I, *, full_scan, promise_full):
    """(D, I) of a k-NN search against the stored vectors (id -> row) and brute force."""
    nq = len(q)
    check(D.shape == I.shape == (nq, k) and D.dtype == np.float32 and I.dtype == np.int64,
          f"search shapes {D.dtype}{D.shape} {I.dtype}{I.shape}")
    ids = np.array(sorted(stored), dtype=np.int64)
    xb = np.array([stored[i] for i in ids]) if len(ids) else np.empty((0, index.d))
    exact = exact_distances(metric, q, xb) if len(ids) else np.empty((nq, 0))
    position = {int(i): j for j, i in enumerate(ids)}
    sign = 1 if metric == "l2" else -1
    for r in range(nq):
        valid = I[r] >= 0
        got = I[r][valid]
        check((valid[: valid.sum()]).all(), f"row {r}: -1 before a valid id: {I[r]}")
        check(len(set(got.tolist())) == got.size, f"row {r}: repeated ids {I[r]}")
        check(all(int(i) in position for i in got), f"row {r}: ids not in the index {I[r]}")
        check(np.isfinite(D[r][valid]).all(), f"row {r}: non-finite distances {D[r]}")
        if promise_full and len(ids) >= k:
            check(valid.all(), f"row {r}: -1 ids though the index holds {len(ids)} >= k={k} vectors: {I[r]}")
        dv = D[r][valid].astype(np.float64)
        if not flat:
            continue
        truth = exact[r, [position[int(i)] for i in got]]
        mag = 1e-4 * (1 + np.abs(exact[r]).max() if exact.shape[1] else 1)
        qn = float(np.asarray(q[r], np.float64) @ np.asarray(q[r], np.float64))
        tol = mag + 1e-5 * (qn + (xb * xb).sum(1).max() if len(ids) else 0)
        check(np.all(np.abs(dv - truth) <= tol), f"row {r}: distances {dv[:3]} differ from exact {truth[:3]}")
        check(np.all(np.diff(sign * dv) >= -tol), f"row {r}: distances not sorted {dv}")
        if full_scan and got.size:
            kth = np.sort(sign * exact[r])[min(k, len(ids)) - 1]
            check(sign * dv[-1] <= kth + tol, f"row {r}: full scan missed a nearer vector ({dv[-1]} vs {sign * kth})")


def case_index(rng, trace, ctx):
    d = int(pick(rng, [1, 2, 3, 4, 8, 16]))
    nlist = int(pick(rng, [1, 2, 4, 8, 16]))
    description, encoding = index_spec(rng, d, nlist)
    metric = pick(rng, ["l2"] * 4 + ["ip", "cosine"])
    n_train = int(pick(rng, [nlist, 2 * nlist + 3, 40, 120, 300]))
    xt = gen_rows(rng, n_train, d)
    trace.at("index_factory")
    index = flashgmm_ivf.index_factory(d, description, metric, device="cpu")
    trace.at("train")
    index.train(layouts(rng, xt))
    check(index.is_trained, "not trained after train")
    # The lists' mixture: EM's bounds (partition=gmm) all finite, as fit promises.
    check(np.isfinite(index.gmm.lower_bounds_).all(), f"index mixture bounds {index.gmm.lower_bounds_}")
    n_add = int(pick(rng, [1, 5, 30, 200]))
    xb = np.asarray(gen_rows(rng, n_add, d, allow_bad=rng.random() < 0.2))
    stored = {}
    if rng.random() < 0.3:
        trace.at("add_with_ids")
        high = pick(rng, [n_add, 10**6, 2**62])
        ids = rng.choice(high, size=n_add, replace=False).astype(np.int64)
        index.add_with_ids(xb, ids)
    else:
        trace.at("add")
        index.add(xb)
        ids = np.arange(n_add)
    xb32 = np.asarray(xb, np.float32)
    stored.update({int(i): row for i, row in zip(ids, xb32)})
    check(index.ntotal == len(stored), f"ntotal {index.ntotal} after adding {len(stored)} vectors")
    if rng.random() < 0.25:
        trace.at("calibrate")
        cq = np.asarray(gen_rows(rng, int(pick(rng, [nlist, 2 * nlist + 1, 40])), d, allow_bad=False), np.float32)
        if encoding != "Flat" or rng.random() < 0.3:  # neighbours given (any stored ids: a wrong table, valid results)
            known = np.array(sorted(stored), dtype=np.int64)
            index.calibrate(cq, known[rng.integers(0, len(known), (len(cq), 10))])
        else:
            index.calibrate(cq)
    if rng.random() < 0.2:
        trace.at("set depth")
        if rng.random() < 0.5:
            index.nprobe = int(rng.integers(1, nlist + 1))
        else:
            index.recall = float(pick(rng, [0.5, 0.9, 1.0]))
    flat = encoding == "Flat"
    nq = int(rng.integers(1, 8))
    q = np.asarray(gen_rows(rng, nq, d, allow_bad=False), np.float32)
    if rng.random() < 0.15:
        q[0] = pick(rng, [1e19, -1e18, 3e15])
    for _ in range(int(rng.integers(1, 4))):
        k = int(pick(rng, [1, 3, 10, n_add, n_add + 5]))
        mode = pick(rng, ["nprobe", "recall", "params", "default", "full"])
        trace.at(f"search({mode})")
        if mode == "nprobe":
            nprobe = int(rng.integers(1, nlist + 1))
            D, I = index.search(q, k, nprobe=nprobe)
        elif mode == "recall":
            D, I = index.search(q, k, recall=float(pick(rng, [0.5, 0.9, 0.99, 1.0])))
        elif mode == "params":
            nprobe = int(rng.integers(1, nlist + 1))
            D, I = index.search(q, k, params=faiss.SearchParametersIVF(nprobe=nprobe))
        elif mode == "full":
            nprobe = nlist
            D, I = index.search(q, k, nprobe=nlist)
        else:
            D, I = index.search(q, k)
        check_knn(index, stored, metric, flat, q, k, D, I, full_scan=mode == "full" and index.probe != "radius",
                  promise_full=mode in ("recall", "full"))
    if rng.random() < 0.5:
        trace.at("range_search")
        exact = exact_distances(metric, q, np.array(list(stored.values())))
        radius = float(np.quantile(exact, rng.random()))
        lims, D, I = index.range_search(q, radius, nprobe=nlist)
        check(lims.shape == (nq + 1,) and lims[0] == 0 and (np.diff(lims) >= 0).all() and lims[-1] == len(D) == len(I),
              f"range_search lims {lims}")
        keys = np.array(list(stored))
        for r in range(nq):
            got = I[lims[r]:lims[r + 1]]
            check(len(set(got.tolist())) == got.size, f"range_search row {r}: repeated ids")
            check(all(int(i) in stored for i in got), f"range_search row {r}: ids not in the index")
            check(np.isfinite(D[lims[r]:lims[r + 1]]).all(), f"range_search row {r}: non-finite distances")
            if flat:
                tol = 1e-4 * (1 + np.abs(exact[r]).max())
                inside = exact[r] < radius - tol if metric == "l2" else exact[r] > radius + tol
                missing = set(keys[inside].tolist()) - set(got.tolist())
                check(not missing, f"range_search row {r}: {len(missing)} vector(s) within the radius missing")
    if rng.random() < 0.3:
        trace.at("remove_ids")
        keys = np.array(list(stored))
        gone = rng.choice(keys, size=int(rng.integers(0, len(keys) + 1)), replace=False)
        extra = np.array([int(pick(rng, [-1, 2**62 + 5, 10**7]))])
        removed = index.remove_ids(np.concatenate([gone, extra]).astype(np.int64))
        for i in gone:
            stored.pop(int(i))
        check(removed == len(gone) - int(extra[0] in gone) and index.ntotal == len(stored),
              f"remove_ids returned {removed}, ntotal {index.ntotal}, expected {len(gone)}, {len(stored)}")
        if stored:
            k = min(5, len(stored))
            trace.at("search(after remove)")
            D, I = index.search(q, k, nprobe=nlist)
            check_knn(index, stored, metric, flat, q, k, D, I, full_scan=index.probe != "radius", promise_full=True)
    if rng.random() < 0.35 and stored:
        path = ctx["tmp"] / f"index_{os.getpid()}.npz"
        trace.at("write_index")
        flashgmm_ivf.write_index(index, path)
        trace.at("read_index")
        other = flashgmm_ivf.read_index(path)
        check(other.ntotal == index.ntotal, "read_index: ntotal differs")
        k = min(5, len(stored))
        D1, I1 = index.search(q, k, nprobe=nlist)
        D2, I2 = other.search(q, k, nprobe=nlist)
        check(np.array_equal(I1, I2) and np.array_equal(D1, D2), "read_index: search results differ")
        trace.at("add(after read)")
        x_new = np.asarray(gen_rows(rng, 3, d, allow_bad=False), np.float32)
        before = set(stored)
        other.add(x_new)
        check(other.ntotal == len(before) + 3, "add after read: ntotal wrong (ids reused?)")


def case_index_misuse(rng, trace, ctx):
    d = int(pick(rng, [2, 4]))
    nlist = 4
    x = np.random.default_rng(int(rng.integers(2**31))).standard_normal((200, d)).astype(np.float32)
    bad_descriptions = ["IVF0_GMM,Flat", "IVF-4_GMM,Flat", "IVF4_GMM", "IVF4,Flat", "IVF4_GMM(foo),Flat",
                        "IVF4_GMM(copies=3),Flat", "IVF4_GMM(copies=abc),Flat", "IVF4_GMM(coarse=hnsw1),Flat",
                        "IVF4_GMM(coarse=hnsw0),Flat", "IVF4_GMM(coarse=pca0),Flat", "IVF4_GMM(coarse=pca9),Flat",
                        "IVF4_GMM(coarse=auto2),Flat", "IVF4_GMM,PQ3x8", "IVF4_GMM,PQ2x0", "IVF4_GMM,PQ2x99",
                        "IVF4_GMM(spill=x),Flat", "IVF4_GMM(nprobe=9),Flat", "IVF4_GMM(recall=2),Flat",
                        "IVF4_GMM(iter=0),Flat", "IVF4_GMM(seed=-1),Flat", "IVF99999999999999999999_GMM,Flat",
                        "IVF4_GMM(chunk_size=0),Flat", "IVF4_GMM(compute_dtype=half),Flat", "", None, 5]
    for desc in rng.choice(np.array(bad_descriptions, dtype=object), size=3, replace=False):
        refused(trace, "index_factory", lambda s=desc: flashgmm_ivf.index_factory(d, s, device="cpu").train(x))
    refused(trace, "index_factory(d)", flashgmm_ivf.index_factory, pick(rng, [0, -1, 2.5, "4", None]), "IVF4_GMM,Flat")
    refused(trace, "index_factory(metric)", flashgmm_ivf.index_factory, d, "IVF4_GMM,Flat", pick(rng, ["cos", 7, None]))
    index = flashgmm_ivf.index_factory(d, f"IVF{nlist}_GMM(coarse={pick(rng, ['flat', 'hnsw8', 'pca1'])}),Flat", device="cpu")
    refused(trace, "search(untrained)", index.search, x[:2], 1)
    refused(trace, "add(untrained)", index.add, x)
    bad_rows = [x[:, :1], x[:, 0], np.full((5, d), np.nan), x.astype(np.complex64), np.array([["a"] * d] * 3),
                np.full((3, d), 1e30, np.float64), x[:2]]
    refused(trace, "train(x)", index.train, pick(rng, bad_rows))
    trace.at("train")
    index.train(x)
    refused(trace, "search(empty)", index.search, x[:2], 1)
    refused(trace, "add(x)", index.add, pick(rng, bad_rows[:6]))
    refused(trace, "add_with_ids(ids)", index.add_with_ids, x[:3],
            pick(rng, [np.array([-1, 0, 1]), np.array([0.5, 1, 2]), np.array([1, 2]), np.array([2**63 - 1, 0, 1],
                                                                                                  dtype=np.int64),
                       np.array([2**64 - 1, 0, 1], dtype=np.uint64), np.array(["a", "b", "c"])]))
    trace.at("add")
    index.add(x)
    q = x[:3]
    for kwargs in rng.choice(np.array([{"k": 0}, {"k": -1}, {"k": 2.5}, {"k": "3"}, {"k": 10**12},
                                       {"k": 1, "nprobe": 0}, {"k": 1, "nprobe": nlist + 1},
                                       {"k": 1, "recall": 0.0}, {"k": 1, "recall": 1.5}, {"k": 1, "recall": float("nan")},
                                       {"k": 1, "nprobe": 1, "recall": 0.9},
                                       {"k": 1, "params": faiss.SearchParametersIVF(nprobe=0)},
                                       {"k": 1, "params": "nprobe=2"}], dtype=object), size=3, replace=False):
        refused(trace, "search(args)", index.search, q, **kwargs)
    refused(trace, "search(x)", index.search, pick(rng, bad_rows[:6]), 1)
    refused(trace, "set depth", setattr, index, pick(rng, ["nprobe", "recall"]),
            pick(rng, [0, -1, nlist + 1, 1.5, "2", float("nan"), 0.0]))
    refused(trace, "calibrate", index.calibrate, *pick(rng, [
        (x[:max(1, nlist - 1)],) if nlist > 1 else (x[:, :1],), (x[:nlist], np.zeros((nlist, 3), np.int64)),
        (x[:nlist], np.zeros((nlist, 10))), (np.full((nlist, d), np.nan),)]))
    refused(trace, "range_search", index.range_search, q, pick(rng, [float("nan"), float("inf"), "1", None]))
    refused(trace, "remove_ids", index.remove_ids, pick(rng, [np.array([0.5]), np.zeros((2, 2), np.int64), "1"]))
    refused(trace, "write_index", flashgmm_ivf.write_index, pick(rng, [index.index, None, "index"]),
            ctx["tmp"] / f"w{os.getpid()}.npz")
    raw = ctx["tmp"] / f"raw{os.getpid()}.bin"
    raw.write_bytes(pick(rng, [b"", b"IwFl" + bytes(40), b"PK\x05\x06" + bytes(18), os.urandom(64)]))
    refused(trace, "read_index", flashgmm_ivf.read_index, raw)


# ---------------------------------------------------------------------------------------- files
def setup_files(tmp: Path) -> dict:
    """Base files the file cases damage, and what loading them must give back."""
    rng = np.random.default_rng(7)
    base = {"gmm": [], "index": [], "data": {}}
    x = np.concatenate([rng.standard_normal((60, 3)), rng.standard_normal((60, 3)) + 6])
    for cov in ("spherical", "diag", "full"):
        g = GaussianMixture(3, covariance_type=cov, max_iter=5, random_state=0, device="cpu").fit(x)
        path = tmp / f"gmm_{cov}.npz"
        g.save(path)
        np.save(tmp / f"gmm_{cov}_scores.npy", g.score_samples(x[:20]))
        base["gmm"].append(str(path))
    np.save(tmp / "gmm_queries.npy", x[:20])
    xt = np.concatenate([rng.standard_normal((200, 8)), rng.standard_normal((200, 8)) + 4]).astype(np.float32)
    q = xt[::37] + 0.1
    np.save(tmp / "index_queries.npy", q)
    for name, spec in (("flat", "IVF4_GMM,Flat"), ("pq", "IVF4_GMM(coarse=flat),PQ4x4"),
                       ("sq", "IVF4_GMM(diag,spill=gmm,probe=fixed),SQ8"), ("ids", "IDMap,IVF4_GMM(probe=radius),Flat"),
                       ("pca", "IVF4_GMM(coarse=pca2),Flat")):
        index = flashgmm_ivf.index_factory(8, spec, device="cpu")
        index.train(xt)
        if name == "ids":
            index.add_with_ids(xt[:150], np.arange(150) * 1000 + 7)
        else:
            index.add(xt[:150])
        index.search(q, 5, recall=0.9)  # fits the depth table, stored with the index
        path = tmp / f"index_{name}.npz"
        flashgmm_ivf.write_index(index, path)
        D, I = index.search(q, 5, nprobe=4)
        np.savez(tmp / f"index_{name}_ref.npz", D=D, I=I, ntotal=index.ntotal)
        base["index"].append(str(path))
    xd = rng.standard_normal((20, 4)).astype(np.float32)
    for suffix, values in ((".npy", xd), (".fvecs", xd), (".ivecs", (xd * 100).astype(np.int32)),
                           (".bvecs", rng.integers(0, 256, (20, 4)).astype(np.uint8)), (".fbin", xd),
                           (".u8bin", rng.integers(0, 256, (20, 4)).astype(np.uint8)), (".hdf5", xd)):
        path = tmp / f"data{suffix}"
        fds.write_vectors(path, values)
        base["data"][suffix] = str(path)
    gt = fds.exact_knn(xd, xd[:5] + 0.01, 3, "l2")
    path = tmp / "ann.hdf5"
    fds.write_ann_hdf5(path, train=xd, test=xd[:5] + 0.01, neighbors=gt,
                       distances=np.sort(exact_distances("l2", xd[:5] + 0.01, xd), 1)[:, :3], distance="euclidean")
    base["data"]["ann"] = str(path)
    return base


def zip_members(blob: bytes) -> dict:
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        return {name: z.read(name) for name in z.namelist()}


def npy_array(raw: bytes):
    return np.load(io.BytesIO(raw), allow_pickle=False)


def npy_bytes(a) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, a, allow_pickle=False)
    return buffer.getvalue()


def write_zip(members: dict, *, compress=False) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as z:
        for name, raw in members.items():
            z.writestr(name, raw)
    return buffer.getvalue()


def resign(members: dict, header_key: str, digest_key: str, arrays) -> None:
    """Recompute a file's SHA-256 as the formats document it (header bytes, then each array's
    name, dtype, shape and bytes), so the checks past the checksum are reached."""
    import hashlib
    raw = npy_array(members[header_key + ".npy"]).tobytes()
    h = hashlib.sha256(len(raw).to_bytes(8, "little") + raw)
    for name in arrays:
        a = np.ascontiguousarray(npy_array(members[name + ".npy"]))
        h.update(f"{name}:{a.dtype.str}:{a.shape}".encode() + a.tobytes())
    members[digest_key + ".npy"] = npy_bytes(np.array(h.hexdigest()))


def byte_damage(rng, blob: bytes) -> tuple[str, bytes]:
    how = pick(rng, ["truncate", "flip", "flip", "overwrite", "zero_tail", "append", "zip_structure"])
    data = bytearray(blob)
    if how in ("truncate", "flip", "overwrite", "append"):
        return byte_damage_plain(rng, how, data, overwrite_max=64, append_max=100)
    if how == "zero_tail":
        start = int(rng.integers(0, len(data)))
        return how, bytes(data[:start]) + bytes(len(data) - start)
    # zip structure: a field of a local header, the central directory or its end record
    sig = pick(rng, [b"PK\x03\x04", b"PK\x01\x02", b"PK\x05\x06"])
    places = [i for i in range(len(data)) if data.startswith(sig, i)]
    if places:
        at = pick(rng, places) + int(rng.integers(4, 30))
        if at < len(data):
            data[at] = int(rng.integers(256))
    return "zip_" + {b"PK\x03\x04": "local", b"PK\x01\x02": "central", b"PK\x05\x06": "end"}[sig], bytes(data)


def gmm_member_edit(rng, members: dict) -> str:
    """Edit header fields or arrays of a GaussianMixture file (its checksum recomputed or not)."""
    header = json.loads(npy_array(members["header.npy"]).tobytes())
    arrays = {m: npy_array(members[m + ".npy"]) for m in ("weights", "means", "covariances")}
    how = pick(rng, ["header", "version", "format", "negative_var", "nan", "huge_mean", "weights", "swap", "shape",
                     "dtype", "missing", "extra", "object", "other_model", "json"])
    if how == "header":
        field = pick(rng, ["n_components", "covariance_type", "reg_covar", "compute_dtype", "n_features_in_",
                           "n_iter_", "lower_bound_", "converged_", "weights_"])
        value = pick(rng, [0, -1, 2, 4, "full", "diag", None, 1e300, "x", True, [1], float("nan")])
        if field in header["params"]:
            header["params"][field] = value
        elif field in header["fitted"]:
            header["fitted"][field] = value
        else:
            header["fitted"][field] = value
    elif how == "version":
        header["format_version"] = pick(rng, [0, 1, 3, "2", None, 2.0])
    elif how == "format":
        header["format"] = pick(rng, ["flashgmm_ivf.GMMIndexIVF", "", None])
    elif how == "negative_var":
        arrays["covariances"] = -np.abs(arrays["covariances"])
    elif how == "nan":
        name = pick(rng, list(arrays))
        arrays[name] = arrays[name].copy()
        arrays[name].flat[int(rng.integers(arrays[name].size))] = pick(rng, [np.nan, np.inf])
    elif how == "huge_mean":
        arrays["means"] = arrays["means"] * pick(rng, [1e200, 1e16, -1e20])
    elif how == "weights":
        arrays["weights"] = arrays["weights"] * pick(rng, [2.0, 0.0, -1.0])
    elif how == "swap":
        a, b = rng.choice(list(arrays), 2, replace=False)
        arrays[a], arrays[b] = arrays[b], arrays[a]
    elif how == "shape":
        name = pick(rng, list(arrays))
        arrays[name] = arrays[name][:-1] if rng.random() < 0.5 else arrays[name].reshape(-1)
    elif how == "dtype":
        name = pick(rng, list(arrays))
        arrays[name] = arrays[name].astype(pick(rng, [np.float32, np.int64, np.float16]))
    elif how == "missing":
        members.pop(pick(rng, ["weights.npy", "means.npy", "covariances.npy", "header.npy", "checksum.npy"]))
        return how
    elif how == "extra":
        members["extra.npy"] = npy_bytes(np.zeros(3))
        return how
    elif how == "object":
        buffer = io.BytesIO()
        np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
        members[pick(rng, ["weights.npy", "header.npy", "checksum.npy"])] = buffer.getvalue()
        return how
    elif how == "other_model":
        arrays["means"] = arrays["means"] + 1.0
    elif how == "json":
        members["header.npy"] = npy_bytes(np.frombuffer(pick(rng, [b"{", b"[]", b"null", b"\xff\xfe", b"{}"]),
                                                        np.uint8))
        return how
    members["header.npy"] = npy_bytes(np.frombuffer(json.dumps(header).encode(), np.uint8))
    for name, a in arrays.items():
        members[name + ".npy"] = npy_bytes(a)
    if rng.random() < 0.7:
        resign(members, "header", "checksum", ("weights", "means", "covariances"))
        return how + "+resigned"
    return how


def damaged_copy(rng, base, ctx, member_edit, byte_share):
    """A damaged copy of the file ``base``: raw byte damage (with probability ``byte_share``)
    or an edit of its archive members; returns (how, path)."""
    blob = Path(base).read_bytes()
    if rng.random() < byte_share:
        how, blob = byte_damage(rng, blob)
    else:
        members = zip_members(blob)
        how = member_edit(rng, members)
        blob = write_zip(members, compress=rng.random() < 0.2)
    path = ctx["tmp"] / f"damaged_{os.getpid()}.npz"
    path.write_bytes(blob)
    return how, path


def case_gmm_file(rng, trace, ctx):
    base = pick(rng, ctx["base"]["gmm"])
    original = GaussianMixture.load(base)
    how, path = damaged_copy(rng, base, ctx, gmm_member_edit, byte_share=0.5)
    trace.at(f"GaussianMixture.load[{how.split('+')[0]}]")
    g = GaussianMixture.load(path)
    same = all(np.array_equal(getattr(g, a), getattr(original, a)) for a in ("weights_", "means_", "covariances_")) \
        and g.get_params() == original.get_params()
    if not same:
        check("resigned" in how, f"{how}: a damaged file loaded as a different model")
    # A model that loads must be usable: its outputs checked as a fitted model's.
    check_fitted(g, g.n_components, g.means_.shape[1], g.n_iter_)
    check_inference(trace, g, np.load(ctx["tmp"] / "gmm_queries.npy")[:, : g.means_.shape[1]])


def index_member_edit(rng, members: dict) -> str:
    header = json.loads(npy_array(members["header.npy"]).tobytes())
    how = pick(rng, ["header", "header", "header", "faiss_bytes", "faiss_bytes", "gmm_bytes", "calibration", "table",
                     "swap", "missing", "version", "faiss_other"])
    if how == "header":
        field = pick(rng, ["ntotal", "next_id", "max_dup", "n_entries", "nlist", "d", "encoding", "metric",
                           "spill_threshold", "table_ntotal", "has_table", "faiss_class", "settings", "gmm_params"])
        value = pick(rng, [0, 1, 3, 7, -1, 2**63, 1e300, "ip", "PQ4x4", "Flat", None, True, {}, [],
                           float("nan"), "IndexIVFPQ", {"probe": "radius"}, {"nprobe": 99}])
        if field == "settings" and isinstance(value, dict) and value:
            header["settings"] = {**header["settings"], **value}
        else:
            header[field] = value
        members["header.npy"] = npy_bytes(np.frombuffer(json.dumps(header).encode(), np.uint8))
    elif how == "version":
        header["format_version"] = pick(rng, [1, 3, None])
        members["header.npy"] = npy_bytes(np.frombuffer(json.dumps(header).encode(), np.uint8))
    elif how in ("faiss_bytes", "gmm_bytes"):
        name = "faiss_index.npy" if how == "faiss_bytes" else "gmm.npy"
        raw = bytearray(npy_array(members[name]).tobytes())
        for pos in rng.integers(0, len(raw), size=int(rng.integers(1, 4))):
            raw[pos] = int(rng.integers(256)) if rng.random() < 0.5 else raw[pos] ^ (1 << int(rng.integers(8)))
        if rng.random() < 0.2:
            raw = raw[: int(rng.integers(len(raw)))]
        members[name] = npy_bytes(np.frombuffer(bytes(raw), np.uint8))
    elif how == "faiss_other":
        other = faiss.index_factory(8, pick(rng, ["IVF4,Flat", "IVF2,Flat", "Flat", "IVF4,PQ4x4"]))
        if not other.is_trained:
            other.train(np.random.default_rng(0).standard_normal((300, 8)).astype(np.float32))
        members["faiss_index.npy"] = npy_bytes(faiss.serialize_index(other))
    elif how == "calibration":
        name = pick(rng, ["calibration_queries", "calibration_ids", "calibration_distances", "calibration_self_pending"])
        a = npy_array(members[name + ".npy"]).copy()
        if a.size:
            a = pick(rng, [a[:-1], a.reshape(-1), a * 0 + (10**12 if a.dtype.kind == "i" else np.nan)]) \
                if a.dtype != np.bool_ else a[:-1]
        members[name + ".npy"] = npy_bytes(a)
    elif how == "table":
        name = pick(rng, ["table_edges", "table_recall", "table_cost", "table_counts"])
        a = npy_array(members[name + ".npy"])
        members[name + ".npy"] = npy_bytes(pick(rng, [a[:-1] if a.size else a, a * np.nan if a.dtype.kind == "f"
                                                      else -a - 1, a.astype(np.float32)]))
    elif how == "swap":
        a, b = rng.choice(["calibration_queries", "calibration_distances", "table_recall", "table_cost", "gmm",
                           "faiss_index"], 2, replace=False)
        members[a + ".npy"], members[b + ".npy"] = members[b + ".npy"], members[a + ".npy"]
    elif how == "missing":
        members.pop(pick(rng, sorted(members)))
        return how
    if rng.random() < 0.7:
        from flashgmm_ivf.ivf import index_io
        resign(members, "header", "sha256", index_io.FILE_ARRAYS)
        return how + "+resigned"
    return how


def check_index_consistent(index, q, k):
    """A loaded index whose contents differ from the original's must still be self-consistent."""
    inner = index.index
    stored = faiss_ids(inner)
    check(index.ntotal == len(stored), f"ntotal {index.ntotal} but the lists hold {len(stored)} distinct ids")
    check(not stored.size or index._next_id > stored.max(), f"next id {index._next_id} <= a stored id {stored.max()}")
    D, I = index.search(q, k, nprobe=index.nlist)
    for r in range(len(q)):
        got = I[r][I[r] >= 0]
        check(len(set(got.tolist())) == got.size and np.isin(got, stored).all(), f"row {r}: bad ids {I[r]}")
        if len(stored) >= k:
            check((I[r] >= 0).all(), f"row {r}: -1 ids with {len(stored)} vectors")
        check(np.isfinite(D[r][I[r] >= 0]).all(), f"row {r}: non-finite distances")
    if index.ntotal >= k:
        D, I = index.search(q, k, recall=0.9)
        check((I >= 0).all(), "recall search returned -1 ids")


def faiss_ids(inner):
    invlists = inner.invlists
    parts = [faiss.rev_swig_ptr(invlists.get_ids(i), invlists.list_size(i)).copy()
             for i in range(inner.nlist) if invlists.list_size(i)]
    return np.unique(np.concatenate(parts)) if parts else np.empty(0, np.int64)


def case_index_file(rng, trace, ctx):
    base = pick(rng, ctx["base"]["index"])
    ref = np.load(base.replace(".npz", "_ref.npz"))
    q = np.load(ctx["tmp"] / "index_queries.npy")
    how, path = damaged_copy(rng, base, ctx, index_member_edit, byte_share=0.45)
    trace.at(f"read_index[{how.split('+')[0]}]")
    index = flashgmm_ivf.read_index(path)
    trace.at("search(after read)")
    D, I = index.search(q, 5, nprobe=index.nlist)
    same = index.ntotal == int(ref["ntotal"]) and np.array_equal(D, ref["D"]) and np.array_equal(I, ref["I"])
    if not same:
        check("resigned" in how, f"{how}: a damaged file loaded as a different index")
    check_index_consistent(index, q, 5)
    trace.at("add(after read)")
    n = index.ntotal
    index.add(q)
    check(index.ntotal == n + len(q), "add after read: ids reused")


# ---------------------------------------------------------------------------------------- data files
def data_damage(rng, suffix, blob: bytes) -> tuple[str, bytes]:
    data = bytearray(blob)
    how = pick(rng, ["truncate", "flip", "overwrite", "append", "header"])
    if how != "header":
        return byte_damage_plain(rng, how, data)
    if suffix in (".fvecs", ".ivecs", ".bvecs"):
        record = 4 + 4 * (1 if suffix == ".bvecs" else 4)
        row = int(rng.integers(0, max(1, len(data) // record)))
        value = int(pick(rng, [0, -1, 3, 5, 2**31 - 1, 1000]))
        data[row * record:row * record + 4] = np.int32(value).tobytes()
    elif suffix in (".fbin", ".u8bin"):
        at = int(pick(rng, [0, 4]))
        data[at:at + 4] = np.uint32(pick(rng, [0, 1, 19, 21, 2**32 - 1, 5])).tobytes()
    elif suffix == ".npy":
        text = data[:128].decode("latin1")
        old, new = pick(rng, [("(20, 4)", "(21, 4)"), ("(20, 4)", "(19, 4)"), ("(20, 4)", "(80,)"),
                              ("(20, 4)", "(20, 4, 1)"), ("<f4", "<f8"), ("<f4", "|O"), ("<f4", "<c8"),
                              ("False", "True"), ("(20, 4)", "(-20, 4)"), ("<f4", ">f4")])
        text = text.replace(old, new.ljust(len(old)))
        data = bytearray(text.encode("latin1")[:128]) + data[128:]
    else:  # HDF5: a byte of the superblock or of an object header
        pos = int(rng.integers(0, min(len(data), 2048)))
        data[pos] ^= 0xFF
    return "header", bytes(data)


def byte_damage_plain(rng, how, data, *, overwrite_max=None, append_max=40):
    """Truncate, flip bits, overwrite a run (16 bytes, or 1 to overwrite_max) or append (1 to append_max) bytes."""
    if how == "truncate":
        return how, bytes(data[: int(rng.integers(0, len(data)))])
    if how == "flip":
        for pos in rng.integers(0, len(data), size=int(rng.integers(1, 5))):
            data[pos] ^= 1 << int(rng.integers(8))
        return how, bytes(data)
    if how == "overwrite":
        start = int(rng.integers(0, len(data)))
        length = int(rng.integers(1, overwrite_max)) if overwrite_max else 16
        data[start:start + length] = rng.integers(0, 256, len(data[start:start + length]), dtype=np.uint8).tobytes()
        return how, bytes(data)
    return how, bytes(data) + rng.integers(0, 256, int(rng.integers(1, append_max)), dtype=np.uint8).tobytes()


_RECORD = {".fvecs": (4, 4), ".ivecs": (4, 4), ".bvecs": (4, 1)}
_BIN = {".fbin": 4, ".u8bin": 1}


def case_data_file(rng, trace, ctx, family):
    suffix = {"hdf5": ".hdf5", "ann_hdf5": "ann"}.get(family, "." + family)
    base = ctx["base"]["data"][suffix]
    how, blob = data_damage(rng, suffix if suffix != "ann" else ".hdf5", Path(base).read_bytes())
    path = ctx["tmp"] / f"damaged_{os.getpid()}{Path(base).suffix}"
    path.write_bytes(blob)
    trace.at(f"read[{family}:{how}]")
    if family == "ann_hdf5":
        f = fds.read_ann_hdf5(path, lazy=rng.random() < 0.5)
        train, test = np.asarray(f.train), np.asarray(f.test)
        neighbors = np.asarray(f.neighbors)
        check(train.ndim == 2 and test.shape[1] == train.shape[1], "ann file: train / test shapes")
        check(((neighbors >= 0) & (neighbors < len(train))).all(), "ann file: neighbour ids outside train")
        x = train
    else:
        x = np.asarray(fds.read_vectors(path))
        size = len(blob)
        check(x.ndim == 2, f"read gave shape {x.shape}")
        if suffix in _RECORD:
            d = x.shape[1]
            check(size == x.shape[0] * (4 + d * _RECORD[suffix][1]), f"{size} bytes read as {x.shape}")
        elif suffix in _BIN:
            check(size == 8 + x.size * _BIN[suffix], f"{size} bytes read as {x.shape}")
        elif suffix == ".npy":
            header = 128 if blob[6:7] == b"\x01" else None
            if header is not None:
                check(size == header + x.nbytes, f"{size} bytes read as {x.dtype}{x.shape}")
    trace.at("fit(read rows)")
    g = GaussianMixture(min(2, max(1, len(x))), max_iter=2, random_state=0, device="cpu").fit(x)
    check_fitted(g, g.n_components, x.shape[1], 2)


# ---------------------------------------------------------------------------------------- the fork server
CASES = {"gmm": case_gmm, "gmm_misuse": case_gmm_misuse, "index": case_index, "index_misuse": case_index_misuse,
         "gmm_file": case_gmm_file, "index_file": case_index_file,
         **{f: (lambda rng, trace, ctx, f=f: case_data_file(rng, trace, ctx, f)) for f in DATA_FAMILIES}}


def run_case(family, seed, ctx) -> dict:
    """Run one case in this process; the outcome as a dict."""
    trace = Trace()
    result = {"family": family, "seed": seed}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            CASES[family](np.random.default_rng(seed), trace, ctx)
        result["outcome"] = "ok"
    except Garbage as err:
        result |= {"outcome": "garbage", "error": str(err)[:500]}
    except (ValueError, TypeError) as err:
        frame = traceback.extract_tb(err.__traceback__)[-1]
        own = frame.filename.startswith(_PACKAGE_DIRS) or err.__cause__ is not None
        result |= {"outcome": "clean_error", "error": f"{type(err).__name__}: {str(err)[:300]}",
                   "raised_in": "package" if own else f"{frame.filename}:{frame.lineno}"}
    except BaseException as err:  # noqa: BLE001 - every other exception is the finding
        frame = traceback.extract_tb(err.__traceback__)[-1]
        result |= {"outcome": "wrong_exception", "error": f"{type(err).__name__}: {str(err)[:300]}",
                   "raised_in": f"{frame.filename}:{frame.lineno}"}
    result["stage"], result["visited"] = trace.stage, sorted(set(trace.visited))
    return result


def _child(family, seed, ctx, fd, err_path):
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        err = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(err, 2)
        limit = _address_space() + MEMORY_LIMIT_BYTES
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        result = run_case(family, seed, ctx)
        os.write(fd, json.dumps(result, default=str).encode())
    finally:
        os._exit(0)


def _address_space() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def fork_run(cases, ctx, *, jobs, timeout, desc):
    """Run every (family, seed) in its own forked child, ``jobs`` at a time; outcomes in order."""
    results = [None] * len(cases)
    pending = list(enumerate(cases))[::-1]
    running = {}  # fd -> (index, pid, start, chunks, err_path)
    bar = tqdm(total=len(cases), desc=desc, unit="case")
    while pending or running:
        while pending and len(running) < jobs:
            i, (family, seed) = pending.pop()
            r, w = os.pipe()
            err_path = str(ctx["tmp"] / f"stderr_{i}")
            pid = os.fork()
            if pid == 0:
                os.close(r)
                _child(family, seed, ctx, w, err_path)
            os.close(w)
            running[r] = (i, pid, time.monotonic(), [], err_path)
        ready, _, _ = select.select(list(running), [], [], 0.05)
        now = time.monotonic()
        for fd in list(running):
            i, pid, start, chunks, err_path = running[fd]
            family, seed = cases[i]
            if fd in ready:
                chunk = os.read(fd, 1 << 16)
                if chunk:
                    chunks.append(chunk)
                    continue
                os.close(fd)
                _, status = os.waitpid(pid, 0)
                del running[fd]
                results[i] = _finished(family, seed, b"".join(chunks), status, err_path)
                bar.update()
            elif now - start > timeout:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                os.close(fd)
                del running[fd]
                results[i] = {"family": family, "seed": seed, "outcome": "hang", "stage": "?",
                              "error": f"killed after {timeout} s"}
                bar.update()
    bar.close()
    return results


def _finished(family, seed, raw, status, err_path):
    tail = ""
    try:
        tail = Path(err_path).read_text(errors="replace")[-400:]
        os.unlink(err_path)
    except OSError:
        pass
    if os.WIFSIGNALED(status):
        name = signal.Signals(os.WTERMSIG(status)).name
        return {"family": family, "seed": seed, "outcome": "crash", "stage": "?", "error": f"{name}: {tail}"}
    try:
        return json.loads(raw)
    except ValueError:
        return {"family": family, "seed": seed, "outcome": "crash", "stage": "?",
                "error": f"exit status {os.WEXITSTATUS(status)} without a result: {tail}"}


def make_cases(n, families, first_seed):
    return [(families[i % len(families)], first_seed + i) for i in range(n)]


def summarize(results) -> dict:
    by_family = defaultdict(Counter)
    by_stage = defaultdict(Counter)
    calls = Counter()
    outside = Counter()
    for r in results:
        by_family[r["family"]][r["outcome"]] += 1
        by_stage[r.get("stage", "?")][r["outcome"]] += 1
        calls.update(r.get("visited", []))
        if r.get("raised_in", "package") != "package" and r["outcome"] == "clean_error":
            outside[r["raised_in"]] += 1
    return {"by_family": {f: dict(c) for f, c in sorted(by_family.items())},
            "by_stage": {s: dict(c) for s, c in sorted(by_stage.items())},
            "calls": dict(sorted(calls.items())), "clean_errors_raised_outside": dict(outside.most_common())}


def refusals(results) -> dict:
    """Each distinct refusal (ValueError / TypeError text with numbers, paths and addresses masked) by the
    stage that raised it: count and one case to replay, so that a reviewer can tell every refusal of
    valid input (a bug the outcome counts cannot see) from a refusal of bad input."""
    found = defaultdict(dict)
    for r in results:
        if r["outcome"] != "clean_error":
            continue
        text = re.sub(r"\S*/\S+|0x[0-9a-f]+|-?\d[\d.,e+-]*", "#", r.get("error", ""))[:160]
        seen = found[r.get("stage", "?")].setdefault(text, {"count": 0, "replay": f"{r['family']}:{r['seed']}"})
        seen["count"] += 1
    return {stage: dict(sorted(texts.items(), key=lambda t: -t[1]["count"])) for stage, texts in sorted(found.items())}


def table(groups: dict) -> str:
    head = "| group | cases | " + " | ".join(o.replace("_", " ") for o in OUTCOMES) + " |"
    lines = [head, "|" + "---|" * (len(OUTCOMES) + 2)]
    for name, results in groups.items():
        counts = Counter(r["outcome"] for r in results)
        lines.append(f"| {name} | {len(results)} | " + " | ".join(str(counts[o]) for o in OUTCOMES) + " |")
    return "\n".join(lines)


def stage_table(results) -> str:
    by_stage = summarize(results)["by_stage"]
    lines = ["| entry point (where the case ended) | " + " | ".join(o.replace("_", " ") for o in OUTCOMES) + " |",
             "|" + "---|" * (len(OUTCOMES) + 1)]
    for stage, counts in by_stage.items():
        lines.append(f"| {stage} | " + " | ".join(str(counts.get(o, 0)) for o in OUTCOMES) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--inputs", type=int, default=10000, help="generated-input cases")
    parser.add_argument("--files", type=int, default=1000, help="damaged GaussianMixture / index files")
    parser.add_argument("--data-files", type=int, default=1000, help="damaged data files")
    parser.add_argument("--seed", type=int, default=0, help="first seed (cases use seed, seed + 1, ...)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="cases run at once")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds before a case counts as a hang")
    parser.add_argument("--replay", help="run one case in this process, e.g. gmm:123 (prints the traceback)")
    parser.add_argument("--out", help="JSON file to write")
    args = parser.parse_args(argv)
    # One thread per case: no OpenMP pool exists in the parent when it forks, and cases run side by side.
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="flashgmm-fuzz-"))
    try:
        ctx = {"tmp": tmp}
        needs_files = args.files or args.data_files or (args.replay and args.replay.split(":")[0] not in
                                                        ("gmm", "gmm_misuse", "index", "index_misuse"))
        if needs_files:
            ctx["base"] = _setup_in_child(tmp)
        if args.replay:
            family, seed = args.replay.split(":")
            trace = Trace()
            try:
                CASES[family](np.random.default_rng(int(seed)), trace, ctx)
                print(f"ok (visited {trace.visited})")
            except BaseException:  # noqa: BLE001 - the replay prints whatever the case raised
                print(f"stage {trace.stage}:")
                traceback.print_exc()
            return
        groups = {}
        for name, n, families, first in (("inputs", args.inputs, INPUT_FAMILIES, args.seed),
                                         ("files", args.files, FILE_FAMILIES, args.seed + 10**7),
                                         ("data files", args.data_files, DATA_FAMILIES, args.seed + 2 * 10**7)):
            if n:
                groups[name] = fork_run(make_cases(n, families, first), ctx, jobs=args.jobs, timeout=args.timeout,
                                        desc=name)
        everything = [r for rs in groups.values() for r in rs]
        print(table(groups))
        print()
        print(stage_table(everything))
        failures = [r for r in everything if r["outcome"] in ("wrong_exception", "garbage", "crash", "hang")]
        for r in failures[:40]:
            print(f"{r['outcome']:16s} {r['family']}:{r['seed']} at {r.get('stage')}: {r.get('error', '')[:240]}")
        if args.out:
            from .environment import environment
            report = {"args": vars(args), "environment": environment(torch.device("cpu")),
                      "groups": {name: {"cases": len(rs), **Counter(r["outcome"] for r in rs)}
                                 for name, rs in groups.items()},
                      "summary": summarize(everything),
                      "failures": failures[:200],
                      "refusals": refusals(everything),
                      "clean_errors_raised_outside_examples": [
                          r for r in everything if r.get("raised_in", "package") != "package"][:50]}
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=1, default=str))
        return 1 if failures else 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _setup_in_child(tmp: Path) -> dict:
    """Build the base files in a forked child, so the parent runs no FAISS / torch compute before forking."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                os.write(w, json.dumps(setup_files(tmp)).encode())
        except BaseException:  # noqa: BLE001 - the parent reports the missing result
            traceback.print_exc()
        finally:
            os._exit(0)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 1 << 16):
        chunks.append(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    if not chunks:
        raise RuntimeError("building the fuzzer's base files failed")
    return json.loads(b"".join(chunks))


if __name__ == "__main__":
    sys.exit(main())
