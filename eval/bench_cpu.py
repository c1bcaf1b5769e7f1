"""CPU benchmark of record for one dense EM iteration: ours against scikit-learn, FAISS k-means as an anchor.

Grid: N in {20,000, 200,000} x K in {256, 1024} x D in {50, 128}, diag and spherical, plus full
covariances at N = 20,000, K = 256. D = 128 rows are sift-photos-128 (raw SIFT, integers 0..255),
D = 50 rows are glove-6B-50d scaled to unit norm (as an IVF index over that angular set trains
on them): the first N base rows, float32. Every method starts from the same parameters: FAISS
k-means means (10 iterations), weights and per-component variances of the hard assignment.

Columns, per cell:

* ``ours ms``: ``flashgmm_ivf.GaussianMixture(device='cpu')`` through its public ``fit``: one
  iteration from those parameters, then a warm-started fit of ``iterations`` more, timed whole
  (its validation pass over the rows included) / ``iterations``; the best of ``repeats``;
* ``sklearn ms``: ``sklearn.mixture.GaussianMixture._e_step`` + ``_m_step`` on the same rows
  and parameters (its float64 arithmetic), the best of ``repeats``;
* ``faiss ms``: one iteration of ``faiss.Kmeans`` over all N rows (no subsampling): (train of
  1 + ``iterations`` - train of 1) / ``iterations``, each the best of ``repeats``, the cost of an
  IVF index's usual training step;
* accuracy: our float32 arithmetic against our float64 arithmetic (same model, same variance
  floor) after one iteration from the same start: relative error of the means, covariances
  and weights (||a - b|| / ||b||) and of the lower bound, and of the mean log-likelihood of the
  set's held-out test rows under the float64 fit (``score`` in float32 against float64).

The machine's load average is recorded before and after every cell: on a shared machine, cells
whose load exceeded the core count are worth re-running (``--cells``).

Run: ``nice -n 10 python -m flashgmm_ivf.eval.bench_cpu --out eval/results/bench_cpu.json``
"""
from __future__ import annotations

import argparse
import json
import os
import time
import warnings

import faiss
import numpy as np
import sklearn
import threadpoolctl
import torch
from sklearn.mixture import GaussianMixture as SklearnMixture
from tqdm.auto import tqdm

from ..datasets import load_dataset
from ..mixture import GaussianMixture
from .environment import environment

SETS = {128: "sift-photos-128", 50: "glove-6B-50d"}
GRID = [(n, k, d, cov) for d in (128, 50) for n in (20_000, 200_000) for k in (256, 1024)
        for cov in ("diag", "spherical")] + [(20_000, 256, 128, "full"), (20_000, 256, 50, "full")]
KMEANS_ITERATIONS = 10
# Variances start at least this share of the data's (per feature): a component k-means left
# with one row, or a constant feature, would otherwise start at reg_covar.
START_VARIANCE_FLOOR = 1e-3
# Both arithmetics get the float32 default's floor, so that they fit the same model.
VARIANCE_FLOOR = 1e-4
# reg_covar of both libraries: scikit-learn's default, except for full covariances, which on raw
# SIFT rows need more to stay positive definite (this share of the data's mean variance).
FULL_REG_COVAR = 1e-3
# Full covariances cost O(N K D^2): one timed repeat.
FULL_REPEATS = 1
CLOCK = "wall"  # or "cpu" (--clock)


def load_rows(d, n, data_dir=None):
    """(first n base rows, test rows), float32: the grid's data at dimension d."""
    data = load_dataset(SETS[d], data_dir=data_dir).to_l2()
    return np.ascontiguousarray(data.base[:n], dtype=np.float32), np.asarray(data.test, dtype=np.float32)


def kmeans(x, k, seed=0):
    """(means float64 (k, D), labels (n,)): FAISS k-means over all rows and its assignment."""
    km = faiss.Kmeans(x.shape[1], k, niter=KMEANS_ITERATIONS, seed=seed, max_points_per_centroid=x.shape[0])
    km.train(x)
    return km.centroids.astype(np.float64), km.index.search(x, 1)[1][:, 0]


