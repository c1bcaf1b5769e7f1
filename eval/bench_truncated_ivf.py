"""IVF effect of the truncated E-step: recall@10 against distance computations per query.

On sift-photos-128 (500,000 base rows, 1,000 test queries) and for each nlist, three coarse
quantizers are swept over nprobe by the recall sweep's runner (:func:`.runner.sweep`: same
search, same cost accounting):

* ``kmeans-niter10``: FAISS k-means IVF (``IVF<nlist>,Flat``, 10 k-means iterations);
* ``gmm-truncated``: ``index_factory(d, "IVF<nlist>_GMM(diag,estep=truncated,...),Flat")``
  (C' = 8, G = 12);
* ``gmm-dense``: the same with ``estep=dense``.

Both GMMs use the index's training defaults with ``gmm_iter`` EM iterations and tol 0, at 1.0
copies (each row in its most probable list) and 1.5 copies (``copies=1.5``). A dense E-step at
nlist 16,384 costs ~6 minutes per iteration on 500K rows here, so GMMs may be trained on a
random subset of ``--train-rows`` rows (then the truncated GMM is trained both on that subset
and on all rows); the index always holds all base rows.

Run: ``python -m flashgmm_ivf.eval.bench_truncated_ivf --out eval/results``.
"""
from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path

import faiss
import numpy as np
import torch

from .methods import FaissIVF, GMMIndex
from .report import TARGETS, cost_at, front
from .runner import load_data, sweep

COPIES = (1.0, 1.5)


def quantizers(nlist, subset, gmm_iter, seed):
    """(label, rows trained on or None for all, copies, algorithm) of every quantizer at one nlist."""
    def gmm(estep, copies):
        # Blocks of ~256 MB of (rows, K) log-densities when the base is assigned.
        options = (f"diag,estep={estep},iter={gmm_iter},tol=0,seed={seed},device=cpu,"
                   f"chunk_size={max(1024, (1 << 26) // nlist)}" + ("" if copies == 1.0 else f",copies={copies}"))
        return GMMIndex(f"IVF{nlist}_GMM({options}),Flat", nlist, knob="nprobe")
    out = {"kmeans": [("kmeans-niter10", None, 1.0, FaissIVF(nlist, niter=10, seed=seed))]}
    if subset:
        out["truncated-subset"] = [(f"gmm-truncated ({subset // 1000}K rows)", subset, c, gmm("truncated", c))
                                   for c in COPIES]
    out["truncated"] = [("gmm-truncated", None, c, gmm("truncated", c)) for c in COPIES]
    label = f"gmm-dense ({subset // 1000}K rows)" if subset else "gmm-dense"
    out["dense"] = [(label, subset, c, gmm("dense", c)) for c in COPIES]
    return out


def run_nlist(data, nlist, args, rows, save):
    """Append the curves of every quantizer at one nlist to ``rows``; ``save()`` after each."""
    subset = args.train_rows.get(nlist)
    every = quantizers(nlist, subset, args.gmm_iter, args.seed)
    for key in args.quantizers:
        for name, train_rows, copies, method in every.get(key, []):
            train = data.base
            if train_rows and train_rows < len(data.base):
                pick = np.sort(np.random.default_rng(args.seed).choice(len(data.base), train_rows, replace=False))
                train = data.base[pick]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # ConvergenceWarning: a fixed number of EM iterations is the protocol
                method.build(train, data.base)
            curve = sweep(method, data.test, data.gt)
            row = {"nlist": nlist, "quantizer": name, "copies_target": copies,
                   "copies_per_vector": method.copies_per_vector(), "build_s": round(method.build_s, 1),
                   "train_rows": len(train), "params": method.params(), "curve": curve,
                   "cost_at": {str(t): cost_at(front(curve), t) for t in TARGETS}}
            rows.append(row)
            print(f"nlist {nlist} {name} copies {copies}: build {method.build_s:.0f} s, cost at "
                  f"{row['cost_at']}", flush=True)
            method.close()
            method.remove_files()
        save()


def markdown(rows, title):
    def cost(v):
        return f"{v:,.0f}" if v is not None else "n/r"

    lines = [title, "", "| nlist | quantizer | copies | " + " | ".join(f"dist. @ recall {t}" for t in TARGETS)
             + " | recall@10 at nprobe 16 | build s |", "| --- | --- | --- |" + " --- |" * (len(TARGETS) + 2)]
    for r in rows:
        at16 = next((p["recall_at_10"] for p in r["curve"] if p["nprobe"] == 16), None)
        lines.append(f"| {r['nlist']:,} | {r['quantizer']} | {r['copies_per_vector']:.2f} | "
                     + " | ".join(cost(r["cost_at"][str(t)]) for t in TARGETS)
                     + f" | {'' if at16 is None else f'{at16:.3f}'} | {r['build_s']:.0f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="sift-photos-128")
    ap.add_argument("--nlists", default="4096,16384")
    ap.add_argument("--train-rows", default="4096:100000,16384:50000",
                    help="nlist:rows pairs: GMMs at that nlist are (also) trained on a random subset of rows")
    ap.add_argument("--quantizers", default="kmeans,truncated-subset,truncated,dense",
                    help="which of kmeans, truncated-subset (GMM on --train-rows rows), truncated, dense to run")
    ap.add_argument("--gmm-iter", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--out", type=Path, default=Path("eval/results"))
    args = ap.parse_args(argv)
    args.train_rows = {int(a): int(b) for a, b in (p.split(":") for p in args.train_rows.split(",") if p)}
    args.quantizers = [q for q in args.quantizers.split(",") if q]
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    data = load_data(args.dataset, max_queries=1000, seed=args.seed)
    began, load = time.perf_counter(), os.getloadavg()
    rows = []
    title = (f"**{data.name}: {len(data.base):,} base x {data.base.shape[1]}, {len(data.test)} test queries; "
             f"distance computations per query (codes scanned + nlist) to reach recall@10**")

    def save():
        doc = {"benchmark": "bench_truncated_ivf", "dataset": data.name, "n_base": len(data.base),
               "n_test": len(data.test), "settings": {"gmm_iter": args.gmm_iter, "train_rows": args.train_rows,
                                                      "threads": args.threads, "seed": args.seed,
                                                      "n_candidates": 8, "n_neighbors": 12,
                                                      "copies": COPIES, "torch": torch.__version__,
                                                      "faiss": faiss.__version__},
               "notes": [("cost per query = codes scanned (copies included) + nlist coarse distances; lists "
                          "probed by L2 distance to their centroid"),
                         ("GMM rows: every base row assigned by its exact (all-K) posterior; a '(NK rows)' "
                          "quantizer was trained on a random subset of that many base rows (dense EM on all "
                          "500K rows is too slow on the shared 2-core machine), the index holds all rows"),
                         "build_s on a shared 2-core machine (other jobs running): indicative only"],
               "loadavg_start": load, "loadavg_end": os.getloadavg(),
               "wall_seconds": round(time.perf_counter() - began, 1), "rows": rows}
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_truncated_ivf.json").write_text(json.dumps(doc, indent=1) + "\n")
        (args.out / "bench_truncated_ivf.md").write_text(markdown(rows, title) + "\n")

    for nlist in (int(v) for v in args.nlists.split(",")):
        run_nlist(data, nlist, args, rows, save)
    print(markdown(rows, title))


if __name__ == "__main__":
    main()
