"""Recall@k against distance computations: GMM-IVF vs k-means IVF and the published spilling rules.

Every method builds the same index (FAISS ``IndexIVFFlat``, ``IndexFlatL2`` quantizer,
vectors added to their lists with :func:`flashgmm_ivf.ivf.quantizer.add_assigned`),
is searched by the same dedup search (:func:`flashgmm_ivf.ivf.search_dedup`, lists
probed by distance to their centroid) and is charged the same cost per query: codes
scanned (``indexIVF_stats.ndis``, copies included) plus K coarse distances (plus
nprobe true distances when a GMM method probes by posterior).

Methods are ``<partition>[+<rule>][@posterior]``:

- partitions: ``kmeans-niter10`` (FAISS's IVF training default), ``kmeans-niter25``
  (``faiss.Kmeans`` default; alias ``kmeans``), ``gmm-diag`` (alias ``gmm``),
  ``gmm-spherical``: a GMM fitted by EM, each vector's primary list its most probable
  component. Without a rule a k-means partition is hard (1 copy) and a GMM partition
  spends a copies budget by smallest log-responsibility gap (``assign_budget``).
- rules (:mod:`flashgmm_ivf.ivf.spill`): ``top2``, ``spann`` (closure, capped at 8),
  ``soar``, ``rair``; they add copies on top of the partition's primary lists.
- ``@posterior`` (GMM partitions only): queries probe the nprobe lists of highest GMM
  posterior instead of the nearest means.

Each method runs at every copies budget it can spend (1.0 for hard k-means; > 1 for
rules), at nprobe 1, 2, 4, ... (stopping once recall@10 > 0.99). SOAR's and RAIR's
lambda are tuned on the set's learn queries (cost to recall@10 = 0.9 at the largest
budget) when it has some, else left at the published defaults; results are reported
on the test queries. Angular sets are normalised to unit rows and searched by L2,
which ranks neighbours as cosine does.

Outputs in ``--out``: ``sweep_<dataset>.csv`` (one row per method x budget x nprobe),
``.json`` (the rows, the summary, the tuning runs and the environment), ``.png``
(recall@10 vs distance computations, one panel per budget) and ``.md`` (the summary
table: distance computations per query to reach recall@10 = 0.8 / 0.9 / 0.95, and the
ratio to the best k-means method at the same budget).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import torch
from tqdm import tqdm

from ..datasets import ground_truth, load_dataset
from ..ivf import GMMIndexIVF, assign_budget, search_dedup, top_components
from ..ivf.quantizer import add_assigned, coarse_distances, new_ivf, posterior_lists, set_centroids
from ..ivf.spill import RULES, spill

__all__ = ["Method", "parse_methods", "load_data", "train_partition", "method_lists", "probe_gmm", "build_index",
           "sweep_nprobe", "recall_at", "cost_at", "tune_lambda", "summarize", "markdown", "plot", "run",
           "add_arguments", "main"]

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
COPIES = (1.0, 1.3, 1.6, 2.0)
LAMBDA_DEFAULT = {"soar": 1.0, "rair": 0.5}
LAMBDA_GRID = {"soar": (0.5, 1.0, 1.5), "rair": (0.5, 0.75, 1.0)}
GMM_TOP = 4  # components kept per vector by the GMM budget policy (its max copies)


# ---------------------------------------------------------------------- methods
@dataclass(frozen=True)
class Method:
    """A partition, an optional spill rule and the query's probing, e.g. ``Method('kmeans-niter25', 'soar')``."""

    partition: str
    rule: str | None = None
    probe: str = "centroid"

    @property
    def name(self) -> str:
        short = {v: k for k, v in ALIASES.items()}
        name = self.partition if self.rule is None else f"{short.get(self.partition, self.partition)}+{self.rule}"
        return name + ("@posterior" if self.probe == "posterior" else "")

    @property
    def is_gmm(self) -> bool:
        return self.partition.startswith("gmm")

    def budgets(self, copies):
        """The budgets of ``copies`` this method can spend: 1.0 only for hard k-means, > 1 for rules."""
        if self.rule is None and not self.is_gmm:
            return (1.0,)
        return tuple(c for c in copies if c > 1.0) if self.rule is not None else tuple(copies)


