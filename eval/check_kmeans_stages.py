"""Staged k-means (``partition.fit_kmeans``) against FAISS's k-means on all rows: time and held-out cost.

On one data set: the fitting rows are 256 x nlist random base rows (all but 50,000 where the set
is smaller), the held-out rows 50,000 others. For each method, the seconds of k-means and the mean
squared distance of a held-out row to its nearest centroid (float64 mean): ``fit_kmeans`` at the
given iteration counts (stages on nested samples), ``faiss.Kmeans`` on all fitting rows at
FAISS's IVF default (10) and ``faiss.Kmeans``' default (25). Prints a table and writes JSON.

Run: ``python -m flashgmm_ivf.eval.check_kmeans_stages --dataset sift-photos-128 --nlist 2048
--out eval/results/check_kmeans_stages_sift.json``
"""
from __future__ import annotations

import argparse
import json
import time

import faiss
import numpy as np

from flashgmm_ivf.datasets import load_dataset
from flashgmm_ivf.ivf.partition import POINTS_PER_LIST, fit_kmeans

from .environment import environment

HELD_OUT = 50_000


def held_out_cost(centroids: np.ndarray, held: np.ndarray) -> float:
    """Mean squared L2 distance of the held-out rows to their nearest centroid."""
    flat = faiss.IndexFlatL2(centroids.shape[1])
    flat.add(np.ascontiguousarray(centroids, dtype=np.float32))
    return float(flat.search(held, 1)[0].astype(np.float64).mean())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="sift-photos-128")
    parser.add_argument("--nlist", type=int, default=2048)
    parser.add_argument("--staged", default="20,32", help="iteration counts of fit_kmeans, comma-separated")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", default="eval/results/check_kmeans_stages.json")
    args = parser.parse_args(argv)
    base = load_dataset(args.dataset).base
    order = np.random.default_rng(0).permutation(len(base))
    m = min(POINTS_PER_LIST * args.nlist, len(base) - HELD_OUT)
    fit = np.ascontiguousarray(base[np.sort(order[:m])], dtype=np.float32)
    held = np.ascontiguousarray(base[np.sort(order[m:m + HELD_OUT])], dtype=np.float32)

    def faiss_kmeans(niter):
        km = faiss.Kmeans(fit.shape[1], args.nlist, niter=niter, seed=args.seed, max_points_per_centroid=len(fit))
        km.train(fit)
        return km.centroids

    methods = [(f"fit_kmeans, {it} iterations in stages", lambda it=int(it): fit_kmeans(fit, args.nlist, it, args.seed))
               for it in args.staged.split(",")]
    methods += [(f"faiss.Kmeans, {it} iterations on all rows", lambda it=it: faiss_kmeans(it)) for it in (10, 25)]
    rows = []
    for name, run in methods:
        start = time.perf_counter()
        centroids = run()
        seconds = time.perf_counter() - start
        rows.append({"method": name, "seconds": seconds, "held_out_cost": held_out_cost(centroids, held)})
        print(f"{name:45s} {seconds:7.1f} s  held-out cost {rows[-1]['held_out_cost']:,.1f}", flush=True)
    with open(args.out, "w") as f:
        json.dump({"environment": environment(), "arguments": vars(args), "fit_rows": len(fit),
                   "held_out_rows": len(held), "rows": rows}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
