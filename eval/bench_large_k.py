"""Large K: seconds per EM iteration, dense vs truncated E-step, and held-out quality.

For each K, on SIFT descriptors (``sift-photos-128``: 500,000 base rows, D=128, uint8,
10,000 held-out test rows; where that set is absent, e.g. on a GPU machine, a synthetic
SIFT-like set of ``--synthetic-rows`` rows, said so in the output), from one shared start:

* ``truncated``: ``GaussianMixture(estep="truncated")`` for ``--iters`` iterations on all base
  rows; seconds of every iteration (E-step + M-step; the first also finds each row's
  starting candidates) and of its graph rebuild (FAISS on CPU, torch on CUDA), the truncated free
  energy per sample, and the held-out log-likelihood per sample (exact, all K components)
  of the final model.
* ``dense`` on CPU: the dense path's seconds per iteration (the estimator's own E-step and
  M-step), timed on the first ``--dense-rows`` rows and scaled by N / rows (a dense E-step
  costs exactly N K D: it is linear in N; the M-step, O(K D), is included unscaled); for K in
  ``--dense-full-ks`` also ``--dense-full-iters`` iterations measured on all N rows.
* ``dense`` on CUDA (``--device cuda``): dense EM for ``--iters`` iterations on all rows (the
  Triton kernels), seconds per iteration and held-out quality from the same start.
* ``quality`` (CPU): where K is in ``--quality-ks``, dense and truncated EM both run ``--iters``
  iterations on the first ``--quality-rows`` rows from the same start; held-out
  log-likelihood per sample of each. On CUDA every K gets it, on all rows.

The start is k-means (FAISS two-level k-means, ``faiss.contrib.clustering``, on at most 64 K
rows; component ids randomly permuted so they carry no locality), then weights and diagonal
variances of the rows' nearest means; reg_covar is 0.1 x the mean per-feature variance (the
GMM-IVF index's default). Starts are cached under ``--cache``.

Run: ``python -m flashgmm_ivf.eval.bench_large_k --out eval/results/bench_large_k.json``;
on a GPU: ``python -m flashgmm_ivf.eval.bench_large_k --device cuda --out $OUT/bench_large_k_h100.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import faiss
import numpy as np
import torch
from flashgmm_ivf.eval.environment import environment
from flashgmm_ivf.kernels import truncated
from flashgmm_ivf.kernels.truncated import MeanIndex

from flashgmm_ivf import ConvergenceWarning, GaussianMixture, kernels
from flashgmm_ivf._chunks import ChunkSource

DATA = Path.home() / ".cache" / "flashgmm-ivf" / "data" / "sift-photos-128"
REG_COVAR_FRACTION = 0.1
THREADS_NOTE = ("1 torch / FAISS thread for both paths: with another job on the shared 2 cores, 2 threads were "
                "slower for both (measured at K=16384, 500K rows: truncated ~20 s vs ~6 s per iteration, dense "
                "~511 s vs ~319 s)")


def sync(device):
    """Wait for the device's queued work (timings of asynchronous CUDA launches)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class TimedMixture(GaussianMixture):
    """GaussianMixture that records the seconds of every EM iteration (E-step + M-step) and,
    with the truncated E-step, of every graph rebuild (part of the iteration)."""

    def _graphable(self, source, device):
        return False  # the timing hooks wait for the GPU, which a captured iteration cannot

    def _e_step(self, source, state, device):
        sync(self._device())
        self._started = time.perf_counter()
        return super()._e_step(source, state, device)

    def _m_step(self, stats, worst_rows, state, n):
        out = super()._m_step(stats, worst_rows, state, n)
        sync(self._device())
        self.seconds_.append(time.perf_counter() - self._started)
        return out

    def _fit(self, source):
        self.seconds_, self.graph_seconds_ = [], []
        return super()._fit(source)

    @property
    def _truncation(self):
        return self.__dict__.get("_timed_truncation")

    @_truncation.setter
    def _truncation(self, store):
        if store is not None:
            rebuild = store.begin_pass

            def timed(means):
                sync(means.device)
                began = time.perf_counter()
                rebuild(means)
                sync(means.device)
                self.graph_seconds_.append(time.perf_counter() - began)

            store.begin_pass = timed
        self.__dict__["_timed_truncation"] = store


