"""Data-parallel EM: seconds per iteration on 1 GPU and on W GPUs, scaling efficiency, and equality.

Data: N SIFT-like uint8 rows of D = 128 (default N = 40M, 5.1 GB), drawn on the device in
blocks of ``--block-rows``; block b depends only on (seed, b), so every run sees the same data
set whatever its number of ranks, and each rank draws only its own blocks (``shard_range`` over
the blocks). Runs, each in fresh processes:

* ``single``: :class:`~flashgmm_ivf.GaussianMixture` on one device, no process group: the
  reference for time and result;
* ``dist W`` for each W in ``--worlds``: :class:`~flashgmm_ivf.distributed.DistributedGaussianMixture`
  over a process group of W ranks (NCCL, one GPU per rank, when W GPUs are there; else gloo,
  ranks sharing the device: correct, but its timing is no scaling figure).

Each run fits with ``tol=0``: one iteration from means at the first K rows (warm-up, Triton
compilation; the hard-assignment pass of that initialisation is all-reduced too), then, from
those parameters (no initialisation pass), 1 and 1 + ``--iterations`` iterations. Seconds per
iteration are the difference of those two fits' wall times over ``--iterations``: what a fit
costs once (its validation pass over the rows, the collectives that set it up) cancels, and is
reported apart as ``fixed_seconds``. The sampled initialisations (``kmeans``, ...) are left out
of the timing: the tests check that rank 0 draws the single process's sample. Scaling efficiency of W ranks is
``t_single / (W * t_W)`` (target >= 0.9); the result of every run is compared with the single
run's (target: max relative difference <= 1e-6 for weights, means, variances and lower bounds).

``python -m flashgmm_ivf.eval.bench_distributed --worlds 1,2 --out eval/results/bench_distributed_h200x2.json``
CPU check of the harness: ``... --device cpu --n 200000 --k 64 --worlds 2``.
"""
from __future__ import annotations

import argparse
import json
import math
import socket
import tempfile
import time
import warnings
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from flashgmm_ivf.distributed import DistributedGaussianMixture, shard_range
from flashgmm_ivf.eval.bench_estep import sift_like, write_json
from flashgmm_ivf.eval.environment import environment

from flashgmm_ivf import ConvergenceWarning, GaussianMixture

EFFICIENCY_BAR = 0.9
EQUALITY_BAR = 1e-6
CLUSTERS = 256  # centres of the SIFT-like generator


def draw_block(args, b, device):
    """Block ``b`` of the data set (uint8 on ``device``): a function of (seed, b) alone."""
    gen = torch.Generator(device).manual_seed(args.seed)
    draw = sift_like(args.d, CLUSTERS, gen, device)  # the centres: the same for every block
    gen.manual_seed(args.seed + 1 + b)
    return draw(min(args.block_rows, args.n - b * args.block_rows)).to(torch.uint8)


def rank_blocks(args, rank, world, device):
    """This rank's rows: the blocks ``shard_range(n_blocks, rank, world)`` of the data set."""
    n_blocks = math.ceil(args.n / args.block_rows)
    return [draw_block(args, b, device) for b in range(*shard_range(n_blocks, rank, world))]


