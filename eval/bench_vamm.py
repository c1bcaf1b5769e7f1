"""Our truncated E-step against vamm (arXiv 2501.12299), same data, same start, same process.

vamm (GitHub variational-sublinear-clustering/vamm) is truncated variational EM in C++
(Eigen, OpenMP): every row keeps C' components, searched among the G neighbours of its
current ones in a component graph (by KL divergence) plus E random components. It is
fetched and built outside this repository and never committed::

    git --git-dir=<mirror> archive HEAD | tar -x -C /tmp/vamm          # submodules empty:
    ln -s /usr/include/eigen3 /tmp/vamm/vamm/extern/eigen              # Eigen 3.4 (apt libeigen3-dev)
    # each vamm/extern/boost/<lib>/include -> a folder holding /usr/include/boost (apt libboost1.81-dev)
    pip install --target /tmp/vamm-deps pybind11 toml pandas           # build + import deps only
    cd /tmp/vamm && PYTHONPATH=/tmp/vamm-deps python setup.py build_ext --inplace

For each K, both fit a diagonal GMM to the same rows of ``sift-photos-128`` from the same
k-means start (``eval.bench_large_k.starting_point``): weights, means and variances given
to both. Settings that map: C' (``n_candidates`` / ``C_prime``), G (``n_neighbors`` / ``G``),
threads (torch + FAISS / OpenMP), EM iterations. vamm's E = 1 random extra component per row
has no counterpart in ours. Variance regularisation: ours adds ``reg_covar`` to every
variance (scikit-learn), vamm floors variances at ``reg_covar``; the same value is given to
both (``--reg-covar`` replaces the start's 0.1 x mean feature variance, the GMM-IVF default,
by a small value for both, so that the two rules give nearly the same model). vamm first runs ``--vamm-warmup`` E-steps without M-step (its recommended warm-up:
its candidate sets start random), timed apart; ours finds its first candidates by nearest
means inside iteration 1.

Reported per K: seconds per EM iteration (E + M, median of iterations 2..), the training
objective per sample, and the held-out log-likelihood per sample on the 10,000 test rows,
computed for both models by the same exact float64 code (all K components).

Run: ``PYTHONPATH=/tmp/vamm-deps python -m flashgmm_ivf.eval.bench_vamm --vamm-dir /tmp/vamm
--out eval/results/bench_vamm.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..kernels import natural_params, reference
from .bench_large_k import DATA, fit, per_iteration, starting_point
from .environment import environment


def heldout_loglik(weights, means, variances, test) -> float:
    """Mean exact log-likelihood per test row (float64, all components; zero weights allowed)."""
    x = torch.from_numpy(np.asarray(test, dtype=np.float64))
    shift = x.mean(0)
    params = natural_params(torch.as_tensor(weights, dtype=torch.float64),
                            torch.as_tensor(means, dtype=torch.float64) - shift,
                            torch.as_tensor(variances, dtype=torch.float64))
    return float(reference.estep(x, params, shift).log_norm.mean())


def vamm_threads(n):
    """Set vamm's OpenMP threads and return what it reports. Its runtime (the system libgomp)
    may already have started with the default count (measured: 2 here although
    OMP_NUM_THREADS was 1 at import), so the count is set through its own binding."""
    import cpputils  # vamm's utility module

    cpputils.omp.set_num_threads(n)
    return int(cpputils.omp.get_max_threads())


def run_vamm(x64, k, start, args):
    from vamm import Gaussian

    weights, means, precisions, reg_covar = start
    model = Gaussian(C=k, D=x64.shape[1], covariance_type="diagonal", reg_covar=reg_covar,
                     init_prior=np.ascontiguousarray(weights, dtype=np.float64),
                     init_means=np.ascontiguousarray(means, dtype=np.float64),
                     init_variance=np.ascontiguousarray(1.0 / precisions, dtype=np.float64))
    began = time.perf_counter()
    # eps=0: no early stop, exactly the iterations asked for.
    _, log = model.fit(x64, limit=[args.vamm_warmup, args.iters], eps=0.0, C_prime=args.n_candidates,
                       G=args.n_neighbors, E=1, rng=0)
    wall = time.perf_counter() - began
    em = log[log["M_step"]]
    seconds = [float(s) for s in em["time"]]
    return {"iterations": len(seconds), "warmup_estep_seconds": [round(float(s), 3) for s in log[~log["M_step"]]["time"]],
            "seconds_per_iteration": round(statistics.median(seconds[1:] or seconds), 3),
            "seconds_each": [round(s, 3) for s in seconds], "fit_wall_seconds": round(wall, 1),
            # vamm's objective is minus the truncated free energy per sample.
            "free_energy_per_sample": [-float(o) for o in em["objective"]],
            "active_components": int(log["active"].iloc[-1]),
            "heldout_loglik_per_sample": heldout_loglik(model.prior, model.means, model.variance, args.test)}


def run_ours(x, k, start, args):
    gmm = fit(x, k, start, "truncated", args.iters)
    return {"iterations": len(gmm.seconds_), "seconds_per_iteration": per_iteration(gmm),
            "seconds_each": [round(s, 3) for s in gmm.seconds_], "free_energy_per_sample": gmm.lower_bounds_,
            "heldout_loglik_per_sample": heldout_loglik(gmm.weights_, gmm.means_, gmm.covariances_, args.test)}


def compare(x, x64, k, start, args):
    """Both fits ``--repeats`` times, in alternating order so that a change of load on the
    shared machine hits both; seconds per iteration = the smallest of the repeats' medians
    (the usual estimate of a noisy timing), everything else from the first repeat."""
    runs = {"ours": lambda: run_ours(x, k, start, args), "vamm": lambda: run_vamm(x64, k, start, args)}
    out = {}
    for r in range(args.repeats):
        for name in (("ours", "vamm") if r % 2 == 0 else ("vamm", "ours")):
            got = runs[name]()
            first = out.setdefault(name, {**got, "seconds_per_iteration_repeats": []})
            first["seconds_per_iteration_repeats"].append(got["seconds_per_iteration"])
            first["seconds_per_iteration"] = min(first["seconds_per_iteration_repeats"])
    return out


def table(rows, n, settings):
    lines = [("| K | ours s/iter | vamm s/iter | ours faster by | held-out ll/sample: ours | vamm | "
              "final free energy/sample: ours | vamm | vamm components left |"),
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        o, v = r["ours"], r["vamm"]
        lines.append(f"| {r['K']:,} | {o['seconds_per_iteration']:.2f} | {v['seconds_per_iteration']:.2f} | "
                     f"{v['seconds_per_iteration'] / o['seconds_per_iteration']:.1f}x | "
                     f"{o['heldout_loglik_per_sample']:.3f} | {v['heldout_loglik_per_sample']:.3f} | "
                     f"{o['free_energy_per_sample'][-1]:.3f} | {v['free_energy_per_sample'][-1]:.3f} | "
                     f"{v['active_components']:,} |")
    head = (f"sift-photos-128, first {n:,} base rows, 10,000 held-out rows; diagonal GMM, same k-means start; "
            f"C' = {settings['n_candidates']}, G = {settings['n_neighbors']}, {settings['iterations']} EM "
            f"iterations each (vamm: {settings['vamm_warmup_esteps']} warm-up E-steps first, E = 1), reg_covar "
            f"{settings['reg_covar']}, {settings['threads']} thread each (vamm's OpenMP reports "
            f"{settings['vamm_openmp_threads_reported']}); seconds per iteration = median of iterations 2.. "
            f"(the smallest of {settings.get('repeats', 1)} alternating repeats); "
            "held-out log-likelihood exact, float64, same code for both")
    return head + "\n\n" + "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vamm-dir", type=Path, required=True, help="the built vamm tree (put on sys.path)")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--rows", type=int, default=100_000, help="first ROWS base rows")
    ap.add_argument("--ks", default="1024,4096,16384")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--vamm-warmup", type=int, default=2)
    ap.add_argument("--n-candidates", type=int, default=8)
    ap.add_argument("--n-neighbors", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1, help="fits of each, in alternating order")
    ap.add_argument("--reg-covar", type=float, default=None,
                    help="variance regularisation of both fits (default: the start's, 0.1 x mean feature variance)")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "flashgmm-ivf" / "bench_large_k")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import faiss
    faiss.omp_set_num_threads(args.threads)
    sys.path.insert(0, str(args.vamm_dir))
    args.vamm_threads = vamm_threads(args.threads)
    x = np.ascontiguousarray(np.load(args.data / "base.npy", mmap_mode="r")[:args.rows])
    x64 = x.astype(np.float64)  # vamm is built with double precision (its default, recommended)
    args.test = np.load(args.data / "test.npy")
    began, load = time.perf_counter(), os.getloadavg()
    rows = []
    for k in (int(v) for v in args.ks.split(",")):
        start = starting_point(x, k, args.cache)
        if args.reg_covar is not None:
            start = (*start[:3], args.reg_covar)
        row = {"K": k, **compare(x, x64, k, start, args)}
        rows.append(row)
        print(f"K={k}: ours {row['ours']['seconds_per_iteration']} s/iter, held-out "
              f"{row['ours']['heldout_loglik_per_sample']:.3f}; vamm {row['vamm']['seconds_per_iteration']} s/iter, "
              f"held-out {row['vamm']['heldout_loglik_per_sample']:.3f}", flush=True)
        doc = {"benchmark": "bench_vamm", "data": {"set": args.data.name, "rows": len(x), "test_rows": len(args.test)},
               "settings": {"iterations": args.iters, "vamm_warmup_esteps": args.vamm_warmup,
                            "n_candidates": args.n_candidates, "n_neighbors": args.n_neighbors,
                            "mapping": "n_candidates = vamm C_prime, n_neighbors = vamm G",
                            "reg_covar": args.reg_covar or "start's (0.1 x mean feature variance)",
                            "vamm_E": 1, "vamm_sim_measure": "KL (default)", "threads": args.threads,
                            "repeats": args.repeats,
                            "vamm_openmp_threads_reported": args.vamm_threads,
                            "ours_compute_dtype": "float32", "vamm_precision": "double (its build default)",
                            "torch": torch.__version__},
               "environment": environment(torch.device("cpu")),
               "machine": {"cores": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                           "loadavg_start": load, "loadavg_end": os.getloadavg(),
                           "note": "shared 2-core machine, other jobs running: both timed in the same process, "
                                   "one after the other, with the same thread count"},
               "wall_seconds": round(time.perf_counter() - began, 1), "rows": rows}
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(doc, indent=1) + "\n")
            args.out.with_suffix(".md").write_text(table(rows, len(x), doc["settings"]) + "\n")
    print(table(rows, len(x), doc["settings"]))


if __name__ == "__main__":
    main()