def synthetic_sift(n, d=128, *, seed=0, n_clusters=20000, chunk=100_000):
    """SIFT-like uint8 rows: skewed non-negative cluster centres (gamma, mean ~21, as SIFT's
    many small and few large bins) plus Gaussian spread of per-cluster scale, clipped to 0..255.

    Returns
    -------
    ndarray of shape (n, d), uint8
    """
    rng = np.random.default_rng(seed)
    centres = rng.gamma(0.6, 35.0, size=(n_clusters, d)).astype(np.float32)
    spread = rng.uniform(4.0, 14.0, size=n_clusters).astype(np.float32)
    # Zipf-like cluster sizes: real descriptor sets are far from uniform.
    popularity = 1.0 / np.arange(1, n_clusters + 1) ** 0.5
    out = np.empty((n, d), dtype=np.uint8)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        label = rng.choice(n_clusters, size=m, p=popularity / popularity.sum())
        rows = centres[label] + rng.standard_normal((m, d), dtype=np.float32) * spread[label, None]
        out[start:start + m] = np.clip(np.rint(rows), 0, 255)
    return out


def load_rows(args):
    """(base, test, description): the real set when present, else the synthetic one."""
    if (args.data / "base.npy").exists():
        base = np.load(args.data / "base.npy", mmap_mode="r")
        base = np.ascontiguousarray(base[:args.rows] if args.rows else base)
        return base, np.load(args.data / "test.npy"), {"set": args.data.name, "synthetic": False}
    rows = synthetic_sift(args.synthetic_rows + 10_000)
    note = (f"{args.data} is absent: synthetic SIFT-like rows (eval.bench_large_k.synthetic_sift, seed 0), "
            f"{args.synthetic_rows:,} base + 10,000 test")
    print(note, flush=True)
    return rows[:args.synthetic_rows], rows[args.synthetic_rows:], {"set": "synthetic-sift-like-128",
                                                                     "synthetic": True, "note": note}


def starting_point(base, k, cache: Path, seed=0):
    """weights (K,), means (K, D), precisions (K, D) of the shared start (cached)."""
    path = cache / f"start_k{k}_n{len(base)}_seed{seed}.npz"
    if path.exists():
        with np.load(path) as f:
            return f["weights"], f["means"], f["precisions"], float(f["reg_covar"])
    rng = np.random.default_rng(seed)
    x = base.astype(np.float32)
    sample = x[rng.choice(len(x), min(len(x), 64 * k), replace=False)]
    from faiss.contrib.clustering import two_level_clustering
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        means, _ = two_level_clustering(sample, int(np.sqrt(k)), k, clustering_niter=10, seed=seed)
    means = means[rng.permutation(k)]
    index = MeanIndex(x.shape[1], k)
    index.update(means)
    label = index.search(x, 1)[:, 0]
    reg_covar = REG_COVAR_FRACTION * float(x.var(0).mean())
    counts = np.bincount(label, minlength=k).astype(np.float64)
    rows, at = torch.from_numpy(x).double(), torch.from_numpy(label)
    sums = torch.zeros(k, x.shape[1], dtype=torch.float64).index_add_(0, at, rows).numpy()
    squares = torch.zeros(k, x.shape[1], dtype=torch.float64).index_add_(0, at, rows * rows).numpy()
    # Components no row chose keep their k-means mean and the data's variance.
    safe = np.maximum(counts, 1)[:, None]
    mean = np.where(counts[:, None] > 0, sums / safe, means)
    var = np.where(counts[:, None] > 0, squares / safe - mean ** 2, x.var(0)) + reg_covar
    weights = (counts + 1) / (counts + 1).sum()
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, weights=weights, means=mean, precisions=1 / var, reg_covar=reg_covar)
    return weights, mean, 1 / var, reg_covar


def mixture(k, start, estep, iters, cls=TimedMixture, device="cpu"):
    weights, means, precisions, reg_covar = start
    return cls(k, covariance_type="diag", estep=estep, max_iter=iters, tol=0.0, reg_covar=reg_covar,
               weights_init=weights, means_init=means, precisions_init=precisions, device=device,
               random_state=0)


