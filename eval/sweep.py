"""Recall@k against distance computations: GMM-IVF vs k-means IVF and the published spilling rules.

Every method builds the same index (FAISS ``IndexIVFFlat``, ``IndexFlatL2`` quantizer,
vectors added to their lists with :func:`flashgmm_ivf.ivf.quantizer.add_assigned`),
is searched by the same dedup search (:func:`flashgmm_ivf.ivf.search_dedup`, lists
probed by distance to their centroid) and is charged the same cost per query: codes
scanned (``indexIVF_stats.ndis``, copies included) plus the coarse distances the
quantizer evaluated (K for a flat one; plus nprobe true distances when a GMM method
probes by posterior, plus K Gaussian log-densities when ``@gap`` runs on a non-spherical
GMM: a spherical one's follow from the K distances).

Methods are ``<partition>[+<rule>][@<probing>][/hnsw]``, or a preset name (``PRESETS``):

- partitions: ``kmeans-niter10`` (FAISS's IVF training default), ``kmeans-niter25``
  (``faiss.Kmeans`` default; alias ``kmeans``), ``gmm-diag`` (alias ``gmm``),
  ``gmm-spherical``: a GMM fitted by EM, each vector's primary list its most probable
  component. Without a rule a k-means partition is hard (1 copy) and a GMM partition
  spends a copies budget by smallest log-responsibility gap (``assign_budget``).
- rules (:mod:`flashgmm_ivf.ivf.spill`): ``top2``, ``spann`` (closure, capped at 8),
  ``soar``, ``rair``; they add copies on top of the partition's primary lists.
- ``@posterior`` (GMM partitions only): queries probe the nprobe lists of highest GMM
  posterior instead of the nearest means.
- ``@adaptive`` (any partition; needs learn queries): each query gets its own nprobe
  from a :class:`flashgmm_ivf.ivf.probing.ProbeTable` calibrated on the learn queries
  (bins of the coarse-distance spread log(d_32 / d_1)); the knob swept instead of nprobe
  is the recall@10 asked of the table on the learn queries (``RECALL_KNOBS``).
- ``@gap`` (GMM partitions only): nearest means first, stop at the first list whose
  weighted log-likelihood is more than delta nats below the query's best component
  (:func:`flashgmm_ivf.ivf.probing.gap_nprobe`); the deltas swept are the learn queries'
  median gaps at ranks 1, 2, 4, ... of the nprobe sweep.
- ``@radius`` (any partition; needs learn queries): lists nearest mean first, each
  skipped once its half-space bound exceeds ``scale`` x the query's running 10th-neighbour
  distance (also when 100 results are returned), at most ``nprobe`` lists
  (:func:`flashgmm_ivf.ivf.pruning.search_pruned`); the (scale, nprobe) settings swept are
  those on the learn queries' cost-recall front (scales ``RADIUS_SCALES``, nprobe the
  sweep's values and their midpoints).
- ``/hnsw``: the same lists, but queries find them through an HNSW graph over the
  centroids (``faiss.IndexHNSWFlat``, M = ``HNSW_M``, put in by
  ``faiss.contrib.ivf_tools.replace_ivf_quantizer``; efSearch = the larger of the depth
  asked and a floor from ``EF_GRID`` tuned on the learn queries) instead of evaluating
  all K; the cost counts the distances its walks evaluate (``faiss.cvar.hnsw_stats.ndis``).
  Not with ``@posterior`` / ``@gap``, which score all K.

Each method runs at every copies budget it can spend (1.0 for hard k-means; > 1 for
rules), at nprobe 1, 2, 4, ... or at each knob value of an adaptive rule (stopping once
recall@10 > 0.99). SOAR's and RAIR's
lambda are tuned on the set's learn queries (cost to recall@10 = 0.9 at the largest
budget) when it has some, else left at the published defaults; results are reported
on the test queries. Angular sets are normalised to unit rows and searched by L2,
which ranks neighbours as cosine does.

Outputs in ``--out`` (``--prefix`` replaces ``sweep``): ``sweep_<dataset>.csv`` (one row
per method x budget x nprobe or knob), ``.json`` (the rows, the summary, the tuning runs
and the environment), ``.png`` (recall@10 vs distance computations, one panel per budget)
and ``.md`` (the summary table: distance computations per query to reach recall@10 =
0.8 / 0.9 / 0.95, their ratios to fixed-nprobe k-means at the same budget, to FAISS
k-means IVF at 1 copy, to the best spilling rule and to adaptive k-means at the same
budget, index bytes and QPS).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
from faiss.contrib.ivf_tools import replace_ivf_quantizer
from tqdm import tqdm

from ..datasets import ground_truth, load_dataset
from ..ivf import GMMIndexIVF, assign_budget, search_dedup, top_components
from ..ivf.probing import (ProbeTable, adaptive_lists, component_scores, distance_spread, gap_nprobe, list_members,
                           neighbor_depths, ranked_lists, scan_costs, search_adaptive)
from ..ivf.pruning import search_pruned
from ..ivf.quantizer import add_assigned, coarse_distances, new_ivf, posterior_lists, set_centroids
from ..ivf.soft_assign import TopComponents
from ..ivf.spill import RULES, spill
from ..mixture import GaussianMixture
from .environment import environment

__all__ = ["Method", "add_arguments", "build_index", "cached_partition", "cost_at", "fit_probe_table", "gap_deltas",
           "load_data", "main", "markdown", "method_lists", "parse_methods", "plot", "probe_gmm", "recall_at", "run",
           "summarize", "sweep_adaptive", "sweep_gap", "sweep_method", "sweep_nprobe", "train_partition",
           "tune_ef_search", "tune_lambda"]

TARGETS = (0.8, 0.9, 0.95)
RECALL_KS = (1, 10, 100)
STOP_RECALL = 0.99        # nprobe sweep stops once recall@10 exceeds this
TUNE_TARGET = 0.9         # lambda tuning: cost to reach this recall@10 on the learn queries
PARTITIONS = ("kmeans-niter10", "kmeans-niter25", "gmm-diag", "gmm-spherical")
ALIASES = {"kmeans": "kmeans-niter25", "gmm": "gmm-diag"}
ALL_METHODS = ("kmeans-niter10", "kmeans-niter25", "kmeans+top2", "kmeans+spann", "kmeans+soar", "kmeans+rair",
               "gmm-diag", "gmm-spherical", "gmm+soar")
# The no-argument run (bundled SIFT sample, < 1 minute on 2 cores).
QUICK_METHODS = ("kmeans-niter10", "kmeans-niter25", "kmeans+spann", "kmeans+soar", "gmm-diag", "gmm+soar")
# Issue 6: adaptive probing on every partition, against fixed-nprobe k-means and its spilling rules.
ADAPTIVE_METHODS = ("kmeans-niter25", "kmeans+top2", "kmeans+spann", "kmeans+soar", "kmeans+rair",
                    "kmeans@adaptive", "kmeans+soar@adaptive", "gmm-spherical", "gmm-spherical@adaptive",
                    "gmm-spherical@gap", "gmm-diag@adaptive", "gmm+soar@adaptive", "gmm-spherical+soar@adaptive")
# Issue 6 with the coarse step on an HNSW graph over the centroids, every reference given the same graph.
HNSW_METHODS = ("kmeans-niter25", "kmeans-niter25/hnsw", "kmeans+soar", "kmeans+rair", "kmeans+soar/hnsw",
                "kmeans+rair/hnsw", "kmeans@adaptive", "kmeans@adaptive/hnsw", "kmeans+soar@adaptive",
                "kmeans+soar@adaptive/hnsw", "gmm-spherical+soar@adaptive", "gmm-spherical+soar@adaptive/hnsw",
                "gmm-spherical@adaptive/hnsw")
# Issue 6 with radius pruning: every partition and rule probed '@radius' through the HNSW graph, against
# the spilling rules and the best '@adaptive' methods of the 'hnsw' preset.
RADIUS_METHODS = ("kmeans-niter25", "kmeans+soar", "kmeans+rair", "kmeans+soar/hnsw", "kmeans+rair/hnsw",
                  "kmeans+soar@adaptive/hnsw", "gmm-spherical+soar@adaptive/hnsw", "kmeans@radius/hnsw",
                  "kmeans+soar@radius/hnsw", "gmm-spherical@radius/hnsw", "gmm-spherical+soar@radius/hnsw")
PRESETS = {"quick": QUICK_METHODS, "all": ALL_METHODS, "adaptive": ADAPTIVE_METHODS, "hnsw": HNSW_METHODS,
           "radius": RADIUS_METHODS}
PROBES = ("centroid", "posterior", "adaptive", "gap", "radius")
PER_QUERY_PROBES = ("adaptive", "radius")  # each query its own depth, tuned on learn queries
QUANTIZERS = ("flat", "hnsw")
HNSW_M = 16  # graph degree of '/hnsw' quantizers (FAISS's IVF<nlist>_HNSW<M> factory spelling)
EF_GRID = (16, 32, 64, 128)  # efSearch floors of '/hnsw' quantizers tried on the learn queries
GMM_PROBES = ("posterior", "gap")  # need a GMM's densities
# Recall@10 asked of a ProbeTable on the learn queries: the knob of '@adaptive' curves.
RECALL_KNOBS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.88, 0.9, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99, 0.995)
# Bound multipliers of '@radius' tried on the learn queries (1: exact for a hard partition).
RADIUS_SCALES = (0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.7, 1.0)
COPIES = (1.0, 1.3, 1.6, 2.0)
LAMBDA_DEFAULT = {"soar": 1.0, "rair": 0.5}
LAMBDA_GRID = {"soar": (0.5, 1.0, 1.5), "rair": (0.5, 0.75, 1.0)}
GMM_TOP = 4  # components kept per vector by the GMM budget policy (its max copies)


# ---------------------------------------------------------------------- methods
@dataclass(frozen=True)
class Method:
    """A partition, an optional spill rule, the query's probing and the coarse quantizer's kind,
    e.g. ``Method('kmeans-niter25', 'soar')``."""

    partition: str
    rule: str | None = None
    probe: str = "centroid"
    quantizer: str = "flat"

    @property
    def name(self) -> str:
        short = {v: k for k, v in ALIASES.items()}
        name = self.partition if self.rule is None else f"{short.get(self.partition, self.partition)}+{self.rule}"
        return (name + ("" if self.probe == "centroid" else f"@{self.probe}")
                + ("" if self.quantizer == "flat" else f"/{self.quantizer}"))

    @property
    def is_gmm(self) -> bool:
        return self.partition.startswith("gmm")

    def budgets(self, copies):
        """The budgets of ``copies`` this method can spend: 1.0 only for hard k-means, > 1 for rules."""
        if self.rule is None and not self.is_gmm:
            return (1.0,)
        return tuple(c for c in copies if c > 1.0) if self.rule is not None else tuple(copies)


def parse_methods(spec) -> list[Method]:
    """Methods from a comma-separated string, a preset name (``PRESETS``) or a list of names (see the module docstring)."""
    if isinstance(spec, str) and spec in PRESETS:
        spec = PRESETS[spec]
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for name in (n.strip() for n in names if n.strip()):
        head, _, quantizer = name.partition("/")
        head, _, probe = head.partition("@")
        partition, _, rule = head.partition("+")
        partition = ALIASES.get(partition, partition)
        if partition not in PARTITIONS:
            raise ValueError(f"method {name!r}: unknown partition {partition!r}; known: {PARTITIONS} "
                             f"(aliases {ALIASES})")
        if rule and rule not in RULES:
            raise ValueError(f"method {name!r}: unknown spill rule {rule!r}; known: {sorted(RULES)}")
        if probe and probe not in PROBES[1:]:
            raise ValueError(f"method {name!r}: unknown probing {probe!r}; known: "
                             + ", ".join(f"'@{p}'" for p in PROBES[1:]))
        if probe in GMM_PROBES and not partition.startswith("gmm"):
            raise ValueError(f"method {name!r}: only GMM partitions take " + " or ".join(f"'@{p}'" for p in GMM_PROBES))
        if quantizer and quantizer not in QUANTIZERS[1:]:
            raise ValueError(f"method {name!r}: unknown quantizer {quantizer!r}; known: "
                             + ", ".join(f"'/{q}'" for q in QUANTIZERS[1:]))
        if quantizer and probe in GMM_PROBES:
            raise ValueError(f"method {name!r}: '@{probe}' scores all K components, so a '/{quantizer}' quantizer "
                             "saves nothing there")
        out.append(Method(partition, rule or None, probe or "centroid", quantizer or "flat"))
    if not out:
        raise ValueError("no methods given")
    return out


# ---------------------------------------------------------------------- data
@dataclass
class Data:
    """Base, test queries with ground truth, optional learn queries with ground truth (all L2)."""

    name: str
    base: np.ndarray
    test: np.ndarray
    gt: np.ndarray
    learn: np.ndarray | None = None
    gt_learn: np.ndarray | None = None
    info: dict = field(default_factory=dict)


def load_data(dataset=None, *, data_dir=None, max_base=None, max_queries=1000, max_learn=None, seed=1234) -> Data:
    """A benchmark set as float32 L2 arrays with recall@100 ground truth.

    Parameters
    ----------
    dataset : str or None
        A registry name (``flashgmm_ivf.datasets.list_datasets()``); None: the SIFT
        sample bundled with the package (no learn queries).
    data_dir : str or Path, optional
        Searched first for the set's files (see ``load_dataset``).
    max_base : int, optional
        Use a deterministic random subset of this many base rows (seeded by ``seed``);
        ground truth is then recomputed exactly (cached).
    max_queries : int
        First rows of the test queries used.
    max_learn : int, optional
        First rows of the learn queries used (default: ``max_queries``).
    seed : int

    Returns
    -------
    Data; base (n, d), test (nq, d), gt (nq, 100), learn (nl, d) and gt_learn (nl, 10) or None.
    """
    if dataset is None:
        from ..cli import bundled_dataset  # the CLI owns the bundled sample
        base, test, meta = bundled_dataset()
        base = base.astype(np.float32)
        test = np.ascontiguousarray(test[:max_queries], dtype=np.float32)
        gt = ground_truth(base, test, max(RECALL_KS), "l2")
        return Data(meta.get("name", "bundled"), base, test, gt,
                    info={"source": "bundled with the package (flashgmm_ivf/data)", "metric": "l2",
                          "n_base_full": int(base.shape[0])})
    ds = load_dataset(dataset, data_dir=data_dir)
    info = {"metric": ds.metric, "n_base_full": int(ds.base.shape[0])}
    if max_base is not None and max_base < ds.base.shape[0]:
        ds = ds.subset(max_base, seed=seed)
        info["subsample"] = f"{max_base} base rows drawn without replacement by numpy default_rng({seed}), " \
                            "kept in file order; ground truth recomputed exactly"
    if ds.metric == "angular":
        info["angular"] = "rows L2-normalised, searched by L2 (same neighbour order as cosine)"
    ds = ds.to_l2()
    base = np.ascontiguousarray(ds.base, dtype=np.float32)
    test = np.ascontiguousarray(ds.test[:max_queries], dtype=np.float32)
    kmax = max(RECALL_KS)
    gt = (np.asarray(ds.gt[:max_queries, :kmax]) if ds.gt is not None and ds.gt.shape[1] >= kmax
          else ground_truth(base, test, kmax, "l2"))
    learn = gt_learn = None
    if ds.learn is not None:
        learn = np.ascontiguousarray(ds.learn[:max_queries if max_learn is None else max_learn], dtype=np.float32)
        gt_learn = ground_truth(base, learn, 10, "l2")
    return Data(dataset, base, test, gt.astype(np.int64), learn, gt_learn, info)


# ---------------------------------------------------------------------- partitions and lists
@dataclass
class Partition:
    """Centroids and primary lists of one trained coarse quantizer.

    Attributes
    ----------
    centroids : ndarray of shape (K, d), float32
    primary : ndarray of shape (n,), int64
    top : TopComponents or None
        GMM partitions: the ``GMM_TOP`` most probable components of every base row.
    gmm : GaussianMixture or None
        GMM partitions: the fitted mixture (posterior probing).
    train_s, assign_s : float
        Seconds to fit, and to find the primary lists of the base.
    info : dict
    """

    centroids: np.ndarray
    primary: np.ndarray
    top: object
    gmm: object
    train_s: float
    assign_s: float
    info: dict


def train_partition(partition, base, nlist, *, seed=1234, gmm_iter=15, device="auto", verbose=0) -> Partition:
    """Fit a coarse quantizer on the base and assign every base row to its primary list.

    Parameters
    ----------
    partition : one of PARTITIONS
    base : ndarray of shape (n, d), float32
    nlist : int
    seed : int
    gmm_iter : int
        EM iterations (exactly: tol = 0).
    device : str
        GaussianMixture device.
    verbose : int
        1: EM progress bar.

    Returns
    -------
    Partition
    """
    d = base.shape[1]
    start = time.perf_counter()
    if partition.startswith("kmeans"):
        niter = int(partition.rsplit("niter", 1)[1])
        # faiss.Kmeans defaults otherwise (as IndexIVF training): at most 256 points per centroid.
        km = faiss.Kmeans(d, nlist, niter=niter, seed=seed)
        km.train(base)
        train_s = time.perf_counter() - start
        start = time.perf_counter()
        primary = km.index.search(base, 1)[1][:, 0].astype(np.int64)
        return Partition(km.centroids.copy(), primary, None, None, train_s, time.perf_counter() - start,
                         {"niter": niter, "max_points_per_centroid": 256})
    covariance = partition.split("-", 1)[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning: a fixed number of EM iterations is the protocol
        holder = GMMIndexIVF(d, nlist, covariance_type=covariance, max_iter=gmm_iter, tol=0.0, random_state=seed,
                             device=device, verbose=verbose)
        holder.train(base)  # fits the GMM (reg_covar 'auto': 0.1 x mean feature variance)
    gmm = holder.gmm
    return gmm_partition(gmm, base, time.perf_counter() - start,
                         {"covariance_type": covariance, "em_iterations": int(gmm.n_iter_),
                          "reg_covar": float(gmm.reg_covar), "init_params": gmm.init_params})


def gmm_partition(gmm, base, train_s, info) -> Partition:
    """The Partition of a fitted GMM: its means, and every base row's GMM_TOP best components."""
    start = time.perf_counter()
    top = top_components(gmm, base, GMM_TOP)
    return Partition(gmm.means_.astype(np.float32), top.labels[:, 0].copy(), top, gmm, train_s,
                     time.perf_counter() - start, info)