def parse_methods(spec) -> list[Method]:
    """Methods from a comma-separated string or a list of names (see the module docstring)."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for name in (n.strip() for n in names if n.strip()):
        head, _, probe = name.partition("@")
        partition, _, rule = head.partition("+")
        partition = ALIASES.get(partition, partition)
        if partition not in PARTITIONS:
            raise ValueError(f"method {name!r}: unknown partition {partition!r}; known: {PARTITIONS} "
                             f"(aliases {ALIASES})")
        if rule and rule not in RULES:
            raise ValueError(f"method {name!r}: unknown spill rule {rule!r}; known: {sorted(RULES)}")
        if probe not in ("", "posterior") or (probe and not partition.startswith("gmm")):
            raise ValueError(f"method {name!r}: only GMM partitions take a probing suffix, and it is '@posterior'")
        out.append(Method(partition, rule or None, probe or "centroid"))
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


def load_data(dataset=None, *, data_dir=None, max_base=None, max_queries=1000, seed=1234) -> Data:
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
        First rows of the test (and learn) queries used.
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
        learn = np.ascontiguousarray(ds.learn[:max_queries], dtype=np.float32)
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
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    top = top_components(gmm, base, GMM_TOP)
    return Partition(gmm.means_.astype(np.float32), top.labels[:, 0].copy(), top, gmm, train_s,
                     time.perf_counter() - start,
                     {"covariance_type": covariance, "em_iterations": int(gmm.n_iter_),
                      "reg_covar": float(gmm.reg_covar), "init_params": gmm.init_params})


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


def build_index(centroids, base, lists) -> faiss.IndexIVFFlat:
    """An IndexIVFFlat over ``centroids`` holding every base row in each of its lists (ids = row numbers)."""
    index = new_ivf(base.shape[1], centroids.shape[0], "Flat", "l2")
    set_centroids(index, centroids)
    index.train(centroids)  # the quantizer is full: only marks the index trained
    add_assigned(index, base, lists, np.arange(base.shape[0], dtype=np.int64))
    return index


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
        Probe the lists of highest posterior (cost: + nprobe true distances per query);
        None: the nearest centroids.
    ks : recall cut-offs (10 must be among them)

    Returns
    -------
    list of dict with nprobe, recall_at_<k>, ndis_per_query, coarse_per_query,
    dist_per_query (their sum) and qps (search incl. dedup, wall clock).
    """
    nq, nlist = queries.shape[0], index.nlist
    curve = []
    for p in nprobes:
        start = time.perf_counter()
        lists = coarse = None
        if gmm is not None:
            lists = posterior_lists(gmm, queries, p)
            coarse = coarse_distances(index, queries, lists)
        _, I, ndis, _ = search_dedup(index, queries, max(ks), p, max_dup, lists, coarse)
        seconds = time.perf_counter() - start
        ncoarse = nlist + (p if gmm is not None else 0)
        row = {"nprobe": p, **{f"recall_at_{k}": recall_at(I, gt, k) for k in ks},
               "ndis_per_query": ndis / nq, "coarse_per_query": float(ncoarse),
               "dist_per_query": ndis / nq + ncoarse, "qps": nq / seconds}
        curve.append(row)
        if row["recall_at_10"] > stop:
            break
    return curve


def cost_at(curve, target, key="recall_at_10"):
    """Distance computations per query at a recall target, interpolated linearly in log(cost).

    Parameters
    ----------
    curve : list of dict with 'dist_per_query' and ``key``, cost increasing
    target : float

    Returns
    -------
    float, or None when no point reaches the target. A target met at the first point
    returns that point's cost (nothing cheaper was measured).
    """
    previous = None
    for point in curve:
        cost, recall = point["dist_per_query"], point[key]
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
    """Cost to reach each recall@10 target per (method, budget), and its ratio to k-means.

    The reference at a budget is the cheapest k-means-partition method (hard or spilled)
    measured at that same budget, per target.

    Parameters
    ----------
    rows : list of dict with method, partition, copies_target, copies_per_vector, dist_per_query, recall_at_10

    Returns
    -------
    list of dict: method, copies_target, copies_per_vector, cost_at {target: float|None},
    ratio_to_kmeans {target: float|None}, reference {target: method name|None}.
    """
    curves = {}
    for r in rows:
        curves.setdefault((r["method"], r["copies_target"]), []).append(r)
    out = []
    for (method, copies), curve in curves.items():
        out.append({"method": method, "partition": curve[0]["partition"], "copies_target": copies,
                    "copies_per_vector": curve[0]["copies_per_vector"],
                    "cost_at": {str(t): cost_at(curve, t) for t in targets}})
    for s in out:
        s["ratio_to_kmeans"], s["reference"] = {}, {}
        for t in map(str, targets):
            refs = [(r["cost_at"][t], r["method"]) for r in out if r["partition"].startswith("kmeans")
                    and r["copies_target"] == s["copies_target"] and r["cost_at"][t] is not None]
            ref = min(refs) if refs else None
            mine = s["cost_at"][t]
            s["ratio_to_kmeans"][t] = mine / ref[0] if ref and mine is not None else None
            s["reference"][t] = ref[1] if ref else None
    return sorted(out, key=lambda s: (s["copies_target"], s["method"]))