def fit(x, k, start, estep, iters, device="cpu"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return mixture(k, start, estep, iters, device=device).fit(x)


def estep_seconds(base, gmm, device="cuda", repeats=5):
    """Seconds of one E-step over all rows already on the device, E-step only: dense
    (``kernels.estep``) and truncated (``truncated.estep``; candidates = each row's C' nearest
    means, graph of the fitted means), medians of ``repeats`` runs after a warm-up run.
    """
    x = torch.from_numpy(base).to(device)
    shift = x[:100_000].float().mean(0)
    params = kernels.natural_params(*(torch.as_tensor(a, dtype=torch.float64)
                                      for a in (gmm.weights_, gmm.means_ - shift.double().cpu().numpy(),
                                                gmm.covariances_))).to(device, torch.float32)
    means = torch.as_tensor(gmm.means_, dtype=torch.float32, device=device)
    candidates = truncated.nearest_means(x, means, gmm.n_candidates)
    graph = truncated.exact_graph(means, gmm.n_neighbors)
    runs = {"dense": lambda: kernels.estep(x, params, shift),
            "truncated": lambda: truncated.estep(x, params, shift, candidates, graph, dtype=torch.float32)}
    out = {}
    for name, run in runs.items():
        seconds = []
        for _ in range(repeats + 1):
            sync(device)
            began = time.perf_counter()
            run()
            sync(device)
            seconds.append(time.perf_counter() - began)
        out[name] = round(statistics.median(seconds[1:]), 4)
    return out


def per_iteration(gmm):
    """Median seconds of iterations 2.. (the first also finds the starting candidates, or compiles)."""
    return round(statistics.median(gmm.seconds_[1:] or gmm.seconds_), 3)


def dense_iteration_seconds(x, k, start, budget=40.0):
    """Seconds of the estimator's dense E-step + M-step on the rows x (fewer rows than K allowed).

    Repeated twice, or once when one iteration takes more than ``budget`` seconds; the median.
    """
    gmm = mixture(k, start, "dense", 1, cls=GaussianMixture)
    gmm._check_parameters()
    source = ChunkSource(x, gmm.chunk_size)
    source.validate()
    device = torch.device("cpu")
    state = gmm._initialize(source, np.random.default_rng(0), device)
    seconds = []
    while len(seconds) < 2 and sum(seconds) < budget:
        began = time.perf_counter()
        stats, _, worst = gmm._e_step(source, state, device)
        gmm._m_step(stats, worst, state, len(x))
        seconds.append(time.perf_counter() - began)
    return statistics.median(seconds), len(seconds)


def quality(dense, trunc, rows, iters, test):
    dense_ll, trunc_ll = dense.score(test), trunc.score(test)
    return {"rows": rows, "iterations": iters, "dense_heldout_loglik_per_sample": dense_ll,
            "truncated_heldout_loglik_per_sample": trunc_ll, "relative_gap": (dense_ll - trunc_ll) / abs(dense_ll),
            "dense_final_bound": dense.lower_bound_, "truncated_final_bound": trunc.lower_bound_}


def run_k(k, base, test, args, cache):
    t0 = time.perf_counter()
    start = starting_point(base, k, cache)
    row = {"K": k, "start_seconds": round(time.perf_counter() - t0, 1)}
    trunc_iters = args.iters if k not in args.short_ks else args.short_iters
    t = fit(base, k, start, "truncated", trunc_iters, args.device)
    row["truncated"] = {"iterations": len(t.seconds_), "seconds_first_iteration": round(t.seconds_[0], 2),
                        "seconds_per_iteration": per_iteration(t),
                        "graph_seconds_per_iteration": round(statistics.median(t.graph_seconds_), 3),
                        "graph_seconds_each": [round(s, 4) for s in t.graph_seconds_],
                        "seconds_each": [round(s, 3) for s in t.seconds_],
                        "free_energy_per_sample": t.lower_bounds_,
                        "heldout_loglik_per_sample": t.score(test)}
    if args.device == "cuda":
        d = fit(base, k, start, "dense", args.iters, args.device)
        row["dense"] = {"rows_timed": len(base), "iterations_timed": len(d.seconds_),
                        "seconds_per_iteration": per_iteration(d), "seconds_each": [round(s, 3) for s in d.seconds_],
                        "scaled_linearly_in_N": False}
        row["quality"] = quality(d, t, len(base), args.iters, test)
        row["estep_only_seconds"] = estep_seconds(base, t)
    else:
        per_iter, timed = dense_iteration_seconds(base[:args.dense_rows], k, start)
        row["dense"] = {"rows_timed": args.dense_rows, "iterations_timed": timed,
                        "seconds_per_iteration_on_rows_timed": round(per_iter, 3),
                        "seconds_per_iteration": round(per_iter * len(base) / args.dense_rows, 2),
                        "scaled_linearly_in_N": args.dense_rows < len(base)}
        if k in args.dense_full_ks:
            d = fit(base, k, start, "dense", args.dense_full_iters, args.device)
            row["dense"]["measured_on_all_rows"] = {"iterations": len(d.seconds_),
                                                    "seconds_each": [round(s, 2) for s in d.seconds_]}
        if k in args.quality_ks:
            rows = base[:args.quality_rows]
            dq = fit(rows, k, start, "dense", args.iters)
            tq = t if args.quality_rows >= len(base) else fit(rows, k, start, "truncated", args.iters)
            row["quality"] = quality(dq, tq, len(rows), args.iters, test)
    row["speedup"] = round(row["dense"]["seconds_per_iteration"] / row["truncated"]["seconds_per_iteration"], 1)
    q = row.get("quality") or {}
    print(f"K={k}: truncated {row['truncated']['seconds_per_iteration']} s/iter "
          f"(graph {row['truncated']['graph_seconds_per_iteration']}), dense "
          f"{row['dense']['seconds_per_iteration']} s/iter, held-out {row['truncated']['heldout_loglik_per_sample']:.3f}"
          f", quality gap {q.get('relative_gap')}", flush=True)
    return row


def mean_after_first(timed):
    """Mean seconds of iterations 2.., where the median hides the passes that rebuild the graph
    from scratch (every ``truncated.REBUILD_EVERY``)."""
    return statistics.mean(timed["seconds_each"][1:] or timed["seconds_each"])


def table(rows, n, device):
    where = "H100" if device == "cuda" else "CPU"
    kernel_only = device == "cuda"
    lines = [(f"| K | dense s/iter ({where}) | truncated s/iter ({where}), median (mean) | of which graph | speedup | "
              + ("E-step only, dense / truncated s | " if kernel_only else "")
              + f"truncated 1st iter s | held-out ll/sample, truncated (N={n:,}) | "
              "quality: dense vs truncated held-out ll (rows, gap) |"),
             "| --- " * (9 if kernel_only else 8) + "|"]
    for r in rows:
        q = r.get("quality")
        qual = (f"{q['dense_heldout_loglik_per_sample']:.3f} vs {q['truncated_heldout_loglik_per_sample']:.3f} "
                f"({q['rows']:,} rows, {100 * q['relative_gap']:+.3f}%)") if q else "not run (dense too slow)"
        dense = r["dense"]
        full = dense.get("measured_on_all_rows")
        measured = f" (all rows, measured: {', '.join(f'{s:.0f}' for s in full['seconds_each'])})" if full else ""
        only = r.get("estep_only_seconds")
        lines.append(f"| {r['K']:,} | {dense['seconds_per_iteration']:.{1 if device == 'cpu' else 3}f}"
                     f"{'*' if dense['scaled_linearly_in_N'] else ''}{measured} | "
                     f"{r['truncated']['seconds_per_iteration']:.3f} ({mean_after_first(r['truncated']):.3f}) | "
                     f"{r['truncated'].get('graph_seconds_per_iteration', float('nan')):.3f} | "
                     f"{r['speedup']:.1f}x | "
                     + (f"{only['dense']:.4f} / {only['truncated']:.4f} | " if kernel_only else "")
                     + f"{r['truncated']['seconds_first_iteration']:.1f} | "
                     f"{r['truncated']['heldout_loglik_per_sample']:.3f} | {qual} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--synthetic-rows", type=int, default=1_000_000,
                    help="base rows of the synthetic set used when --data is absent")
    ap.add_argument("--rows", type=int, default=None, help="use the first ROWS base rows (default all)")
    ap.add_argument("--ks", default="1024,4096,16384,65536")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--short-ks", default="", help="Ks run for --short-iters truncated iterations only")
    ap.add_argument("--short-iters", type=int, default=5)
    ap.add_argument("--dense-rows", type=int, default=20000)
    ap.add_argument("--dense-full-ks", default="", help="CPU: Ks whose dense iterations are also timed on all rows")
    ap.add_argument("--dense-full-iters", type=int, default=1)
    ap.add_argument("--quality-ks", default="1024,4096")
    ap.add_argument("--quality-rows", type=int, default=100000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "flashgmm-ivf" / "bench_large_k")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    ints = lambda s: [int(v) for v in s.split(",") if v]
    args.ks, args.short_ks, args.quality_ks = ints(args.ks), ints(args.short_ks), ints(args.quality_ks)
    args.dense_full_ks = ints(args.dense_full_ks)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    base, test, args.data_info = load_rows(args)
    began, load_start = time.perf_counter(), os.getloadavg()
    rows = []
    for k in args.ks:
        rows.append(run_k(k, base, test, args, args.cache))
        write(args, rows, base, test, began, load_start)


def machine(args, load_start):
    if args.device == "cuda":
        return {"device": torch.cuda.get_device_name(), "cores": os.cpu_count(),
                "note": "graph rebuild and first candidate search: torch products on the GPU, a float16 "
                        "shortlist re-ranked in float32 (kernels.truncated.exact_graph / nearest_means); "
                        "candidate sets and the data held on the GPU (cache_data)"}
    return {"device": "cpu", "cores": os.cpu_count(), "torch_threads": args.threads,
            "processor": platform.processor() or platform.machine(),
            "note": "shared 2-core machine: other jobs ran concurrently, timings are noisy "
                    "(load average at start and end recorded)",
            "loadavg_start": load_start, "loadavg_end": os.getloadavg()}


def notes(args, n):
    if args.device == "cuda":
        out = [("dense and truncated: --iters EM iterations each on all rows from the same start on the GPU "
                "(Triton kernels: dense estep, truncated_select + truncated_stats); seconds per iteration are "
                "medians of iterations 2.. (the first compiles the kernels and, truncated, searches every row's "
                "starting candidates)")]
    else:
        out = [("dense seconds per iteration marked * are measured on the first dense_rows_timed rows and "
                "multiplied by N / rows: a dense E-step costs exactly N K D, linear in N; 'measured' values are "
                "whole dense iterations on all N rows"),
               ("seconds per iteration of truncated: median of iterations 2..; the first also searches every "
                "row's starting candidates (seconds_first_iteration)")]
        out += [THREADS_NOTE] if args.threads == 1 else []
    return out + [
        ("graph_seconds_per_iteration (median; graph_seconds_each per pass): the component graph from the "
         "means, part of the iteration: searched from scratch on pass 1 and every truncated.REBUILD_EVERY "
         f"= {truncated.REBUILD_EVERY} passes (CPU: FAISS, exact up to K = 4096, an inverted file beyond; CUDA: "
         "exact, torch on the GPU), refined from the previous graph in between (truncated.refine_graph); the "
         "table gives the median and, in brackets, the mean of iterations 2.., which counts the rebuilds"),
        ("quality relative_gap = (dense - truncated) / |dense| held-out log-likelihood per sample: "
         "target <= 0.005; negative means truncated is better"),
        "held-out log-likelihood is exact (all K components) on the test rows",
        f"N = {n:,} base rows" + ("" if args.data_info["synthetic"] else " (the full sift-photos-128 set when "
                                  "--rows is not given; the issue asks for 1M)")]


def write(args, rows, base, test, began, load_start):
    """The JSON and markdown table of the rows so far (written after every K)."""
    result = {
        "benchmark": "bench_large_k",
        "data": {**args.data_info, "base_rows": len(base), "test_rows": len(test), "dim": base.shape[1],
                 "dtype": str(base.dtype)},
        "machine": machine(args, load_start),
        "environment": environment(torch.device(args.device)),
        "settings": {"device": args.device, "covariance_type": "diag", "compute_dtype": "float32",
                     "n_candidates": 8, "n_neighbors": 12, "iterations": args.iters, "short_ks": args.short_ks,
                     "short_iters": args.short_iters, "dense_rows_timed": args.dense_rows,
                     "dense_full_ks": args.dense_full_ks, "quality_rows": args.quality_rows,
                     "torch": torch.__version__, "faiss": faiss.__version__},
        "notes": notes(args, len(base)),
        "wall_seconds": round(time.perf_counter() - began, 1),
        "rows": rows,
    }
    md = table(rows, len(base), args.device)
    if args.data_info["synthetic"]:
        md = f"Data: {args.data_info['note']}.\n\n{md}"
    if len(rows) == len(args.ks):
        print(md)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(md + "\n")


if __name__ == "__main__":
    main()
