"""Accuracy of EM per kernel precision: 20 iterations from one start against a float64 run.

For each data set (raw-scale SIFT-like rows, integers 0..255; the same rows standardised per
feature), each covariance type and each kernel precision, GaussianMixture is fitted for
``--iterations`` EM iterations (tol=0) from the same weights, means and precisions, and so is
a float64 reference (``compute_dtype='float64'``: the torch path in float64 on the same device)
with the float32 runs' variance floor (``variance_floor``), so that both fit the same model and
only the arithmetic differs (without it, float64 lets components collapse onto single features
where float32 cannot follow).
Every fitted model is then scored on held-out rows in float64, so the comparison measures the
training only; the score in the model's own precision is reported too. The bar: mean held-out
log-likelihood within ``--tolerance`` (1e-4) relative of the float64 run.

``python -m flashgmm_ivf.eval.check_em_accuracy --out eval/results/check_em_accuracy.json`` on a
GPU. Without CUDA the float32 row is the torch path (no kernel precisions): a smoke test.
"""
from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch
from flashgmm_ivf.datasets import load_dataset
from flashgmm_ivf.eval.bench_estep import raw_scale_rows, starting_params, write_json
from flashgmm_ivf.eval.environment import environment

from flashgmm_ivf import GaussianMixture, kernels
from flashgmm_ivf._mstep import FLOAT32_RELATIVE_FLOOR

DATASETS = ("raw", "standardised")
# Real rows (opt-in: ``--datasets raw,standardised,sift``): the first n base rows of a registry
# set to train on, its test rows held out; D is the set's.
REAL_SETS = {"sift": "sift-photos-128"}


def make_data(kind, n, n_test, d, device, seed):
    """Train and held-out rows: raw-scale uint8 (0..255), those rows standardised per feature
    (float32), or real rows (``REAL_SETS``, as stored)."""
    if kind in REAL_SETS:
        data = load_dataset(REAL_SETS[kind])
        return tuple(torch.from_numpy(np.ascontiguousarray(rows[:m])).to(device)
                     for rows, m in ((data.base, n), (data.test, n_test)))
    gen = torch.Generator(device).manual_seed(seed)
    x = raw_scale_rows(n + n_test, d, 256, gen, device)
    if kind == "standardised":
        train = x[:n].double()
        x = ((x.double() - train.mean(0)) / train.std(0)).float()
    else:
        x = x.to(torch.uint8)
    return x[:n], x[n:]


def initial_params(x, k, covariance_type, seed):
    """The shared start, as GaussianMixture's weights_init / means_init / precisions_init."""
    gen = torch.Generator(x.device).manual_seed(seed)
    weights, means, var, shift = starting_params(x.float(), k, covariance_type, gen)
    return {"weights_init": weights.cpu().numpy(), "means_init": (means + shift).cpu().numpy(),
            "precisions_init": (1.0 / var).cpu().numpy()}


def fit(x, k, covariance_type, iterations, init, device, **options):
    gmm = GaussianMixture(k, covariance_type=covariance_type, max_iter=iterations, tol=0.0, device=device,
                          random_state=0, estep="dense", **init, **options)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning: tol=0 runs every iteration by design
        gmm.fit(x)
    if device == "cuda":
        torch.cuda.synchronize()
    return gmm, time.perf_counter() - start


def held_out(gmm, x_test):
    """(score in float64, score in the model's own arithmetic)."""
    own = gmm.score(x_test)
    precise = gmm.set_params(compute_dtype="float64").score(x_test)
    gmm.set_params(compute_dtype="float32")
    return precise, own


def check(kind, covariance_type, args, device, engines):
    x, x_test = make_data(kind, args.n, args.n_test, args.d, device, args.seed)
    init = initial_params(x, args.k, covariance_type, args.seed + 1)
    ref, ref_seconds = fit(x, args.k, covariance_type, args.iterations, init, device, compute_dtype="float64",
                           variance_floor=FLOAT32_RELATIVE_FLOOR)
    ref_score = ref.score(x_test)
    ref_bounds = np.array(ref.lower_bounds_)
    rows = [{"data": kind, "n_train": len(x), "covariance_type": covariance_type, "method": "float64 reference",
             "held_out_ll": ref_score, "train_lower_bound": ref.lower_bound_, "seconds": ref_seconds,
             "n_reseeded": ref.n_reseeded_}]
    for name, options in engines:
        gmm, seconds = fit(x, args.k, covariance_type, args.iterations, init, device, **options)
        precise, own = held_out(gmm, x_test)
        rel = abs(precise - ref_score) / abs(ref_score)
        bounds = np.array(gmm.lower_bounds_)
        rows.append({"data": kind, "n_train": len(x), "covariance_type": covariance_type, "method": name,
                     "held_out_ll": precise,
                     "held_out_ll_own_precision": own, "relative_difference": rel,
                     "relative_difference_own_precision": abs(own - ref_score) / abs(ref_score),
                     "train_lower_bound": gmm.lower_bound_,
                     "max_relative_difference_lower_bounds": float(np.max(np.abs(bounds - ref_bounds)
                                                                          / np.abs(ref_bounds))),
                     "max_abs_difference_means": float(np.abs(gmm.means_ - ref.means_).max()),
                     "n_reseeded": gmm.n_reseeded_, "seconds": seconds, "met": rel <= args.tolerance})
    return rows


def print_table(rows, tolerance):
    line = (f"{'data':13} {'cov':9} {'method':30} {'held-out ll':>14} {'rel. diff':>10} {'own prec.':>10} "
            f"{'max rel LB':>10} {'reseeded':>8} {'s':>7}  within {tolerance:.0e}")
    print(line)
    print("-" * len(line))
    for r in rows:
        rel = r.get("relative_difference")
        print(f"{r['data']:13} {r['covariance_type']:9} {r['method']:30} {r['held_out_ll']:14.8g} "
              + (f"{rel:10.1e} {r['relative_difference_own_precision']:10.1e} "
                 f"{r['max_relative_difference_lower_bounds']:10.1e} " if rel is not None else f"{'':32} ")
              + f"{r['n_reseeded']:8d} {r['seconds']:7.2f}  "
              + ("" if rel is None else "yes" if r["met"] else "NO"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="training rows")
    parser.add_argument("--n-test", type=int, default=100_000, help="held-out rows")
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--covariance-types", default="diag,spherical")
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--precisions", default=",".join(kernels.PRECISIONS))
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="eval/results/check_em_accuracy.json")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # Off CUDA the float32 path is the torch reference: the precisions do not apply.
    engines = [(f"ours ({p})", {"precision": p}) for p in args.precisions.split(",") if p] if device == "cuda" \
        else [("float32 (torch, CPU)", {})]
    rows = []
    for kind in args.datasets.split(","):
        for cov in args.covariance_types.split(","):
            part = check(kind, cov, args, device, engines)
            print_table(part, args.tolerance)
            rows += part
    print("\nall:")
    print_table(rows, args.tolerance)
    checked = [r for r in rows if "met" in r]
    print(f"\n{sum(r['met'] for r in checked)} of {len(checked)} runs within {args.tolerance:.0e} of float64")
    result = {"environment": environment(torch.device(device)), "arguments": vars(args), "rows": rows}
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