def cached_partition(cache, name, partition, base, nlist, *, seed=1234, gmm_iter=15, device="auto",
                     verbose=0) -> Partition:
    """:func:`train_partition`, read from / written to the folder ``cache`` (None: no cache).

    The file name holds the set's name, shape, nlist, partition, seed, EM iterations and a
    digest of a strided sample of the base, so a changed base never hits a stale entry.
    A GMM is stored with ``GaussianMixture.save`` beside the arrays (no pickle).
    """
    if cache is None:
        return train_partition(partition, base, nlist, seed=seed, gmm_iter=gmm_iter, device=device, verbose=verbose)
    n, d = base.shape
    digest = hashlib.sha256(np.ascontiguousarray(base[:: max(1, n // 4096)]).tobytes()).hexdigest()[:12]
    em = f"-iter{gmm_iter}" if partition.startswith("gmm") else ""
    stem = Path(cache) / f"{name}-{n}x{d}-nlist{nlist}-{partition}-seed{seed}{em}-{digest}"
    arrays, gmm_file = stem.with_suffix(".npz"), stem.with_suffix(".gmm.npz")
    if arrays.exists():
        z = np.load(arrays, allow_pickle=False)
        top = gmm = None
        if gmm_file.exists():
            gmm = GaussianMixture.load(gmm_file)
            top = TopComponents(z["top_labels"], z["top_log_resp"], 1.0, nlist)
        return Partition(z["centroids"], z["primary"], top, gmm, float(z["train_s"]), float(z["assign_s"]),
                         json.loads(str(z["info"])))
    part = train_partition(partition, base, nlist, seed=seed, gmm_iter=gmm_iter, device=device, verbose=verbose)
    stem.parent.mkdir(parents=True, exist_ok=True)
    extra = {}
    if part.gmm is not None:
        part.gmm.save(gmm_file)
        extra = {"top_labels": part.top.labels, "top_log_resp": part.top.log_resp}
    np.savez(arrays, centroids=part.centroids, primary=part.primary, train_s=part.train_s, assign_s=part.assign_s,
             info=json.dumps(part.info), **extra)
    return part


def method_lists(method: Method, part: Partition, base, copies, lam=None):
    """Lists of every base row for one method at one budget.

    Returns
    -------
    lists : ndarray of shape (n, m), int64, -1 = no copy
    params : dict
        The rule's knobs and the threshold that met the budget.
    """
    if method.rule is not None:
        params = {} if lam is None else {"lam": lam}
        lists, threshold = spill(method.rule, base, part.centroids, part.primary, copies, **params)
        key = "eps" if method.rule == "spann" else "threshold"
        return lists, {**params, key: threshold}
    if method.is_gmm:
        assignment = assign_budget(part.top, copies)
        return assignment.lists, {"delta_nats": assignment.delta}
    return part.primary[:, None], {}


def probe_gmm(method: Method, part: Partition):
    """The mixture that ranks the lists of ``method``'s queries, or None (nearest centroids)."""
    return part.gmm if method.probe == "posterior" else None


def build_index(centroids, base, lists, quantizer="flat") -> faiss.IndexIVFFlat:
    """An IndexIVFFlat over ``centroids`` holding every base row in each of its lists (ids = row numbers).

    ``quantizer='hnsw'``: queries then find the lists through an ``IndexHNSWFlat`` (M =
    ``HNSW_M``) over the same centroids; the lists themselves are those given.
    """
    index = new_ivf(base.shape[1], centroids.shape[0], "Flat", "l2")
    set_centroids(index, centroids)
    index.train(centroids)  # the quantizer is full: only marks the index trained
    add_assigned(index, base, lists, np.arange(base.shape[0], dtype=np.int64))
    if quantizer == "hnsw":
        replace_ivf_quantizer(index, faiss.IndexHNSWFlat(base.shape[1], HNSW_M))
    elif quantizer != "flat":
        raise ValueError(f"quantizer must be one of {QUANTIZERS}, got {quantizer!r}")
    return index


def quantizer_extra_bytes(index) -> int:
    """Bytes of the serialized quantizer beyond its nlist x d float32 centroids (an HNSW graph's links); 0 if flat."""
    if isinstance(faiss.downcast_index(index.quantizer), faiss.IndexFlat):
        return 0
    return len(faiss.serialize_index(index.quantizer)) - index.nlist * index.d * 4


# ---------------------------------------------------------------------- measuring
def recall_at(I, gt, r) -> float:
    """Mean over queries of |first r results ∩ first r true neighbours| / r."""
    return float((I[:, :r, None] == gt[:, None, :r]).any(2).sum(1).mean() / r)


def nprobe_list(nlist, given=None):
    """nprobe values: ``given``, else 1, 2, 4, ... up to nlist / 4 (at least 1)."""
    if given:
        return sorted({p for p in given if 1 <= p <= nlist})
    out, p = [], 1
    while p <= max(1, nlist // 4):
        out.append(p)
        p *= 2
    return out


def sweep_nprobe(index, queries, gt, nprobes, max_dup, *, gmm=None, ks=RECALL_KS, stop=STOP_RECALL):
    """Recall@k and cost per query at each nprobe, stopping once recall@10 > ``stop``.

    Parameters
    ----------
    index : faiss.IndexIVF
    queries : ndarray of shape (nq, d), float32
    gt : ndarray of shape (nq, >= max(ks))
    nprobes : list of int
    max_dup : int, most lists of any vector
    gmm : GaussianMixture, optional
        Probe the lists of highest posterior (cost: K log-densities, counted as the K
        coarse distances, + nprobe true distances per query); None: the nearest centroids
        (cost: the distances the quantizer evaluates, see :func:`ranked_lists`).
    ks : recall cut-offs (10 must be among them)

    Returns
    -------
    list of dict with nprobe, knob (None), recall_at_<k>, ndis_per_query, coarse_per_query,
    dist_per_query (their sum) and qps (search incl. dedup, wall clock).
    """
    nq = len(queries)
    curve = []
    for p in nprobes:
        start = time.perf_counter()
        if gmm is not None:
            lists = posterior_lists(gmm, queries, p)
            coarse, evaluations = coarse_distances(index, queries, lists), (index.nlist + p) * nq
        else:
            coarse, lists, evaluations = ranked_lists(index, queries, p)
        _, I, ndis, _ = search_dedup(index, queries, max(ks), p, max_dup, lists, coarse)
        row = _point(p, None, I, gt, ks, ndis, evaluations / nq, time.perf_counter() - start)
        curve.append(row)
        if row["recall_at_10"] > stop:
            break
    return curve


def _point(nprobe, knob, I, gt, ks, ndis, coarse_per_query, seconds):
    """One row of a curve: recall@k, codes scanned and coarse evaluations per query, QPS."""
    nq = I.shape[0]
    return {"nprobe": nprobe, "knob": knob, **{f"recall_at_{k}": recall_at(I, gt, k) for k in ks},
            "ndis_per_query": ndis / nq, "coarse_per_query": float(coarse_per_query),
            "dist_per_query": ndis / nq + coarse_per_query, "qps": nq / seconds}


def fit_probe_table(index, queries, gt, depth) -> ProbeTable:
    """A :class:`ProbeTable` for recall@10, calibrated on training queries with ground truth ``gt`` (nq, >= 10)."""
    dis, lists, _ = ranked_lists(index, queries, depth)
    return ProbeTable.fit(distance_spread(dis), neighbor_depths(lists, list_members(index), gt[:, :10]),
                          scan_costs(index, lists))


def sweep_adaptive(index, queries, gt, table, max_dup, *, knobs=RECALL_KNOBS, ks=RECALL_KS, stop=STOP_RECALL):
    """Recall@k and cost per query at each recall asked of ``table``, stopping once recall@10 > ``stop``.

    Cost per query: codes scanned + the coarse distances :func:`adaptive_lists` evaluated
    (the spread feature reads the same distances). Rows as :func:`sweep_nprobe`, with
    nprobe the mean over queries and knob the recall asked.
    """
    def choose(recall):
        return adaptive_lists(index, queries, table, recall)
    return _sweep_per_query(index, queries, gt, knobs, choose, max_dup, ks, stop)


def radius_caps(nprobes, nlist):
    """Depth caps of ``@radius``: the sweep's nprobe values and the midpoints p + p // 2 between doublings."""
    return sorted({c for p in nprobes for c in (p, p + p // 2) if 1 <= c <= nlist})


def sweep_radius(index, queries, gt, knobs, *, ks=RECALL_KS, stop=STOP_RECALL):
    """Recall@k and cost per query at each (scale, nprobe) of ``knobs``, stopping once recall@10 > ``stop``.

    Cost per query: codes scanned + the coarse distances and mean-to-mean distances
    :func:`search_pruned` evaluated. Rows as :func:`sweep_nprobe`, with nprobe the mean
    lists scanned and knob [scale, nprobe cap].
    """
    curve = []
    for scale, cap in knobs:
        start = time.perf_counter()
        # Pruned for recall@10 (the curve's metric) while returning max(ks) results, as the other rows do.
        _, I, ndis, evaluations, scanned = search_pruned(index, queries, max(ks), cap, scale, rank=10)
        row = _point(float(scanned.mean()), [scale, cap], I, gt, ks, ndis, evaluations / len(queries),
                     time.perf_counter() - start)
        curve.append(row)
        if row["recall_at_10"] > stop:
            break
    return curve


def radius_knobs(index, queries, gt, caps, scales=RADIUS_SCALES):
    """The (scale, nprobe) settings of ``@radius`` on the training queries' cost-recall front.

    Every scale runs every cap (until recall@10 > ``STOP_RECALL``); a setting is kept when
    no cheaper one reaches its recall@10.

    Returns
    -------
    knobs : list of (scale, cap), cost increasing
    front : list of dict, each setting with its recall_at_10 and dist_per_query on the training queries
    """
    points = [(row["dist_per_query"], row["recall_at_10"], scale, cap)
              for scale in scales
              for row, cap in zip(sweep_radius(index, queries, gt, [(scale, c) for c in caps], ks=(10,)), caps)]
    front, best = [], -1.0
    for cost, recall, scale, cap in sorted(points):
        if recall > best:
            front.append({"scale": scale, "nprobe": cap, "recall_at_10": recall, "dist_per_query": cost})
            best = recall
    return [(f["scale"], f["nprobe"]) for f in front], front


def gap_deltas(gmm, index, queries, nprobes):
    """The knob values of ``@gap``: median over ``queries`` of the log-likelihood gap at each rank of ``nprobes``."""
    _, lists, _ = ranked_lists(index, queries, max(nprobes))
    scores, best = component_scores(gmm, queries, lists)
    gaps = np.median(best[:, None] - scores[:, np.asarray(nprobes) - 1], axis=0)
    return sorted({float(g) for g in np.maximum.accumulate(gaps)})


def sweep_gap(index, queries, gt, gmm, deltas, depth, max_dup, *, ks=RECALL_KS, stop=STOP_RECALL):
    """Recall@k and cost per query at each log-likelihood gap ``delta`` (nats), stopping once recall@10 > ``stop``.

    Cost per query: codes scanned + nlist coarse distances, + nlist Gaussian log-densities
    unless the GMM is spherical (its log-densities follow from the same distances).
    """
    densities = 0 if gmm.covariance_type == "spherical" else index.nlist * len(queries)

    def choose(delta):
        dis, lists, evaluations = ranked_lists(index, queries, depth)
        return dis, lists, gap_nprobe(*component_scores(gmm, queries, lists), delta), evaluations + densities
    return _sweep_per_query(index, queries, gt, deltas, choose, max_dup, ks, stop)


def _sweep_per_query(index, queries, gt, knobs, choose, max_dup, ks, stop):
    """Curve of a rule whose knob sets each query's nprobe.

    ``choose(knob)`` -> (coarse_dis, list_nos, nprobe, coarse evaluations summed over the queries).
    """
    curve = []
    for knob in knobs:
        start = time.perf_counter()  # the coarse step and the rule are part of the search time
        dis, lists, nprobe, evaluations = choose(knob)
        _, I, ndis = search_adaptive(index, queries, max(ks), lists, dis, nprobe, max_dup)
        row = _point(float(nprobe.mean()), knob, I, gt, ks, ndis, evaluations / len(queries),
                     time.perf_counter() - start)
        curve.append(row)
        if row["recall_at_10"] > stop:
            break
    return curve


def sweep_method(method, part, index, data, nprobes, max_dup):
    """The test-query curve of ``method`` on ``index``; adaptive rules and an HNSW quantizer's
    efSearch are set up on the learn queries.

    Returns
    -------
    curve : list of dict (see :func:`sweep_nprobe`)
    params : dict, the probing's settings for the CSV
    extra_bytes : int, what the probing keeps beside the index (table, GMM weights and variances)
    """
    depth = min(index.nlist, 2 * max(nprobes))
    if method.probe == "adaptive":
        table = fit_probe_table(index, data.learn, data.gt_learn, depth)
        params = {"probe_table": {"bins": int(table.counts.size), "depth": depth, "feature": "log(d_32/d_1)",
                                  "calibrated_on": f"{len(data.learn)} learn queries"}}
        extra_bytes = table.nbytes

        def curve(queries, gt, **kw):
            return sweep_adaptive(index, queries, gt, table, max_dup, **kw)
    elif method.probe == "radius":
        knobs, front = radius_knobs(index, data.learn, data.gt_learn, radius_caps(nprobes, index.nlist))
        # The rows' knobs are the front's settings; its learn-query costs stay out of every row.
        params = {"radius_knobs": f"{len(front)} (scale, nprobe) settings on the cost-recall front of "
                                  f"{len(data.learn)} learn queries", "radius_scales": list(RADIUS_SCALES)}
        extra_bytes = 0

        def curve(queries, gt, **kw):
            return sweep_radius(index, queries, gt, knobs, **kw)
    elif method.probe == "gap":
        deltas = gap_deltas(part.gmm, index, data.learn, nprobes)
        params = {"gap_deltas_from": f"{len(data.learn)} learn queries"}
        extra_bytes = 4 * (part.gmm.weights_.size + part.gmm.covariances_.size)

        def curve(queries, gt, **kw):
            return sweep_gap(index, queries, gt, part.gmm, deltas, depth, max_dup, **kw)
    else:
        params, extra_bytes = {}, 0

        def curve(queries, gt, **kw):
            return sweep_nprobe(index, queries, gt, nprobes, max_dup, gmm=probe_gmm(method, part), **kw)
    if method.quantizer == "hnsw" and data.learn is not None:
        params["hnsw_ef_search"] = tune_ef_search(index, lambda: curve(data.learn, data.gt_learn, ks=(10,),
                                                                       stop=0.95))
    return curve(data.test, data.gt), params, extra_bytes


def tune_ef_search(index, learn_curve):
    """Set the HNSW quantizer's efSearch floor to the ``EF_GRID`` value with the lowest cost to
    recall@10 = TUNE_TARGET on the learn queries (``learn_curve()``: their curve at the current setting).

    A deeper walk costs coarse distances but ranks the lists more exactly, so fewer codes
    are scanned for the same recall; which pays depends on the data.

    Returns
    -------
    dict: the chosen efSearch and the grid (efSearch, cost at the target) for the JSON.
    """
    quantizer = faiss.downcast_index(index.quantizer)
    grid = []
    for ef in EF_GRID:
        quantizer.hnsw.efSearch = ef
        grid.append({"ef_search": ef, "cost_at_target": cost_at(learn_curve(), TUNE_TARGET)})
    best = min(grid, key=lambda g: (g["cost_at_target"] is None, g["cost_at_target"] or 0.0))
    quantizer.hnsw.efSearch = best["ef_search"]
    return {"chosen": best["ef_search"], "target_recall_at_10": TUNE_TARGET, "queries": "learn", "grid": grid}


def cost_at(curve, target, key="recall_at_10", value="dist_per_query"):
    """Distance computations per query (or another ``value``) at a recall target, interpolated linearly in log.

    Parameters
    ----------
    curve : list of dict with 'dist_per_query' and ``key``, cost increasing
    target : float
    value : str, the row entry interpolated (e.g. 'qps')

    Returns
    -------
    float, or None when no point reaches the target. A target met at the first point
    returns that point's cost (nothing cheaper was measured).
    """
    previous = None
    for point in curve:
        cost, recall = point[value], point[key]
        if recall >= target:
            if previous is None or recall <= previous[1]:
                return cost
            t = (target - previous[1]) / (recall - previous[1])
            return float(math.exp(math.log(previous[0]) + t * (math.log(cost) - math.log(previous[0]))))
        previous = (cost, recall)
    return None


def tune_lambda(method, part, data, copies, nprobes):
    """SOAR / RAIR lambda with the lowest cost to recall@10 = TUNE_TARGET on the learn queries.

    Returns
    -------
    lam : float
    record : dict
        The budget, the target and the grid (lambda, cost at the target, recall@10 at the
        last nprobe) for the JSON.
    """
    table = []
    for lam in LAMBDA_GRID[method.rule]:
        lists, _ = method_lists(method, part, data.base, copies, lam)
        index = build_index(part.centroids, data.base, lists)
        curve = sweep_nprobe(index, data.learn, data.gt_learn, nprobes, lists.shape[1], gmm=probe_gmm(method, part),
                             ks=(10,), stop=0.95)
        table.append({"lam": lam, "cost_at_target": cost_at(curve, TUNE_TARGET),
                      "last_recall_at_10": curve[-1]["recall_at_10"]})
    best = min(table, key=lambda t: (t["cost_at_target"] is None, t["cost_at_target"] or 0.0,
                                     -t["last_recall_at_10"]))
    return best["lam"], {"method": method.name, "copies": copies, "queries": "learn",
                         "target_recall_at_10": TUNE_TARGET, "chosen_lam": best["lam"], "grid": table}


# ---------------------------------------------------------------------- summary
def summarize(rows, targets=TARGETS):
    """Cost to reach each recall@10 target per (method, budget), and its ratios to the references.

    References, per target (None where absent or not reached):

    - ``ratio_to_kmeans`` / ``reference``: the cheapest k-means-partition method probed
      with a fixed nprobe (hard or spilled) at the same budget;
    - ``ratio_to_ivf``: FAISS k-means IVF as shipped, ``kmeans-niter25`` with a fixed
      nprobe at 1 copy, whatever the method's budget (issue 6's yardstick);
    - ``ratio_to_spill`` / ``spill_reference``: the cheapest k-means spilling rule
      (top2 / SPANN / SOAR / RAIR) with a fixed nprobe at the same budget;
    - ``ratio_to_adaptive_kmeans``: the cheapest k-means-partition method with the same
      per-query probing (``@radius`` for ``@radius`` rows, else ``@adaptive``) at the same
      budget (the control for adaptive GMM methods).

    Parameters
    ----------
    rows : list of dict with method, partition, copies_target, copies_per_vector, dist_per_query, recall_at_10
        (and optionally rule, probe, index_bytes, qps)

    Returns
    -------
    list of dict: method, partition, probe, copies_target, copies_per_vector, index_bytes,
    cost_at {target: float|None}, qps_at {target: float|None}, the ratios above {target: float|None}
    and reference / spill_reference {target: method name|None}.
    """
    curves = {}
    for r in rows:
        curves.setdefault((r["method"], r["copies_target"]), []).append(r)
    out = []
    for (method, copies), curve in curves.items():
        first = curve[0]
        out.append({"method": method, "partition": first["partition"], "rule": first.get("rule") or "",
                    "probe": first.get("probe", "centroid"), "copies_target": copies,
                    "copies_per_vector": first["copies_per_vector"], "index_bytes": first.get("index_bytes"),
                    "cost_at": {str(t): cost_at(curve, t) for t in targets},
                    "qps_at": {str(t): cost_at(curve, t, value="qps") if "qps" in first else None
                               for t in targets}})

    def kmeans(s, probe="centroid"):
        return s["partition"].startswith("kmeans") and s["probe"] == probe

    def cheapest(t, keep):
        found = [(r["cost_at"][t], r["method"]) for r in out if keep(r) and r["cost_at"][t] is not None]
        return min(found) if found else None

    def ratio(mine, ref):
        return mine / ref[0] if ref is not None and mine is not None else None
    for s in out:
        for key in ("ratio_to_kmeans", "reference", "ratio_to_ivf", "ratio_to_spill", "spill_reference",
                    "ratio_to_adaptive_kmeans"):
            s[key] = {}
        for t in map(str, targets):
            mine, same = s["cost_at"][t], s["copies_target"]
            ref = cheapest(t, lambda r, c=same: kmeans(r) and r["copies_target"] == c)
            spill = cheapest(t, lambda r, c=same: kmeans(r) and r["rule"] and r["copies_target"] == c)
            ivf = cheapest(t, lambda r: kmeans(r) and r["method"] == "kmeans-niter25" and r["copies_target"] == 1.0)
            probe = s["probe"] if s["probe"] in PER_QUERY_PROBES else "adaptive"
            adaptive = cheapest(t, lambda r, c=same, p=probe: kmeans(r, p) and r["copies_target"] == c)
            s["ratio_to_kmeans"][t], s["reference"][t] = ratio(mine, ref), ref[1] if ref else None
            s["ratio_to_spill"][t], s["spill_reference"][t] = ratio(mine, spill), spill[1] if spill else None
            s["ratio_to_ivf"][t] = ratio(mine, ivf)
            s["ratio_to_adaptive_kmeans"][t] = ratio(mine, adaptive)
    return sorted(out, key=lambda s: (s["copies_target"], s["method"]))


RATIO_COLUMNS = (("ratio_to_kmeans", "vs k-means, same copies"), ("ratio_to_ivf", "vs IVF k-means, 1 copy"),
                 ("ratio_to_spill", "vs best spill, same copies"),
                 ("ratio_to_adaptive_kmeans", "vs k-means, same per-query probing and copies"))


def markdown(summary, title, targets=TARGETS):
    """The summary as a markdown table (n/r: target not reached within the sweep; –: no reference).

    Ratio groups that no method has a value for are left out; cost ratios below 1 mean
    cheaper than the reference.
    """
    def cost(v):
        return "n/r" if v is None else f"{v:,.0f}"

    def ratio(v):
        return "–" if v is None else f"{v:.2f}"
    head = " | ".join(f"@{t}" for t in targets)
    groups = [(key, label) for key, label in RATIO_COLUMNS
              if any(s[key][str(t)] is not None for s in summary for t in targets)]
    lines = [title, "", f"| method | copies | dist/query {head} | "
             + "".join(f"{label} {head} | " for _, label in groups) + f"index MB | QPS @{targets[-1]} |",
             "|---|---|" + "---|" * (len(targets) * (1 + len(groups)) + 2)]
    for s in summary:
        qps = s["qps_at"][str(targets[-1])]
        size = "–" if s["index_bytes"] is None else f"{s['index_bytes'] / 1e6:.1f}"
        lines.append(f"| {s['method']} | {s['copies_per_vector']:.2f} | "
                     + " | ".join(cost(s["cost_at"][str(t)]) for t in targets) + " | "
                     + "".join(" | ".join(ratio(s[key][str(t)]) for t in targets) + " | " for key, _ in groups)
                     + f"{size} | {'–' if qps is None else f'{qps:,.0f}'} |")
    return "\n".join(lines)


def plot(rows, path, title):
    """Recall@10 vs distance computations per query (log x), one panel per budget, one line per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    budgets = sorted({r["copies_target"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    # One colour per method, distinct within a plot and the same in every plot of one method list
    # (greys left out: grey is the yardstick's).
    palette = [c for cmap, grey in ((plt.cm.tab10, 7), (plt.cm.Dark2, 7), (plt.cm.Set1, 8))
               for i, c in enumerate(cmap.colors) if i != grey]
    known = list(dict.fromkeys(ALL_METHODS + tuple(m.name for preset in (ADAPTIVE_METHODS, HNSW_METHODS,
                                                                         RADIUS_METHODS)
                                                   for m in parse_methods(preset))))
    order = sorted(methods, key=lambda m: (known.index(m) if m in known else len(known), methods.index(m)))
    colors = {m: palette[i % len(palette)] for i, m in enumerate(order)}
    ncols = min(2, len(budgets))
    nrows = math.ceil(len(budgets) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 4.4 * nrows), sharey=True, squeeze=False)
    reference = [r for r in rows if r["copies_target"] == 1.0 and r["method"] == "kmeans-niter25"]
    for ax, budget in zip(axes.flat, budgets):
        if budget > 1.0 and reference:  # hard k-means as a fixed yardstick in every panel
            ax.plot([r["dist_per_query"] for r in reference], [r["recall_at_10"] for r in reference],
                    color="0.55", ls="--", lw=1, label="kmeans-niter25, 1 copy")
        for m in methods:
            curve = [r for r in rows if r["method"] == m and r["copies_target"] == budget]
            if curve:
                # Marker: how lists are probed (square: a per-query nprobe); line: GMM solid, k-means dash-dot.
                ax.plot([r["dist_per_query"] for r in curve], [r["recall_at_10"] for r in curve],
                        marker="s" if any(f"@{p}" in m for p in (*PER_QUERY_PROBES, "gap")) else "o", ms=3,
                        lw=1.6, color=colors[m],
                        ls=":" if m.endswith("@posterior") else "-" if m.startswith("gmm") else "-.", label=m)
        for t in TARGETS:
            ax.axhline(t, color="0.85", lw=0.8, zorder=0)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(f"{budget:.1f} copies per vector")
        ax.set_xlabel("distance computations per query (log)")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    for ax in axes.flat[len(budgets):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("recall@10")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------- driver
def run(dataset=None, *, data_dir=None, nlist=None, methods=QUICK_METHODS, copies=COPIES, nprobes=None,
        out="sweep-results", prefix="sweep", max_queries=1000, max_learn=None, max_base=None, seed=1234,
        gmm_iter=15, device="auto", cache=None, quiet=False) -> dict:
    """Run a sweep and write ``<prefix>_<dataset>.{csv,json,png,md}`` into ``out``.

    Parameters are the CLI options (see ``add_arguments``); ``nlist`` None means 64 for
    the bundled set, else the power of two nearest sqrt(n); ``methods`` a preset name,
    comma-separated names or a list.

    Returns
    -------
    dict: the JSON document (environment, config, dataset, tuning, rows, summary) plus 'files'.
    """
    t0 = time.perf_counter()
    env = environment()
    methods = parse_methods(methods)
    copies = sorted({float(c) for c in copies})
    if any(not 1.0 <= c <= 2.0 for c in copies):
        raise ValueError(f"copies budgets must be in [1, 2], got {copies}")
    data = load_data(dataset, data_dir=data_dir, max_base=max_base, max_queries=max_queries, max_learn=max_learn,
                     seed=seed)
    needs_learn = [m.name for m in methods if m.probe in ("adaptive", "gap", "radius")]
    if needs_learn and data.learn is None:
        raise ValueError(f"{needs_learn} are set up on learn queries, and {data.name} has none (pick a registry set "
                         "with a learn split)")
    n, d = data.base.shape
    if nlist is None:
        nlist = 64 if dataset is None else 2 ** round(math.log2(math.sqrt(n)))
    probes = nprobe_list(nlist, nprobes)
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    say(f"# {data.name}: base {n} x {d}, {len(data.test)} test queries, nlist {nlist}, nprobe {probes}")
    parts, rows, tuning = {}, [], []
    for name in dict.fromkeys(m.partition for m in methods):
        say(f"training {name} ...")
        parts[name] = cached_partition(cache, data.name, name, data.base, nlist, seed=seed, gmm_iter=gmm_iter,
                                       device=device, verbose=int(not quiet))
        say(f"  {parts[name].train_s:.1f} s")
    jobs = [(m, c) for m in methods for c in m.budgets(copies)]
    # lambda belongs to the partition and rule: tuned once for all probings and quantizers.
    lams = {}
    for m in methods:
        key = (m.partition, m.rule)
        if m.rule not in LAMBDA_GRID or key in lams:
            continue
        lams[key] = LAMBDA_DEFAULT[m.rule]
        if data.learn is not None and m.budgets(copies):
            lams[key], record = tune_lambda(Method(m.partition, m.rule), parts[m.partition], data,
                                            max(m.budgets(copies)), probes)
            tuning.append(record)
            say(f"  {record['method']}: lambda {lams[key]} (tuned on the learn queries at {record['copies']} copies)")
    for m, c in tqdm(jobs, desc=f"sweep {data.name}", disable=quiet):
        part = parts[m.partition]
        start = time.perf_counter()
        lam = lams.get((m.partition, m.rule))
        lists, params = method_lists(m, part, data.base, c, lam)
        index = build_index(part.centroids, data.base, lists, m.quantizer)
        add_s = part.assign_s + time.perf_counter() - start
        copies_pv = index.ntotal / n
        curve, probing, extra_bytes = sweep_method(m, part, index, data, probes, int(lists.shape[1]))
        extra_bytes += quantizer_extra_bytes(index)
        common = {"dataset": data.name, "method": m.name, "partition": m.partition, "rule": m.rule or "",
                  "probe": m.probe,
                  "params": json.dumps({**part.info, **params, **probing, **({"lam_tuned": data.learn is not None}
                                                                             if lam is not None else {}),
                                    **({"hnsw_M": HNSW_M} if m.quantizer == "hnsw" else {})}, sort_keys=True),
                  "copies_target": c, "copies_per_vector": copies_pv,
                  "index_bytes": int(index.ntotal * (index.code_size + 8) + nlist * d * 4 + extra_bytes),
                  "train_s": part.train_s, "add_s": add_s, "n_base": n, "n_queries": len(data.test),
                  "nlist": nlist}
        rows.extend({**common, **point} for point in curve)
        del index
    summary = summarize(rows)
    title = (f"{data.name}: {n:,} base x {d}, {len(data.test)} test queries, nlist {nlist}"
             + (f" (base subsampled from {data.info['n_base_full']:,})" if "subsample" in data.info else ""))
    doc = {"title": title, "environment": env,
           "config": {"dataset": dataset or "bundled", "nlist": nlist, "methods": [m.name for m in methods],
                      "copies": copies, "nprobe": probes, "max_queries": max_queries, "max_learn": max_learn,
                      "max_base": max_base, "recall_knobs": RECALL_KNOBS,
                      "seed": seed, "gmm_iter": gmm_iter, "targets": TARGETS, "recall_ks": RECALL_KS,
                      "stop_recall_at_10": STOP_RECALL,
                      "cost": "per query: codes scanned (faiss indexIVF_stats.ndis, copies included) + the "
                              "coarse distances evaluated (nlist for a flat quantizer, faiss hnsw_stats.ndis for "
                              "/hnsw) (+ nprobe true distances for @posterior, + nlist log-densities "
                              "for @gap on a non-spherical GMM); lists probed by L2 distance to their centroid, "
                              "or by GMM posterior for @posterior methods; nprobe of @adaptive / @gap / @radius rows is "
                              "the mean over queries (lists scanned), knob the recall asked (@adaptive), delta "
                              "nats (@gap) or [scale, nprobe cap] (@radius, whose cost adds the mean-to-mean "
                              "distances of its bounds)",
                      "qps": "1 search call of all test queries at k=100 incl. dedup, wall clock",
                      "index_bytes": "entries x (code + 8-byte id) + nlist x d float32 centroids (+ the HNSW "
                                     "graph of /hnsw, serialized), + the probe "
                                     "table (@adaptive) or the GMM's float32 weights and variances (@gap); a GMM's "
                                     "weights and variances needed only to add vectors or probe by posterior are not "
                                     "counted"},
           "dataset": {"name": data.name, "n_base": n, "dim": d, "n_test": len(data.test),
                       "n_learn": 0 if data.learn is None else len(data.learn), **data.info},
           "tuning": tuning, "rows": rows, "summary": summary, "seconds": time.perf_counter() - t0}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{prefix}_{dataset or 'bundled'}"
    with open(f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    Path(f"{stem}.json").write_text(json.dumps(doc, indent=1))
    plot(rows, f"{stem}.png", title)
    table = markdown(summary, f"**{title}**")
    Path(f"{stem}.md").write_text(table + "\n")
    doc["files"] = [f"{stem}.{ext}" for ext in ("csv", "json", "png", "md")]
    if not quiet:
        print(table)
        print(f"\nn/r: recall@10 target not reached by nprobe <= {probes[-1]}. Ratio: cost / cheapest k-means "
              f"method at the same copies. Wrote {', '.join(doc['files'])} ({doc['seconds']:.0f} s)")
    return doc


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The sweep's options (shared by ``flashgmm-ivf sweep`` and ``python -m flashgmm_ivf.eval.sweep``)."""
    def floats(s):
        return [float(v) for v in s.split(",") if v.strip()]

    def ints(s):
        return [int(v) for v in s.split(",") if v.strip()]
    parser.add_argument("--dataset", help="registry name (e.g. sift-photos-128, glove-6B-50d-small); default: the "
                                          "SIFT sample bundled with the package")
    parser.add_argument("--data-dir", help="data directory searched first (default $FLASHGMM_DATA or "
                                           "~/.cache/flashgmm-ivf/data, then ../shared/data)")
    parser.add_argument("--nlist", type=int, help="lists (default 64 for the bundled set, else ~sqrt(n))")
    parser.add_argument("--methods", default="quick",
                        help="comma-separated <partition>[+<rule>][@<probing>], or a preset: "
                             + "; ".join(f"'{k}' = {','.join(v)}" for k, v in PRESETS.items()))
    parser.add_argument("--copies", type=floats, default=list(COPIES), help="copies budgets, e.g. 1,1.3,1.6,2")
    parser.add_argument("--nprobe", type=ints, help="nprobe list (default 1,2,4,...,nlist/4)")
    parser.add_argument("--out", default="sweep-results", help="output folder")
    parser.add_argument("--prefix", default="sweep", help="output file names: <prefix>_<dataset>.*")
    parser.add_argument("--max-queries", type=int, default=1000, help="test queries used")
    parser.add_argument("--max-learn", type=int, help="learn queries used (default: --max-queries)")
    parser.add_argument("--cache", help="folder caching trained partitions (reused when base, nlist, seed and "
                                        "EM iterations match)")
    parser.add_argument("--max-base", type=int, help="deterministic random subset of the base (seeded)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--gmm-iter", type=int, default=15, help="EM iterations of the GMM partitions")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="GMM device")
    parser.add_argument("-q", "--quiet", action="store_true")
    return parser


def run_args(args) -> int:
    """Run from parsed ``add_arguments`` options."""
    run(args.dataset, data_dir=args.data_dir, nlist=args.nlist, methods=args.methods, copies=args.copies,
        nprobes=args.nprobe, out=args.out, prefix=args.prefix, max_queries=args.max_queries,
        max_learn=args.max_learn, max_base=args.max_base, seed=args.seed, gmm_iter=args.gmm_iter,
        device=args.device, cache=args.cache, quiet=args.quiet)
    return 0


def main(argv=None) -> int:
    parser = add_arguments(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    return run_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