def starting_parameters(x, k, covariance_type, clustering=None):
    """(weights, means, covariances) in float64: FAISS k-means and its hard assignment
    (``clustering``: a ``kmeans(x, k)`` result to reuse)."""
    d = x.shape[1]
    means, labels = clustering or kmeans(x, k)
    x64 = x.astype(np.float64)
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    weights = (counts + 1) / (counts + 1).sum()
    diff = x64 - means[labels]
    floor = START_VARIANCE_FLOOR * x64.var(0)
    if covariance_type == "full":
        cov = np.zeros((k, d, d))
        np.add.at(cov, labels, diff[:, :, None] * diff[:, None, :])
        cov = cov / np.maximum(counts, 1)[:, None, None] + np.diag(floor)
        return weights, means, cov
    var = np.zeros((k, d))
    np.add.at(var, labels, diff * diff)
    var = np.maximum(var / np.maximum(counts, 1)[:, None], floor)
    return weights, means, var if covariance_type == "diag" else var.mean(1)


def precisions(cov, covariance_type):
    return np.linalg.inv(cov) if covariance_type == "full" else 1.0 / cov


def reg_covar(x, covariance_type):
    return FULL_REG_COVAR * float(x.var(0).mean()) if covariance_type == "full" else 1e-6


def _ours(x, start, covariance_type, max_iter, compute_dtype="float32"):
    weights, means, cov = start
    gmm = GaussianMixture(len(weights), covariance_type=covariance_type, max_iter=max_iter, tol=0.0,
                          reg_covar=reg_covar(x, covariance_type),
                          weights_init=weights, means_init=means, precisions_init=precisions(cov, covariance_type),
                          device="cpu", compute_dtype=compute_dtype, variance_floor=VARIANCE_FLOOR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tol=0 never converges: that is the point
        started = time.perf_counter()
        gmm.fit(x)
    return gmm, time.perf_counter() - started


def _clock():
    return time.process_time() if CLOCK == "cpu" else time.perf_counter()


def time_ours(x, start, covariance_type, iterations, repeats):
    """Best seconds per EM iteration of our public fit: a fit of one iteration from ``start``,
    then a timed warm-started fit of ``iterations`` more (its validation pass included)."""
    best = float("inf")
    for _ in range(repeats):
        gmm = _ours(x, start, covariance_type, 1)[0]
        gmm.set_params(warm_start=True, max_iter=iterations)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            started = _clock()
            gmm.fit(x)
        best = min(best, (_clock() - started) / iterations)
    return best


def time_sklearn(x, start, covariance_type, repeats):
    """Best seconds of scikit-learn's E-step + M-step on the same parameters."""
    from sklearn.mixture._gaussian_mixture import _compute_precision_cholesky
    weights, means, cov = start
    gmm = SklearnMixture(len(weights), covariance_type=covariance_type, reg_covar=reg_covar(x, covariance_type))
    gmm.weights_, gmm.means_, gmm.covariances_ = weights, means, cov
    gmm.precisions_cholesky_ = _compute_precision_cholesky(cov, covariance_type)
    best = float("inf")
    for _ in range(repeats):
        started = _clock()
        _, log_resp = gmm._e_step(x)
        gmm._m_step(x, log_resp)
        best = min(best, _clock() - started)
        gmm.weights_, gmm.means_, gmm.covariances_ = weights, means, cov
        gmm.precisions_cholesky_ = _compute_precision_cholesky(cov, covariance_type)
    return best


def time_faiss_kmeans(x, k, iterations, repeats):
    """Seconds per iteration of FAISS k-means over all rows (the first iteration left out): the
    best of ``repeats`` trainings of 1 and of 1 + ``iterations`` iterations, interleaved, so one
    slow training on a shared machine cannot make the difference meaningless (or negative)."""
    best = {1: float("inf"), 1 + iterations: float("inf")}
    for _ in range(repeats):
        for niter in best:
            km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=1, max_points_per_centroid=x.shape[0])
            started = _clock()
            km.train(x)
            best[niter] = min(best[niter], _clock() - started)
    return (best[1 + iterations] - best[1]) / iterations