def _timed_fits(make, blocks, means_init, iterations, device):
    """(warm-up model, model after 1 + ``iterations`` timed iterations, seconds per iteration,
    fixed seconds of a fit)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # tol=0: never converges, by design
        first = make(max_iter=1, means_init=means_init).fit_stream(blocks)
        seconds = []
        for max_iter in (1, 1 + iterations):
            sync()
            start = time.perf_counter()
            timed = make(max_iter=max_iter, weights_init=first.weights_, means_init=first.means_,
                         precisions_init=first.precisions_).fit_stream(blocks)
            sync()
            seconds.append(time.perf_counter() - start)
    per_iteration = (seconds[1] - seconds[0]) / iterations
    return first, timed, per_iteration, seconds[0] - per_iteration


def _worker(rank, world, port, args, backend, out):
    """One rank of a run; rank 0 writes the models and the timing into ``out``."""
    if backend == "nccl":
        torch.cuda.set_device(rank)
    device = torch.device(args.device, torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    if backend is not None:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=args.timeout))
    try:
        start = time.perf_counter()
        blocks = rank_blocks(args, rank, world, device)
        data_s = time.perf_counter() - start
        common = dict(covariance_type="diag", tol=0.0, device=args.device, chunk_size=args.chunk_size, verbose=0)
        if backend is None:
            make = lambda **kw: GaussianMixture(args.k, **common, **kw)
        else:
            make = lambda **kw: DistributedGaussianMixture(args.k, **common, **kw)
        means_init = draw_block(args, 0, device)[:args.k].double().cpu().numpy()  # the first K rows
        first, timed, per_iteration, fixed = _timed_fits(make, blocks, means_init, args.iterations, device)
        if rank == 0:
            first.save(Path(out) / "first.npz")
            timed.save(Path(out) / "timed.npz")
            peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
            (Path(out) / "timing.json").write_text(json.dumps(
                {"seconds_per_iteration": per_iteration, "fixed_seconds": fixed, "data_s": data_s,
                 "n_iter": timed.n_iter_, "n_reseeded": timed.n_reseeded_, "peak_gpu_gb_rank0": peak}))
    finally:
        if backend is not None:
            dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args, world, out):
    """Spawn one run (``world`` None: the single-device reference) and return its timing dict."""
    if world is None:
        backend, nprocs = None, 1
    elif args.device == "cuda" and world <= torch.cuda.device_count():
        backend, nprocs = "nccl", world
    else:
        backend, nprocs = "gloo", world
    mp.spawn(_worker, args=(nprocs, _free_port(), args, backend, out), nprocs=nprocs, join=True)
    timing = json.loads((Path(out) / "timing.json").read_text())
    return dict(timing, world=1 if world is None else world, backend=backend or "none",
                estimator="GaussianMixture" if world is None else "DistributedGaussianMixture")


def max_relative_difference(got, want) -> dict:
    """Max relative difference of each fitted quantity (means relative to the largest |mean|)."""
    rel = lambda a, b, scale: float(np.max(np.abs(np.asarray(a) - np.asarray(b)) / scale))
    return {"weights": rel(got.weights_, want.weights_, np.abs(want.weights_)),
            "means": rel(got.means_, want.means_, np.abs(want.means_).max()),
            "covariances": rel(got.covariances_, want.covariances_, np.abs(want.covariances_)),
            "lower_bounds": rel(got.lower_bounds_, want.lower_bounds_, np.abs(want.lower_bounds_))}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=40_000_000)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--worlds", default="2", help="ranks of the distributed runs, e.g. 1,2")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--block-rows", type=int, default=1 << 22)
    parser.add_argument("--chunk-size", type=int, default=1 << 22, help="rows per E-step block")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600, help="collective timeout, seconds")
    parser.add_argument("--out", help="JSON file to write")
    args = parser.parse_args(argv)
    worlds = [int(w) for w in args.worlds.split(",") if w]
    rows, models = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in [None] + worlds:
            out = Path(tmp) / ("single" if world is None else f"dist{world}")
            out.mkdir()
            row = run(args, world, out)
            models[out.name] = GaussianMixture.load(out / "timed.npz")
            row["first_iteration"] = max_relative_difference(GaussianMixture.load(out / "first.npz"),
                                                             GaussianMixture.load(Path(tmp) / "single" / "first.npz"))
            rows.append(row)
            print(f"{out.name}: {row}", flush=True)
    reference = rows[0]
    for row, model in zip(rows, models.values()):
        row["speedup"] = reference["seconds_per_iteration"] / row["seconds_per_iteration"]
        row["scaling_efficiency"] = row["speedup"] / row["world"]
        row["max_relative_difference"] = max_relative_difference(model, models["single"])
        row["equal_to_single"] = all(v <= EQUALITY_BAR for v in row["max_relative_difference"].values())
        row["timing_is_scaling"] = row["backend"] in ("none", "nccl")
    print(f"\nN={args.n} x D={args.d} uint8, K={args.k} diag, {args.iterations} timed iterations, device {args.device}")
    print(f"{'run':<10} {'ranks':>5} {'backend':>7} {'s/iter':>8} {'fixed s':>8} {'speedup':>8} {'efficiency':>10} "
          f"{'max rel diff':>12} {'equal':>6}")
    for row in rows:
        name = "single" if row["backend"] == "none" else f"dist{row['world']}"
        print(f"{name:<10} {row['world']:>5} {row['backend']:>7} {row['seconds_per_iteration']:>8.4f} "
              f"{row['fixed_seconds']:>8.3f} {row['speedup']:>8.3f} {row['scaling_efficiency']:>10.3f} "
              f"{max(row['max_relative_difference'].values()):>12.2e} {row['equal_to_single']!s:>6}")
    doc = {"benchmark": "bench_distributed", "environment": environment(torch.device(args.device)),
           "gpus": torch.cuda.device_count(), "params": vars(args),
           "targets": {"scaling_efficiency": EFFICIENCY_BAR, "max_relative_difference": EQUALITY_BAR},
           "rows": rows}
    if args.out:
        write_json(args.out, doc)
        print(f"wrote {args.out}")
    return doc


if __name__ == "__main__":
    main()
