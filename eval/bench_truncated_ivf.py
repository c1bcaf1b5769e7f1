"""IVF effect of the truncated E-step: recall@10 against distance computations per query.

On sift-photos-128 (500,000 base rows, 1,000 test queries) and for each nlist, three coarse
quantizers build the same FAISS ``IndexIVFFlat`` (``eval.sweep.build_index``) and are swept
over nprobe with the same dedup search and cost accounting (``eval.sweep.sweep_nprobe``):

* ``kmeans-niter10``: FAISS k-means (``eval.sweep.train_partition``), hard assignment;
* ``gmm-truncated``: diagonal GMM fitted with ``estep="truncated"`` (C' = 8, G = 12);
* ``gmm-dense``: diagonal GMM fitted with ``estep="dense"``.

Both GMMs use ``GMMIndexIVF``'s training defaults (k-means start, reg_covar 0.1 x the mean
feature variance, ``gmm_iter`` EM iterations, tol 0) and assign every base row by its exact
(all-K) posterior: 1.0 copies = each row in its most probable list, 1.5 copies = extra lists by
smallest log-responsibility gap (``eval.sweep.method_lists``). A dense E-step at nlist 16,384
costs ~6 minutes per iteration on 500K rows here, so GMMs may be trained on a random subset of
``--train-rows`` rows (then the truncated GMM is trained both on that subset and on all rows);
the index always holds all base rows.

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

from ..ivf import GMMIndexIVF
from .sweep import (
    TARGETS,
    Method,
    Partition,
    build_index,
    cost_at,
    gmm_partition,
    load_data,
    method_lists,
    nprobe_list,
    sweep_nprobe,
    train_partition,
)

COPIES = (1.0, 1.5)


def estep_partition(base, nlist, estep, train_rows, *, seed=1234, gmm_iter=15) -> Partition:
    """``train_partition``'s diagonal GMM with a chosen E-step, fitted on ``train_rows`` rows (or all)."""
    start = time.perf_counter()
    rows = base
    if train_rows and train_rows < len(base):
        pick = np.sort(np.random.default_rng(seed).choice(len(base), train_rows, replace=False))
        rows = base[pick]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning: a fixed number of EM iterations is the protocol
        # Blocks of ~256 MB of (rows, K) log-densities when the base is assigned (the default
        # 262,144 rows would hold 17 GB at K = 16,384).
        holder = GMMIndexIVF(base.shape[1], nlist, covariance_type="diag", max_iter=gmm_iter, tol=0.0,
                             random_state=seed, device="cpu", estep=estep,
                             chunk_size=max(1024, (1 << 26) // nlist))
        holder.train(rows)
    gmm = holder.gmm
    return gmm_partition(gmm, base, time.perf_counter() - start,
                         {"covariance_type": "diag", "estep": estep, "train_rows": len(rows),
                          "em_iterations": int(gmm.n_iter_), "reg_covar": float(gmm.reg_covar),
                          "final_bound": float(gmm.lower_bound_)})


def run_nlist(data, nlist, args, rows, save):
    """Append the curves of every quantizer at one nlist to ``rows``; ``save()`` after each."""
    n = len(data.base)
    subset = args.train_rows.get(nlist)
    quantizers = {
        "kmeans": ("kmeans-niter10", lambda: train_partition("kmeans-niter10", data.base, nlist, seed=args.seed)),
        "truncated-subset": (f"gmm-truncated ({subset // 1000}K rows)", lambda: estep_partition(
            data.base, nlist, "truncated", subset, seed=args.seed, gmm_iter=args.gmm_iter)) if subset else None,
        "truncated": ("gmm-truncated", lambda: estep_partition(data.base, nlist, "truncated", None, seed=args.seed,
                                                             gmm_iter=args.gmm_iter)),
        "dense": (f"gmm-dense ({subset // 1000}K rows)" if subset else "gmm-dense", lambda: estep_partition(
            data.base, nlist, "dense", subset, seed=args.seed, gmm_iter=args.gmm_iter)),
    }
    quantizers = dict(quantizers[q] for q in args.quantizers if quantizers.get(q))
    for name, train in quantizers.items():
        part = train()
        method = Method("kmeans-niter10") if name.startswith("kmeans") else Method("gmm-diag")
        for copies in method.budgets(COPIES):
            lists, _ = method_lists(method, part, data.base, copies)
            index = build_index(part.centroids, data.base, lists)
            curve = sweep_nprobe(index, data.test, data.gt, nprobe_list(nlist), int(lists.shape[1]))
            row = {"nlist": nlist, "quantizer": name, "copies_target": copies,
                   "copies_per_vector": index.ntotal / n, "train_s": round(part.train_s, 1),
                   "assign_s": round(part.assign_s, 1), "info": part.info, "curve": curve,
                   "cost_at": {str(t): cost_at(curve, t) for t in TARGETS}}
            rows.append(row)
            print(f"nlist {nlist} {name} copies {copies}: train {part.train_s:.0f} s, cost at "
                  f"{row['cost_at']}", flush=True)
            del index
        save()


def markdown(rows, title):
    def cost(v):
        return f"{v:,.0f}" if v is not None else "n/r"

    lines = [title, "", "| nlist | quantizer | copies | " + " | ".join(f"dist. @ recall {t}" for t in TARGETS)
             + " | recall@10 at nprobe 16 | train s |", "| --- | --- | --- |" + " --- |" * (len(TARGETS) + 2)]
    for r in rows:
        at16 = next((p["recall_at_10"] for p in r["curve"] if p["nprobe"] == 16), None)
        lines.append(f"| {r['nlist']:,} | {r['quantizer']} | {r['copies_per_vector']:.2f} | "
                     + " | ".join(cost(r["cost_at"][str(t)]) for t in TARGETS)
                     + f" | {'' if at16 is None else f'{at16:.3f}'} | {r['train_s']:.0f} |")
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
                         "train_s on a shared 2-core machine (other jobs running): indicative only"],
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