def markdown(summary, title, targets=TARGETS):
    """The summary as a markdown table (n/r: target not reached within the nprobe sweep)."""
    def cost(v):
        return "n/r" if v is None else f"{v:,.0f}"

    def ratio(v):
        return "–" if v is None else f"{v:.2f}"
    head = " | ".join(f"@{t}" for t in targets)
    lines = [title, "", f"| method | copies | dist/query {head} | ratio vs k-means {head} |",
             "|---|---|" + "---|" * (2 * len(targets))]
    for s in summary:
        lines.append(f"| {s['method']} | {s['copies_per_vector']:.2f} | "
                     + " | ".join(cost(s["cost_at"][str(t)]) for t in targets) + " | "
                     + " | ".join(ratio(s["ratio_to_kmeans"][str(t)]) for t in targets) + " |")
    return "\n".join(lines)


def plot(rows, path, title):
    """Recall@10 vs distance computations per query (log x), one panel per budget, one line per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    budgets = sorted({r["copies_target"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    # One colour per method, the same in every plot (tab10 without its grey, kept for the yardstick).
    palette = [c for i, c in enumerate(plt.cm.tab10.colors) if i != 7] + list(plt.cm.Dark2.colors)
    order = list(ALL_METHODS) + [m for m in methods if m not in ALL_METHODS]
    colors = {m: palette[order.index(m) % len(palette)] for m in methods}
    ncols = min(2, len(budgets))
    nrows = math.ceil(len(budgets) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 4.4 * nrows), sharey=True, squeeze=False)
    reference = [r for r in rows if r["copies_target"] == 1.0 and r["partition"] == "kmeans-niter25"]
    for ax, budget in zip(axes.flat, budgets):
        if budget > 1.0 and reference:  # hard k-means as a fixed yardstick in every panel
            ax.plot([r["dist_per_query"] for r in reference], [r["recall_at_10"] for r in reference],
                    color="0.55", ls="--", lw=1, label="kmeans-niter25, 1 copy")
        for m in methods:
            curve = [r for r in rows if r["method"] == m and r["copies_target"] == budget]
            if curve:
                ax.plot([r["dist_per_query"] for r in curve], [r["recall_at_10"] for r in curve], marker="o",
                        ms=3, lw=1.6, color=colors[m], ls=":" if m.endswith("@posterior") else
                        "-" if m.startswith("gmm") else "-.", label=m)
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


def environment() -> dict:
    """Versions, device, CPU count, load and the git commit of the checkout (if any)."""
    root = Path(__file__).resolve().parents[1]

    def git(*args):
        try:
            return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                                  timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            return None
    commit = git("rev-parse", "HEAD")
    return {"python": platform.python_version(), "platform": platform.platform(), "numpy": np.__version__,
            "faiss": faiss.__version__, "torch": torch.__version__,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "cpu_count": os.cpu_count(), "faiss_omp_threads": faiss.omp_get_max_threads(),
            "load_average_at_start": list(os.getloadavg()),
            "omp_env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}, "commit": commit,
            "uncommitted_changes": bool(git("status", "--porcelain")) if commit else None}


# ---------------------------------------------------------------------- driver
def run(dataset=None, *, data_dir=None, nlist=None, methods=QUICK_METHODS, copies=COPIES, nprobes=None,
        out="sweep-results", max_queries=1000, max_base=None, seed=1234, gmm_iter=15, device="auto",
        quiet=False) -> dict:
    """Run a sweep and write ``sweep_<dataset>.{csv,json,png,md}`` into ``out``.

    Parameters are the CLI options (see ``add_arguments``); ``nlist`` None means 64 for
    the bundled set, else the power of two nearest sqrt(n).

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
    data = load_data(dataset, data_dir=data_dir, max_base=max_base, max_queries=max_queries, seed=seed)
    n, d = data.base.shape
    if nlist is None:
        nlist = 64 if dataset is None else 2 ** round(math.log2(math.sqrt(n)))
    probes = nprobe_list(nlist, nprobes)
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    say(f"# {data.name}: base {n} x {d}, {len(data.test)} test queries, nlist {nlist}, nprobe {probes}")
    parts, rows, tuning = {}, [], []
    for name in dict.fromkeys(m.partition for m in methods):
        say(f"training {name} ...")
        parts[name] = train_partition(name, data.base, nlist, seed=seed, gmm_iter=gmm_iter, device=device,
                                      verbose=int(not quiet))
        say(f"  {parts[name].train_s:.1f} s")
    jobs = [(m, c) for m in methods for c in m.budgets(copies)]
    lams = {m: LAMBDA_DEFAULT[m.rule] for m in methods if m.rule in LAMBDA_GRID}
    for m in lams:
        if data.learn is not None and m.budgets(copies):
            lams[m], record = tune_lambda(m, parts[m.partition], data, max(m.budgets(copies)), probes)
            tuning.append(record)
            say(f"  {m.name}: lambda {lams[m]} (tuned on the learn queries at {record['copies']} copies)")
    for m, c in tqdm(jobs, desc=f"sweep {data.name}", disable=quiet):
        part = parts[m.partition]
        start = time.perf_counter()
        lists, params = method_lists(m, part, data.base, c, lams.get(m))
        index = build_index(part.centroids, data.base, lists)
        add_s = part.assign_s + time.perf_counter() - start
        copies_pv = index.ntotal / n
        common = {"dataset": data.name, "method": m.name, "partition": m.partition, "rule": m.rule or "",
                  "params": json.dumps({**part.info, **params, **({"lam_tuned": data.learn is not None}
                                                                   if m in lams else {})}, sort_keys=True),
                  "copies_target": c, "copies_per_vector": copies_pv,
                  "index_bytes": int(index.ntotal * (index.code_size + 8) + nlist * d * 4),
                  "train_s": part.train_s, "add_s": add_s, "n_base": n, "n_queries": len(data.test),
                  "nlist": nlist}
        for point in sweep_nprobe(index, data.test, data.gt, probes, int(lists.shape[1]), gmm=probe_gmm(m, part)):
            rows.append({**common, **point})
        del index
    summary = summarize(rows)
    title = (f"{data.name}: {n:,} base x {d}, {len(data.test)} test queries, nlist {nlist}"
             + (f" (base subsampled from {data.info['n_base_full']:,})" if "subsample" in data.info else ""))
    doc = {"title": title, "environment": env,
           "config": {"dataset": dataset or "bundled", "nlist": nlist, "methods": [m.name for m in methods],
                      "copies": copies, "nprobe": probes, "max_queries": max_queries, "max_base": max_base,
                      "seed": seed, "gmm_iter": gmm_iter, "targets": TARGETS, "recall_ks": RECALL_KS,
                      "stop_recall_at_10": STOP_RECALL,
                      "cost": "per query: codes scanned (faiss indexIVF_stats.ndis, copies included) + nlist "
                              "coarse distances (+ nprobe true distances for @posterior); lists probed by L2 "
                              "distance to their centroid, or by GMM posterior for @posterior methods",
                      "qps": "1 search call of all test queries at k=100 incl. dedup, wall clock",
                      "index_bytes": "entries x (code + 8-byte id) + nlist x d float32 centroids (a GMM's "
                                     "weights and variances, needed only to add vectors or probe by posterior, "
                                     "are not counted)"},
           "dataset": {"name": data.name, "n_base": n, "dim": d, "n_test": len(data.test),
                       "n_learn": 0 if data.learn is None else len(data.learn), **data.info},
           "tuning": tuning, "rows": rows, "summary": summary, "seconds": time.perf_counter() - t0}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"sweep_{dataset or 'bundled'}"
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
    parser.add_argument("--methods", default=",".join(QUICK_METHODS),
                        help=f"comma-separated <partition>[+<rule>]; 'all' = {','.join(ALL_METHODS)}")
    parser.add_argument("--copies", type=floats, default=list(COPIES), help="copies budgets, e.g. 1,1.3,1.6,2")
    parser.add_argument("--nprobe", type=ints, help="nprobe list (default 1,2,4,...,nlist/4)")
    parser.add_argument("--out", default="sweep-results", help="output folder")
    parser.add_argument("--max-queries", type=int, default=1000, help="test (and learn) queries used")
    parser.add_argument("--max-base", type=int, help="deterministic random subset of the base (seeded)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--gmm-iter", type=int, default=15, help="EM iterations of the GMM partitions")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="GMM device")
    parser.add_argument("-q", "--quiet", action="store_true")
    return parser


def run_args(args) -> int:
    """Run from parsed ``add_arguments`` options."""
    methods = ALL_METHODS if args.methods == "all" else args.methods
    run(args.dataset, data_dir=args.data_dir, nlist=args.nlist, methods=methods, copies=args.copies,
        nprobes=args.nprobe, out=args.out, max_queries=args.max_queries, max_base=args.max_base, seed=args.seed,
        gmm_iter=args.gmm_iter, device=args.device, quiet=args.quiet)
    return 0


def main(argv=None) -> int:
    parser = add_arguments(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    return run_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
