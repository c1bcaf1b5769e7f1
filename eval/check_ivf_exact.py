"""GMM-IVF sanity on full data sets: exhaustive probing equals exact search, no duplicate ids,
and a write/read round trip gives bit-identical results.

For each set: train GMM-IVF (diag, soft assignment at the 1.5-copies budget, so duplicates
are really stored), search the test queries with nprobe = nlist by both probing modes, and
compare with exact search (faiss IndexFlatL2 / IndexFlatIP on the same vectors). Writes
eval/results/ivf_exactness.json.

Run: ``python -m flashgmm_ivf.eval.check_ivf_exact`` (full sets from FLASHGMM_DATA or
~/.cache/flashgmm-ivf/data; build them with ../shared/data/fetch).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import faiss
import numpy as np

import flashgmm_ivf
from flashgmm_ivf.datasets import load_dataset, normalize_rows

SETS = {"fashion-mnist-784": 256, "glove-6B-50d": 1024}
K = 100


def exact_search(base, queries, metric, k):
    flat = faiss.IndexFlatIP(base.shape[1]) if metric == "ip" else faiss.IndexFlatL2(base.shape[1])
    flat.add(base)
    return flat.search(queries, k)


def check(name, nlist, n_queries, gmm_iter):
    data = load_dataset(name)
    angular = data.metric == "angular"
    base = np.ascontiguousarray(data.base, dtype=np.float32)
    queries = np.ascontiguousarray(data.test[:n_queries], dtype=np.float32)
    if angular:  # the index normalises for 'cosine'; exact search gets the same unit vectors
        base_ref, queries_ref = normalize_rows(base), normalize_rows(queries)
    else:
        base_ref, queries_ref = base, queries
    d_ref, i_ref = exact_search(base_ref, queries_ref, "ip" if angular else "l2", K)
    index = flashgmm_ivf.index_factory(base.shape[1], f"IVF{nlist}_GMM(diag,copies=1.5,iter={gmm_iter}),Flat",
                                       metric="cosine" if angular else "l2")
    start = time.perf_counter()
    index.train(base)
    index.add(base)
    build_s = time.perf_counter() - start
    result = {"dataset": name, "n_base": len(base), "n_queries": len(queries), "nlist": nlist,
              "metric": data.metric, "copies_per_vector": index.copies_per_vector, "build_seconds": build_s}
    for probe in ("centroid", "posterior"):
        dist, ids = index.search(queries, K, nprobe=nlist, probe=probe)
        same_ids = np.mean([set(a) == set(b) for a, b in zip(ids, i_ref)])
        duplicates = sum(len(row) - len(set(row[row >= 0])) - int((row < 0).sum()) for row in ids)
        result[probe] = {"rows_with_identical_id_sets": float(same_ids),
                         "recall_at_10_vs_exact": float(np.mean([len(set(a[:10]) & set(b[:10])) / 10
                                                                 for a, b in zip(ids, i_ref)])),
                         "max_abs_distance_error": float(np.abs(np.sort(dist, 1) - np.sort(d_ref, 1)).max()),
                         "rows_with_duplicate_ids": int(duplicates)}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "index.npz")
        flashgmm_ivf.write_index(index, path)
        loaded = flashgmm_ivf.read_index(path)
        result["file_bytes"] = os.path.getsize(path)
    for probe in ("centroid", "posterior"):
        for nprobe in (1, 8):
            a = index.search(queries, 10, nprobe=nprobe, probe=probe)
            b = loaded.search(queries, 10, nprobe=nprobe, probe=probe)
            result[f"round_trip_identical_{probe}_nprobe{nprobe}"] = bool(
                np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]))
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--gmm-iter", type=int, default=10)
    parser.add_argument("--out", default="eval/results/ivf_exactness.json")
    args = parser.parse_args(argv)
    results = []
    for name in args.sets.split(","):
        results.append(check(name, SETS[name], args.queries, args.gmm_iter))
        print(json.dumps(results[-1], indent=1))
    with open(args.out, "w") as f:
        json.dump({"results": results, "faiss": faiss.__version__, "flashgmm_ivf": flashgmm_ivf.__version__},
                  f, indent=1)


if __name__ == "__main__":
    main()
