"""Seconds per EM iteration of ``GaussianMixture.fit`` itself (kernels, M-step and the host's work).

``bench_estep`` times one iteration of the kernels and the M-step; this times the estimator
as a user runs it, on rows already on the device: one fit of ``2 + iterations`` iterations, timed
from the end of its second iteration to the end of its last, divided by ``iterations``. That leaves
out the start (validation, the hard-assignment pass, the compile, the first captures) and keeps
everything an iteration does, re-captures included. Each iteration ends in a host read of its
lower bound, so its end is a point where the device has finished it. (A difference of two fits'
times, 2 and ``2 + iterations`` iterations, carried both starts' noise: on one H100 at N = 1M,
K = 1024, seven such diag repeats spread over 2.5-4.9 ms per iteration.) Prints a table, writes JSON.

``--standardise`` scales every feature of the rows to mean 0 and variance 1 (float32, no longer
byte-sized integers: the kernels then read them as float32, and posteriors are flatter).

``--dtype uint8`` keeps the same rows (integers in 0..255) in SIFT's own storage, as a user who
passes uint8 data gets them: the device copy stays uint8 and the kernels widen it (a quarter of
float32's bytes for every pass that reads the rows).

With ``--profile`` (CUDA), each cell also gets its GPU time per iteration, by kernel: the kernel
times ``torch.profiler`` records in the same two fits, subtracted and divided the same way, so
that what the GPU does (``gpu_busy_ms``) can be set against the iteration's wall time.

With ``--anchor-dir``, IBM's Flash-GMM kernels of each covariance type in ``--cells`` are
timed on the same rows in the same run: their E-step and their README's M-step with one host read
an iteration, as ``bench_estep`` runs them (``bench_estep.anchor_methods``; median of
``iterations`` iterations after a warm-up, from ``bench_estep``'s starting parameters).

``python -m flashgmm_ivf.eval.bench_fit --out eval/results/bench_fit_h100.json``
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch

from ..mixture import GaussianMixture
from .bench_estep import Cell, anchor_methods, load_anchors, raw_scale_rows, time_ms
from .environment import environment

CELLS = (("spherical", "bf16"), ("spherical", "bf16x3"), ("diag", "bf16x3"), ("spherical", "candidates"),
         ("diag", "candidates"))


def _cells(text: str) -> tuple[tuple[str, str], ...]:
    """"diag:candidates,spherical:bf16" -> (("diag", "candidates"), ("spherical", "bf16"))."""
    cells = tuple(tuple(cell.split(":")) for cell in text.split(","))
    if any(len(cell) != 2 for cell in cells):
        raise argparse.ArgumentTypeError(f"cells are covariance_type:precision pairs, got {text!r}")
    return cells


class _ClockedMixture(GaussianMixture):
    """``GaussianMixture`` noting when each EM iteration returns (``iteration_ends``, perf_counter
    seconds): the iteration's host read of its lower bound has then waited for the device."""

    def _em_iteration(self, *args, **kwargs):
        iteration = super()._em_iteration(*args, **kwargs)

        def clocked(state, **kwargs):
            result = iteration(state, **kwargs)
            self.iteration_ends.append(time.perf_counter())
            return result
        return clocked


def _fit(x, k, covariance_type, precision, means_init, max_iter) -> _ClockedMixture:
    gmm = _ClockedMixture(k, covariance_type=covariance_type, precision=precision, max_iter=max_iter, tol=0.0,
                          means_init=means_init, device=x.device.type)
    gmm.iteration_ends = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tol=0 never converges: that is the point
        gmm.fit(x)
    return gmm


def _ms_per_iteration(x, k, covariance_type, precision, means_init, iterations) -> float:
    """Wall ms per EM iteration of one fit, from the end of its second iteration to the end of its last."""
    ends = _fit(x, k, covariance_type, precision, means_init, 2 + iterations).iteration_ends
    return (ends[-1] - ends[1]) / iterations * 1e3


