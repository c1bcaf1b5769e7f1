"""Recall sweep: load a set, build each algorithm, search it over its depth settings, write the rows.

Every algorithm (:mod:`.methods`) is trained on the base rows and holds all of them; test
queries are searched at k = 100 in one call per depth setting, single-threaded (FAISS and
torch at 1 thread), and each setting gives one row: recall@1/10/100, codes scanned and
coarse-step distances per query (their sum ``dist_per_query``), QPS, copies per vector and
the index's size on disk. A curve stops once recall@10 exceeds ``STOP_RECALL``. Angular
sets are normalised to unit rows and searched by L2, which ranks neighbours as cosine does.

The default methods are the recommended recipe (``IVF<nlist>_GMM,Flat``, depth calibrated
from training rows, and the same index after ``calibrate(learn queries)`` when the set has
them) and the two FAISS yardsticks; on the bundled sample the recipe and the two yardsticks.
Other specs (``partition=gmm`` lists, say) are added with ``--method``.

    flashgmm-ivf sweep                                   # bundled SIFT sample, about a minute
    python -m flashgmm_ivf.eval.runner --dataset glove-6B-50d --out eval/results --prefix recipe
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import torch
from tqdm import tqdm

from ..datasets import bundled_dataset, ground_truth, load_dataset
from . import report
from .environment import environment
from .methods import FaissIVF, FaissIVFHNSW, GMMIndex

__all__ = ["DEFAULT_METHODS", "METHODS", "QUICK_METHODS", "Data", "add_arguments", "load_data", "main", "make_methods",
           "recommended_nlist", "run", "run_args", "sweep"]

RECALL_KS = (1, 10, 100)
K = max(RECALL_KS)  # results per query: one search gives every recall@k
QPS_REPEATS = 3  # timed search calls per depth setting, the fastest kept
STOP_RECALL = 0.99
DEFAULT_SPEC = "IVF{nlist}_GMM,Flat"
# Method names of --method; anything else is taken as an index_factory spec ('{nlist}' filled in),
# and a '+learn' suffix calibrates it on learn queries.
# A method may start from one built before it (``built``: name -> algorithm): the HNSW yardstick
# takes FAISS IVF's k-means centroids, as its own training would compute them.
METHODS = {
    "ivf": lambda nlist, built, cache, metric: FaissIVF(nlist, cache=cache, metric=metric),
    "ivf-hnsw": lambda nlist, built, cache, metric: FaissIVFHNSW(nlist, start_from=built.get("ivf"), cache=cache,
                                                                 metric=metric),
    "gmm": lambda nlist, built, cache, metric: GMMIndex(DEFAULT_SPEC, nlist, metric=metric),
    "gmm-lists": lambda nlist, built, cache, metric: GMMIndex("IVF{nlist}_GMM(partition=gmm),Flat", nlist,
                                                              metric=metric),
}
DEFAULT_METHODS = ("ivf", "ivf-hnsw", "gmm", "gmm+learn")
QUICK_METHODS = ("ivf", "ivf-hnsw", "gmm")  # the bundled sample (no learn queries): about a minute on 2 cores


# ---------------------------------------------------------------------- data
@dataclass
class Data:
    """Base, test queries with ground truth, optional learn queries (all float32), and the metric
    ('l2', or 'ip': raw inner product) they are searched by."""

    name: str
    base: np.ndarray
    test: np.ndarray
    gt: np.ndarray
    learn: np.ndarray | None = None
    info: dict = field(default_factory=dict)
    metric: str = "l2"


def load_data(dataset=None, *, data_dir=None, max_base=None, max_queries=1000, max_learn=None, seed=1234,
              inner_product=False) -> Data:
    """A benchmark set as float32 arrays with recall@100 ground truth, searched by L2 (angular sets
    normalised) or, with ``inner_product``, by raw inner product over the rows as stored.

    Parameters
    ----------
    dataset : str or None
        A registry name (``flashgmm_ivf.datasets.list_datasets()``); None: the SIFT
        sample bundled with the package (no learn queries).
    data_dir : str or Path, optional
        Searched first for the set's files (see ``load_dataset``).
    max_base : int, optional
        A deterministic random subset of this many base rows (seeded by ``seed``); ground
        truth is then recomputed exactly (cached).
    max_queries : int
        First rows of the test queries used.
    max_learn : int, optional
        First rows of the learn queries used (default: all).
    seed : int

    Returns
    -------
    Data; base (n, d), test (nq, d), gt (nq, 100), learn (nl, d) or None.
    """
    metric = "ip" if inner_product else "l2"
    if dataset is None:
        base, test, meta = bundled_dataset()
        base = base.astype(np.float32)
        test = np.ascontiguousarray(test[:max_queries], dtype=np.float32)
        return Data(meta.get("name", "bundled"), base, test, ground_truth(base, test, K, metric),
                    info={"source": "bundled with the package (flashgmm_ivf/data)", "metric": metric,
                          "n_base_full": int(base.shape[0])}, metric=metric)
    ds = load_dataset(dataset, data_dir=data_dir)
    info = {"metric": ds.metric, "n_base_full": int(ds.base.shape[0])}
    if max_base is not None and max_base < ds.base.shape[0]:
        ds = ds.subset(max_base, seed=seed)
        info["subsample"] = (f"{max_base} base rows drawn without replacement by numpy default_rng({seed}), "
                             "kept in file order; ground truth recomputed exactly")
    if inner_product:
        info["inner_product"] = "rows as stored, searched by raw inner product (exact ground truth recomputed)"
    elif ds.metric == "angular":
        info["angular"] = "rows L2-normalised, searched by L2 (same neighbour order as cosine)"
    ds = ds if inner_product else ds.to_l2()
    base = np.ascontiguousarray(ds.base, dtype=np.float32)
    test = np.ascontiguousarray(ds.test[:max_queries], dtype=np.float32)
    stored = not inner_product and ds.gt is not None and ds.gt.shape[1] >= K  # the set's own gt is by its metric
    gt = np.asarray(ds.gt[:max_queries, :K]) if stored else ground_truth(base, test, K, metric)
    learn = None
    if ds.learn is not None:
        learn = np.ascontiguousarray(ds.learn[:max_learn], dtype=np.float32)
    return Data(dataset, base, test, gt.astype(np.int64), learn, info, metric)


def recommended_nlist(n) -> int:
    """The power of two nearest 4 sqrt(n)."""
    return 2 ** round(math.log2(4 * math.sqrt(n)))


def make_methods(names, nlist, cache=None, metric="l2"):
    """Algorithms from ``--method`` values: names of ``METHODS`` or index_factory specs, either with '+learn'.

    A '+learn' method reads the index its base method built and refines it with
    ``calibrate(learn queries)``; the base method is swept too (added before it when not
    listed). ``cache``: folder where the FAISS yardsticks keep their trained k-means; ``metric``: 'l2' or
    'ip', given to every method.
    """
    built, out = {}, []
    for raw in names:
        name = raw.strip()
        learn = name.endswith("+learn")
        base_name = name[:-len("+learn")] if learn else name
        if base_name not in built:
            built[base_name] = (METHODS[base_name](nlist, built, cache, metric) if base_name in METHODS
                                else GMMIndex(base_name, nlist, metric=metric))
            out.append(built[base_name])
        if learn:
            prior = built[base_name]
            if not isinstance(prior, GMMIndex):
                raise ValueError(f"method {raw!r}: only our index calibrates on learn queries")
            out.append(GMMIndex(prior.spec, nlist, calibrate="learn", start_from=prior, **prior.options))
    if not out:
        raise ValueError("no methods given")
    return out


# ---------------------------------------------------------------------- measuring
def recall_at(I, gt, r) -> float:
    """Mean over queries of |first r results ∩ first r true neighbours| / r."""
    return float((I[:, :r, None] == gt[:, None, :r]).any(2).sum(1).mean() / r)


class _single_thread:
    """FAISS and torch at one thread inside the block (QPS single-thread), restored after."""

    def __enter__(self):
        self.saved = faiss.omp_get_max_threads(), torch.get_num_threads()
        faiss.omp_set_num_threads(1)
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        faiss.omp_set_num_threads(self.saved[0])
        torch.set_num_threads(self.saved[1])


def sweep(method, queries, gt, *, k=K, stop=STOP_RECALL):
    """Search a built ``method`` at each of its depth settings.

    Returns
    -------
    list of dict: the depth setting ('nprobe', 'ef_search', 'recall_target' where used),
    recall_at_<k>, ndis_per_query, coarse_per_query, dist_per_query (their sum) and qps
    (the fastest of ``QPS_REPEATS`` single-threaded search calls of all queries, as
    ann-benchmarks keeps the best of its runs, per CPU second of this process:
    ``time.process_time``, so other processes on a shared machine do not slow it down).
    """
    rows = []
    with _single_thread():
        for curve in method.curves():
            for depth in curve:
                method.search(queries[:1], k, **depth)  # warm-up: one-off setup of a depth setting is not timed
                seconds = math.inf
                for _ in range(QPS_REPEATS):
                    start = time.process_time()
                    _, I = method.search(queries, k, **depth)
                    seconds = min(seconds, time.process_time() - start)
                stats = method.last_stats
                row = {"nprobe": depth.get("nprobe"), "ef_search": depth.get("ef_search"),
                       "recall_target": depth.get("recall"),
                       **{f"recall_at_{r}": recall_at(I, gt, r) for r in RECALL_KS if r <= k},
                       "ndis_per_query": stats["ndis"], "coarse_per_query": stats["ncoarse"],
                       "dist_per_query": stats["ndis"] + stats["ncoarse"], "qps": len(queries) / seconds}
                rows.append(row)
                if row["recall_at_10"] > stop:
                    break
    return rows


# ---------------------------------------------------------------------- driver
def run(dataset=None, *, data_dir=None, nlist=None, methods=DEFAULT_METHODS, out="sweep-results", prefix="sweep",
        max_queries=1000, max_learn=None, max_base=None, seed=1234, merge=None, cache=None, inner_product=False,
        quiet=False) -> dict:
    """Run a sweep, print the table and write ``<prefix>_<dataset>.{csv,json,png,md}`` into ``out``.

    Parameters are the CLI options (see ``add_arguments``); ``nlist`` None: the power of
    two nearest 4 sqrt(n); ``methods``: names of ``METHODS`` or index_factory specs (see
    ``make_methods``; ``cache`` see there). Methods calibrated on learn queries are skipped (and said so) on a
    set without them. ``merge``: an earlier sweep JSON of the same set, queries and nlist
    whose methods not run now are kept (a long sweep run in parts; its run is listed under
    'earlier_runs').

    Returns
    -------
    dict: the JSON document (title, environment, config, dataset, rows, summary) plus 'files'.
    """
    t0 = time.perf_counter()
    env = environment()
    data = load_data(dataset, data_dir=data_dir, max_base=max_base, max_queries=max_queries, max_learn=max_learn,
                     seed=seed, inner_product=inner_product)
    n, d = data.base.shape
    nlist = recommended_nlist(n) if nlist is None else nlist
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    algorithms = make_methods(methods, nlist, cache, data.metric)
    kept, earlier = _earlier_rows(merge, data, nlist, {m.name for m in algorithms})
    if data.learn is None:
        skipped = [m.name for m in algorithms if getattr(m, "calibrate", None) == "learn"]
        if skipped:
            say(f"skipped (no learn queries in {data.name}): {', '.join(skipped)}")
        algorithms = [m for m in algorithms if getattr(m, "calibrate", None) != "learn"]
    say(f"# {data.name}: base {n:,} x {d}, {len(data.test)} test queries, "
        f"{0 if data.learn is None else len(data.learn)} learn queries, nlist {nlist}")
    rows = []
    try:
        for method in tqdm(algorithms, desc=f"sweep {data.name}", disable=quiet):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # e.g. ConvergenceWarning: measured, not fatal
                method.build(data.base, data.base, data.learn)
            common = {"dataset": data.name, "method": method.name, "yardstick": method.yardstick or "",
                      "params": method.params(), "copies_per_vector": method.copies_per_vector(),
                      "index_bytes": method.index_bytes(), "build_s": method.build_s, "n_base": n,
                      "n_queries": len(data.test), "nlist": nlist}
            curve = sweep(method, data.test, data.gt)
            say(f"  {method.name}: built in {method.build_s:.1f} s, {len(curve)} settings, best recall@10 "
                f"{max(r['recall_at_10'] for r in curve):.3f}")
            rows.extend({**common, **row} for row in curve)
            method.close()
    finally:
        for method in algorithms:
            method.remove_files()
    title = (f"{data.name}: {n:,} base x {d}, {len(data.test)} test queries, nlist {nlist}"
             + (", raw inner product" if data.metric == "ip" else "")
             + (f" (base subsampled from {data.info['n_base_full']:,})" if "subsample" in data.info else ""))
    rows = kept + rows
    doc = {"title": title, "environment": env, "earlier_runs": earlier,
           "config": {"dataset": dataset or "bundled", "nlist": nlist,
                      "methods": list(dict.fromkeys(r["method"] for r in rows)),
                      "max_queries": max_queries, "max_learn": max_learn, "max_base": max_base, "seed": seed,
                      "recall_ks": RECALL_KS, "stop_recall_at_10": STOP_RECALL, "k": K,
                      "cost": "per query: codes scanned (faiss indexIVF_stats.ndis, copies included) + coarse-step "
                              "distances (nlist for a flat quantizer, faiss hnsw_stats.ndis for an HNSW one, for "
                              "a projected ranking its projection, its short distances at p / d each and the "
                              "means it re-ranks, as our index reports them in last_stats.ncoarse)",
                      "qps": f"the fastest of {QPS_REPEATS} search calls of all test queries at k=100, FAISS and "
                             "torch at 1 thread, queries per CPU second of the process (time.process_time)",
                      "index_bytes": "the index as written to disk (faiss.serialize_index, flashgmm_ivf.write_index)",
                      "training": "every method trains on the base rows; '+ calibrate(learn)' then refines the "
                                  "depth calibration with the set's learn queries"},
           "dataset": {"name": data.name, "n_base": n, "dim": d, "n_test": len(data.test),
                       "n_learn": 0 if data.learn is None else len(data.learn), **data.info},
           "rows": rows, "seconds": time.perf_counter() - t0, "load_average_at_end": list(os.getloadavg())}
    doc["summary"] = report.summarize(rows)
    doc["files"] = report.write(doc, out, f"{prefix}_{dataset or 'bundled'}")
    if not quiet:
        print(report.markdown(doc["summary"], f"**{title}**"))
        print(f"\n{report.LEGEND}\nWrote {', '.join(doc['files'])} ({time.perf_counter() - t0:.0f} s)")
    return doc


def _earlier_rows(path, data, nlist, rerun):
    """Rows of an earlier sweep of the same set (``merge``) for methods not in ``rerun``, and its run records."""
    if path is None:
        return [], []
    doc = json.loads(Path(path).read_text())
    have = (doc["dataset"]["name"], doc["dataset"]["n_base"], doc["dataset"]["n_test"], doc["config"]["nlist"])
    want = (data.name, data.base.shape[0], len(data.test), nlist)
    if have != want:
        raise ValueError(f"{path}: sweep of (set, base rows, test queries, nlist) = {have}, this one is {want}")
    runs = doc.get("earlier_runs", [])
    own = [m for m in doc["config"]["methods"] if not any(m in r["methods"] for r in runs)]
    runs = runs + [{"environment": doc["environment"], "methods": own, "seconds": doc.get("seconds"),
                    "load_average_at_end": doc.get("load_average_at_end")}]
    # Each earlier run keeps the methods it measured that are not measured again now.
    runs = [{**r, "methods": [m for m in r["methods"] if m not in rerun]} for r in runs]
    return [r for r in doc["rows"] if r["method"] not in rerun], [r for r in runs if r["methods"]]


def _count(text: str) -> int:
    """argparse type of the sizes below: an integer >= 1 (FAISS would take IVF-3 for a spec)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The sweep's options (shared by ``flashgmm-ivf sweep`` and ``python -m flashgmm_ivf.eval.runner``)."""
    parser.add_argument("--dataset", help="registry name (e.g. sift-photos-128, glove-6B-50d-small); default: the "
                                          "SIFT sample bundled with the package")
    parser.add_argument("--data-dir", help="data directory searched first (default $FLASHGMM_DATA or "
                                           "~/.cache/flashgmm-ivf/data, then ../shared/data)")
    parser.add_argument("--nlist", type=_count, help="lists (default: the power of two nearest 4 sqrt(n))")
    parser.add_argument("--method", action="append", dest="methods",
                        help="repeatable: " + ", ".join(METHODS) + ", an index_factory spec such as "
                             "'IVF{nlist}_GMM(coarse=flat),Flat', either with a '+learn' suffix (refined by "
                             "calibrate(learn queries)); default: " + " ".join(DEFAULT_METHODS)
                             + " (bundled sample: " + " ".join(QUICK_METHODS) + ")")
    parser.add_argument("--out", default="sweep-results", help="output folder")
    parser.add_argument("--prefix", default="sweep", help="output file names: <prefix>_<dataset>.*")
    parser.add_argument("--max-queries", type=_count, default=1000, help="test queries used")
    parser.add_argument("--max-learn", type=_count, help="learn queries used (default: all)")
    parser.add_argument("--max-base", type=_count, help="deterministic random subset of the base (seeded)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--merge", help="an earlier sweep JSON of the same set: its methods not run now are kept")
    parser.add_argument("--cache", help="folder where the FAISS yardsticks keep their trained k-means for later "
                                        "sweeps of the same set")
    parser.add_argument("--inner-product", action="store_true",
                        help="search by raw inner product over the rows as stored (exact ground truth recomputed); "
                             "every method is built with METRIC_INNER_PRODUCT")
    parser.add_argument("-q", "--quiet", action="store_true")
    return parser


def run_args(args) -> int:
    """Run from parsed ``add_arguments`` options."""
    methods = args.methods or (DEFAULT_METHODS if args.dataset else QUICK_METHODS)
    run(args.dataset, data_dir=args.data_dir, nlist=args.nlist, methods=methods,
        out=args.out, prefix=args.prefix, max_queries=args.max_queries, max_learn=args.max_learn,
        max_base=args.max_base, seed=args.seed, merge=args.merge, cache=args.cache,
        inner_product=args.inner_product, quiet=args.quiet)
    return 0


def main(argv=None) -> int:
    parser = add_arguments(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    return run_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
