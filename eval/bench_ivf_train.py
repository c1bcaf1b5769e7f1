"""CPU benchmark of record for building an IVF index: train + add of our default index against FAISS's.

Rows, per data set (every index trained on the base rows and then holding all of them, as in the
recall sweeps; angular sets normalised to unit rows):

* ``FAISS IVF<nlist>,Flat``: ``faiss.index_factory(d, "IVF<nlist>,Flat")`` as a FAISS user builds
  it (``IndexIVF.train``: k-means with niter 10 on at most 256 x nlist sampled rows);
* ``FAISS IVF<nlist>,Flat niter 25``: the same with ``cp.niter = 25`` (``faiss.Kmeans``' default);
* ``FAISS IVF<nlist>_HNSW32,Flat``: FAISS's IVF with an HNSW graph over the centroids (niter 10);
* ``IVF<nlist>_GMM,Flat``: ours, ``flashgmm_ivf.index_factory(d, "IVF<nlist>_GMM,Flat")`` with no
  options (the default recipe: partition, HNSW coarse step, spill threshold, calibration rows).

Timing: ``train`` and ``add`` separately, wall clock and this process's CPU seconds, with FAISS,
torch and the BLAS at ``--threads`` threads. Every row is measured ``--repeats`` times in the same
run, the rows interleaved (row 1, row 2, ..., row 1, row 2, ...), so that load from other
processes on a shared machine falls on all rows alike; the minimum of each figure is reported.
The load average before and after each set is recorded.

Run: ``OMP_WAIT_POLICY=PASSIVE python -m flashgmm_ivf.eval.bench_ivf_train --out eval/results/bench_ivf_train.json``
"""
from __future__ import annotations

import argparse
import json
import os
import time

import faiss
import numpy as np
import threadpoolctl
import torch
from tqdm.auto import tqdm

import flashgmm_ivf

from ..datasets import load_dataset
from .environment import environment

SETS = ("sift-photos-128", "glove-6B-50d")


def builders(nlist):
    """(name, make) pairs: ``make(d)`` returns an untrained index with ``train`` and ``add``."""
    def faiss_ivf(coarse="", niter=None):
        def make(d):
            index = faiss.index_factory(d, f"IVF{nlist}{coarse},Flat")
            if niter is not None:
                faiss.extract_index_ivf(index).cp.niter = niter
            return index
        return make

    return [(f"FAISS IVF{nlist},Flat", faiss_ivf()),
            (f"FAISS IVF{nlist},Flat niter 25", faiss_ivf(niter=25)),
            (f"FAISS IVF{nlist}_HNSW32,Flat", faiss_ivf("_HNSW32")),
            (f"IVF{nlist}_GMM,Flat", lambda d: flashgmm_ivf.index_factory(d, f"IVF{nlist}_GMM,Flat"))]


def measure(make, x):
    """Seconds of train and add, wall clock and process CPU time, for one fresh index."""
    index = make(x.shape[1])
    wall0, cpu0 = time.perf_counter(), time.process_time()
    index.train(x)
    wall1, cpu1 = time.perf_counter(), time.process_time()
    index.add(x)
    wall2, cpu2 = time.perf_counter(), time.process_time()
    assert index.ntotal == x.shape[0], (index.ntotal, x.shape)
    return {"train_s": wall1 - wall0, "add_s": wall2 - wall1, "total_s": wall2 - wall0,
            "train_cpu_s": cpu1 - cpu0, "add_cpu_s": cpu2 - cpu1, "total_cpu_s": cpu2 - cpu0}


def run_set(name, nlist, repeats, data_dir=None):
    """Rows of one data set: every builder measured ``repeats`` times, interleaved; minima kept."""
    x = np.ascontiguousarray(load_dataset(name, data_dir=data_dir).to_l2().base, dtype=np.float32)
    load_start = list(os.getloadavg())
    runs = {label: [] for label, _ in builders(nlist)}
    for _ in tqdm(range(repeats), desc=f"{name} repeats", unit="repeat"):
        for label, make in builders(nlist):
            runs[label].append(measure(make, x))
    reference = min(r["total_s"] for r in runs[f"FAISS IVF{nlist},Flat"])
    reference_cpu = min(r["total_cpu_s"] for r in runs[f"FAISS IVF{nlist},Flat"])
    rows = []
    for label, measured in runs.items():
        best = {key: min(r[key] for r in measured) for key in measured[0]}
        rows.append({"dataset": name, "n": x.shape[0], "d": x.shape[1], "nlist": nlist, "method": label, **best,
                     "ratio_to_faiss_default": best["total_s"] / reference,
                     "cpu_ratio_to_faiss_default": best["total_cpu_s"] / reference_cpu, "runs": measured})
    return rows, {"dataset": name, "load_average_start": load_start, "load_average_end": list(os.getloadavg())}


def print_table(rows):
    print("| set | method | train s | add s | total s | x FAISS default | CPU s | CPU x FAISS default |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['dataset']} ({r['n']:,}) | {r['method']} | {r['train_s']:.1f} | {r['add_s']:.1f} | "
              f"{r['total_s']:.1f} | {r['ratio_to_faiss_default']:.2f} | {r['total_cpu_s']:.1f} | "
              f"{r['cpu_ratio_to_faiss_default']:.2f} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="*", default=list(SETS))
    parser.add_argument("--nlist", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="threads of FAISS, torch and the BLAS")
    parser.add_argument("--data-dir", help="searched for the data sets before the default folders")
    parser.add_argument("--out", default="eval/results/bench_ivf_train.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    rows, loads = [], []
    with threadpoolctl.threadpool_limits(args.threads):
        env = environment(torch.device("cpu"))
        for name in args.datasets:
            set_rows, load = run_set(name, args.nlist, args.repeats, args.data_dir)
            rows += set_rows
            loads.append(load)
            with open(args.out, "w") as f:
                json.dump({"environment": env, "arguments": vars(args), "load": loads, "rows": rows}, f, indent=1)
    print_table(rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