def _kernel_ms(x, k, covariance_type, precision, means_init, max_iter) -> dict[str, tuple[int, float]]:
    """{kernel: (launches, GPU ms)} of one fit, from ``torch.profiler``."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        _fit(x, k, covariance_type, precision, means_init, max_iter)
    return {e.key: (e.count, e.device_time_total / 1e3) for e in prof.key_averages() if e.device_time_total > 0}


def gpu_time(x, k, covariance_type, precision, means_init, iterations, top=12) -> dict:
    """GPU ms per iteration (fit of ``2 + iterations`` less fit of 2), in all and by kernel (the
    ``top`` largest: name, launches and ms per iteration)."""
    short = _kernel_ms(x, k, covariance_type, precision, means_init, 2)
    long = _kernel_ms(x, k, covariance_type, precision, means_init, 2 + iterations)
    per = {name: ((count - short.get(name, (0, 0.0))[0]) / iterations,
                  (ms - short.get(name, (0, 0.0))[1]) / iterations) for name, (count, ms) in long.items()}
    ranked = sorted(per.items(), key=lambda item: -item[1][1])
    return {"gpu_busy_ms": sum(ms for _, ms in per.values()),
            "kernels": [{"name": name, "launches": count, "ms": ms} for name, (count, ms) in ranked[:top]]}


def run(n, k, d, iterations, repeats, device, cells=CELLS, profile=False, dtype=torch.float32, standardise=False,
        anchors=None):
    """Rows of (covariance type, precision, ms per iteration: median and all repeats; with
    ``profile``, ``gpu_time``'s GPU ms per iteration too), on rows of ``dtype`` (float32 or uint8:
    the same values), or, ``standardise``, on those rows scaled to mean 0 and variance 1 per feature;
    then, with ``anchors`` (``bench_estep.load_anchors``), a row per anchor of each covariance type
    in ``cells``, its precision the anchor's name, on the same rows as float32."""
    if standardise and dtype != torch.float32:
        raise ValueError(f"standardised rows are float32, not {dtype}")
    gen = torch.Generator(device).manual_seed(0)
    x = raw_scale_rows(n, d, 256, gen, device).to(dtype)
    if standardise:
        x = (x - x.mean(0)) / x.std(0).clamp_min(1e-12)
    means_init = x[torch.randperm(n, generator=gen, device=device)[:k]].double().cpu().numpy()
    rows = []
    for covariance_type, precision in cells:
        _fit(x, k, covariance_type, precision, means_init, 2)  # compile and warm up
        per_iteration = [_ms_per_iteration(x, k, covariance_type, precision, means_init, iterations)
                         for _ in range(repeats)]
        rows.append({"covariance_type": covariance_type, "precision": precision, "n": n, "k": k, "d": d,
                     "dtype": str(dtype).removeprefix("torch."), "standardised": standardise,
                     "ms_per_iteration": statistics.median(per_iteration), "ms_all": per_iteration})
        if profile:
            rows[-1] |= gpu_time(x, k, covariance_type, precision, means_init, iterations)
    for covariance_type in dict.fromkeys(cov for cov, _ in cells):
        cell = Cell(n, k, d, covariance_type, device, x=x.float())
        for method in anchor_methods(cell, anchors or {}):
            median, times = time_ms(method.iteration, iterations)
            rows.append({"covariance_type": covariance_type, "precision": method.name, "n": n, "k": k, "d": d,
                         "dtype": "float32", "standardised": standardise, "ms_per_iteration": median,
                         "ms_all": times})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cells", type=_cells, default=CELLS, help="covariance_type:precision,... (default: all)")
    parser.add_argument("--dtype", choices=("float32", "uint8"), default="float32",
                        help="the rows' storage (the same integer values)")
    parser.add_argument("--standardise", action="store_true", help="rows scaled to mean 0, variance 1 per feature")
    parser.add_argument("--profile", action="store_true", help="GPU time per iteration by kernel (torch.profiler)")
    parser.add_argument("--anchor-dir", help="folder with IBM Flash-GMM's flash_gmm*.py (outside the repo)")
    parser.add_argument("--out", default="eval/results/bench_fit.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.profile and device.type != "cuda":
        parser.error("--profile times GPU kernels: it needs --device cuda")
    if args.standardise and args.dtype != "float32":
        parser.error("--standardise makes float32 rows: it cannot take --dtype uint8")
    rows = run(args.n, args.k, args.d, args.iterations, args.repeats, device, args.cells, args.profile,
               getattr(torch, args.dtype), args.standardise, load_anchors(args.anchor_dir) if args.anchor_dir else None)
    print(f"{args.dtype} rows{', standardised' if args.standardise else ''}")
    print(f"{'cov':9} {'precision':34} {'ms/iter (median)':>16} {'GPU busy':>9}  all")
    for r in rows:
        busy = f"{r['gpu_busy_ms']:9.2f}" if "gpu_busy_ms" in r else f"{'':9}"
        print(f"{r['covariance_type']:9} {r['precision']:34} {r['ms_per_iteration']:16.2f} {busy}  "
              + " ".join(f"{t:.2f}" for t in r["ms_all"]))
        for kernel in r.get("kernels", ()):
            print(f"    {kernel['ms']:7.3f} ms {kernel['launches']:6.1f}x  {kernel['name'][:90]}")
    doc = {"environment": environment(device), "arguments": vars(args), "rows": rows}
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