def relative(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def accuracy(x, test, start, covariance_type):
    """Our float32 arithmetic against float64 after one iteration from ``start``."""
    f32 = _ours(x, start, covariance_type, 1)[0]
    f64 = _ours(x, start, covariance_type, 1, compute_dtype="float64")[0]
    held_out64 = f64.score(test)
    held_out32 = f64.set_params(compute_dtype="float32").score(test)
    return {"means": relative(f32.means_, f64.means_), "covariances": relative(f32.covariances_, f64.covariances_),
            "weights": relative(f32.weights_, f64.weights_),
            "lower_bound": abs(f32.lower_bound_ - f64.lower_bound_) / abs(f64.lower_bound_),
            "held_out_log_likelihood": abs(held_out32 - held_out64) / abs(held_out64)}


def run_cell(n, k, d, covariance_type, iterations, repeats, cache, data_dir=None):
    if (d, n) not in cache:
        cache[(d, n)] = load_rows(d, n, data_dir)
    x, test = cache[(d, n)]
    if (d, n, k) not in cache:
        cache[(d, n, k)] = kmeans(x, k)
    load_before = os.getloadavg()
    repeats = FULL_REPEATS if covariance_type == "full" else repeats
    start = starting_parameters(x, k, covariance_type, cache[(d, n, k)])
    ours = time_ours(x, start, covariance_type, iterations, repeats)
    theirs = time_sklearn(x, start, covariance_type, repeats)
    kmeans_s = time_faiss_kmeans(x, k, iterations, repeats)
    row = {"n": n, "k": k, "d": d, "data": SETS[d], "covariance_type": covariance_type,
           "ours_ms": 1e3 * ours, "sklearn_ms": 1e3 * theirs, "speedup": theirs / ours,
           "faiss_kmeans_ms": 1e3 * kmeans_s, "ours_over_kmeans": ours / kmeans_s,
           "relative_error": accuracy(x, test, start, covariance_type),
           "load_average_before": list(load_before), "load_average_after": list(os.getloadavg())}
    return row


def print_table(rows):
    head = (f"{'N':>7} {'K':>5} {'D':>4} {'cov':9} {'ours ms':>9} {'sklearn ms':>10} {'speedup':>7} "
            f"{'kmeans ms':>9} {'means':>8} {'covs':>8} {'held-out':>8} {'load':>5}")
    print(head)
    for r in rows:
        e = r["relative_error"]
        print(f"{r['n']:>7} {r['k']:>5} {r['d']:>4} {r['covariance_type']:9} {r['ours_ms']:9.1f} "
              f"{r['sklearn_ms']:10.1f} {r['speedup']:7.2f} {r['faiss_kmeans_ms']:9.1f} {e['means']:8.1e} "
              f"{e['covariances']:8.1e} {e['held_out_log_likelihood']:8.1e} {max(r['load_average_after'][0], r['load_average_before'][0]):5.1f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", nargs="*", help="N:K:D:cov cells to run instead of the grid, e.g. 200000:1024:128:diag")
    parser.add_argument("--iterations", type=int, default=3, help="EM iterations per timed fit")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="threads of torch, FAISS and numpy's BLAS (default: theirs)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: elapsed seconds; cpu: this process's CPU seconds (with --threads 1, "
                             "a measure of work that a busy machine distorts less)")
    parser.add_argument("--data-dir", help="searched for the data sets before the default folders")
    parser.add_argument("--out", default="eval/results/bench_cpu.json")
    args = parser.parse_args(argv)
    global CLOCK
    CLOCK = args.clock
    if args.threads:
        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
        threadpoolctl.threadpool_limits(args.threads)
    cells = GRID if not args.cells else [(int(n), int(k), int(d), cov) for n, k, d, cov in
                                         (c.split(":") for c in args.cells)]
    env = environment(torch.device("cpu")) | {
        "sklearn": sklearn.__version__, "cpu_affinity": sorted(os.sched_getaffinity(0)),
        "blas_pools": [{key: pool[key] for key in ("user_api", "internal_api", "num_threads")}
                       for pool in threadpoolctl.threadpool_info()]}
    rows, cache = [], {}
    for cell in tqdm(cells, desc="cells", unit="cell"):
        rows.append(run_cell(*cell, args.iterations, args.repeats, cache, args.data_dir))
        with open(args.out, "w") as f:
            json.dump({"environment": env, "arguments": vars(args), "rows": rows}, f, indent=1)
    print_table(rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
