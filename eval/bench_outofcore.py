"""Out-of-core EM: GaussianMixture streaming a uint8 memmap from disk vs the same fit on GPU-resident rows.

Creates (if absent, or too short) a big-ann ``.u8bin`` file of N x 128 SIFT-like uint8 rows
(default N = 200M, 25.6 GB), generated on the GPU in blocks and written by a second thread. Then:

* host-to-device bandwidth from pinned memory, and the rate one thread copies memmap rows into
  pinned memory (the two stages the stream overlaps with compute);
* the in-memory rate: ``--iterations`` EM iterations (K=1024 diag by default) over the first
  ``--in-memory-n`` rows held on the GPU;
* the out-of-core rate: the same fit over all N rows of the memmap (pinned buffers, copies on a
  side stream, ``flashgmm_ivf._chunks.device_blocks``), with the peak GPU memory of the fit
  (target: under 4 GB) and throughput as a fraction of the in-memory rate (target: 70%, or the
  host-to-device copy as the bound).

In memory, rows per second come from the median EM iteration after the first (compilation); out
of core from the median iteration, or with ``--cold`` (the file evicted from the page cache first,
so that the data comes from the disk) from the first.
``python -m flashgmm_ivf.eval.bench_outofcore --path /data/base.u8bin --out eval/results/bench_outofcore.json``
"""
from __future__ import annotations

import argparse
import os
import queue
import shutil
import statistics
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from flashgmm_ivf.datasets.bigann import read_bin
from flashgmm_ivf.eval.bench_estep import sift_like, starting_params, write_json
from flashgmm_ivf.eval.environment import environment
from tqdm.auto import tqdm

from flashgmm_ivf import ConvergenceWarning, GaussianMixture

GPU_MEMORY_BAR = 4e9
RATE_BAR = 0.7
HEADER = 8  # big-ann: uint32 n, uint32 d


def create_file(path, n, d, seed, block_rows=1 << 22):
    """Write ``n`` SIFT-like uint8 rows as a big-ann file; returns seconds taken.

    Blocks are drawn on the device, copied to pinned memory and written by a second thread,
    so generating block i+1 overlaps writing block i.
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    draw = sift_like(d, 256, torch.Generator(device).manual_seed(seed), device)
    pinned = device == "cuda"
    free = queue.Queue()
    for _ in range(2):
        free.put(torch.empty((block_rows, d), dtype=torch.uint8, pin_memory=pinned))
    full = queue.Queue()
    start = time.perf_counter()
    with open(path, "wb") as f, tqdm(total=n * d, unit="B", unit_scale=True, desc=f"writing {path}") as bar:
        np.array([n, d], dtype="<u4").tofile(f)

        def write():
            while (item := full.get()) is not None:
                buffer, rows = item
                f.write(memoryview(buffer[:rows].numpy()).cast("B"))
                bar.update(rows * d)
                free.put(buffer)

        writer = threading.Thread(target=write)
        writer.start()
        try:
            for first in range(0, n, block_rows):
                rows = min(block_rows, n - first)
                buffer = free.get()
                buffer[:rows].copy_(draw(rows).to(torch.uint8))  # synchronous: the buffer is full on return
                full.put((buffer, rows))
        finally:
            full.put(None)
            writer.join()
    return time.perf_counter() - start


def open_data(path, n, d, seed):
    """The first ``n`` rows of ``path`` as a read-only memmap and the seconds spent writing it
    (None when an existing complete file of at least ``n`` rows of width ``d`` was reused)."""
    path = Path(path)
    size = path.stat().st_size if path.exists() else 0
    have, width = (int(v) for v in np.fromfile(path, dtype="<u4", count=2)) if size >= HEADER else (0, d)
    created_s = None
    if have < n or width != d or size != HEADER + have * width:
        path.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(path.parent).free + size
        if free < HEADER + n * d:
            raise SystemExit(f"{path.parent}: {free / 1e9:.1f} GB free, the file needs {n * d / 1e9:.1f} GB; "
                             "lower --n or choose another --path")
        created_s = create_file(path, n, d, seed)
    return read_bin(path, np.uint8, count=n), created_s


def evict(path):
    """Write the file back and drop its pages from the page cache, so that the next pass reads the disk
    (pages this process has mapped and touched stay)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def filesystem(path):
    """Mount point and type of the file system holding ``path`` (the longest match in /proc/mounts)."""
    target = Path(path).resolve()
    try:
        with open("/proc/mounts") as f:
            mounts = [line.split()[1:3] for line in f]
    except OSError:
        return {"mount": None, "type": None}
    mount, kind = max((m for m in mounts if target.is_relative_to(m[0])), key=lambda m: len(m[0]),
                      default=(None, None))
    return {"mount": mount, "type": kind}


def h2d_bandwidth(mib=256, repeat=10):
    """GB/s of a pinned host-to-device copy (median of ``repeat``)."""
    host = torch.empty(mib << 20, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty_like(host, device="cuda")
    times = []
    for _ in range(repeat + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dev.copy_(host, non_blocking=True)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return host.numel() / statistics.median(times[1:]) / 1e6


def host_read_rate(data, rows, block_rows):
    """GB/s one thread copies memmap rows into pinned memory (from the middle of the file)."""
    first = max(0, len(data) // 2 - rows // 2)
    buffer = torch.empty((block_rows, data.shape[1]), dtype=torch.uint8, pin_memory=torch.cuda.is_available())
    start = time.perf_counter()
    for i in range(first, min(len(data), first + rows), block_rows):
        block = data[i:i + block_rows]
        np.copyto(buffer[:len(block)].numpy(), block)
    return min(rows, len(data)) * data.shape[1] / (time.perf_counter() - start) / 1e9


def timed_fit(x, init, args):
    """(seconds of each EM iteration, peak allocated bytes above the start, peak reserved bytes).

    One ``fit`` call per iteration (max_iter=1, then warm starts), each timed to its end: the
    estimator syncs on the lower bound, so the wall clock holds the whole pass.
    """
    # cache_data=False: the data is to be streamed on every pass, not copied to the GPU.
    gmm = GaussianMixture(args.k, covariance_type=args.covariance_type, max_iter=1, tol=0.0,
                          chunk_size=args.chunk_size, estep="dense", device="cuda", cache_data=False, **init)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    seconds = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # one iteration per call, by design
        for _ in tqdm(range(args.iterations), desc=f"EM over {len(x):,} rows", leave=False):
            start = time.perf_counter()
            gmm.fit(x)
            torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
            gmm.set_params(warm_start=True)
    return seconds, torch.cuda.max_memory_allocated() - base, torch.cuda.max_memory_reserved()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", required=True, help="the .u8bin file (created if absent or short; not under $OUT)")
    parser.add_argument("--n", type=int, default=200_000_000)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--covariance-type", default="diag")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=1 << 20, help="rows per block streamed to the GPU")
    parser.add_argument("--in-memory-n", type=int, default=10_000_000, help="rows of the GPU-resident reference")
    parser.add_argument("--cold", action="store_true",
                        help="evict the file from the page cache before the out-of-core fit (read from disk)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="eval/results/bench_outofcore.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_outofcore needs a CUDA device")
    data, created_s = open_data(args.path, args.n, args.d, args.seed)
    n = len(data)
    print(f"{args.path}: {n:,} x {data.shape[1]} uint8 ({n * data.shape[1] / 1e9:.1f} GB)"
          + (f", written in {created_s:.0f} s" if created_s else ", reused"))

    h2d = h2d_bandwidth()
    read = host_read_rate(data, min(n, 16 * args.chunk_size), args.chunk_size)
    print(f"host-to-device (pinned): {h2d:.1f} GB/s; memmap -> pinned, one thread: {read:.1f} GB/s")

    gen = torch.Generator("cuda").manual_seed(args.seed + 1)
    sample = torch.from_numpy(np.array(data[: min(n, 1_000_000)])).cuda()
    weights, means, var, shift = starting_params(sample.float(), args.k, args.covariance_type, gen)
    init = {"weights_init": weights.cpu().numpy(), "means_init": (means + shift).cpu().numpy(),
            "precisions_init": (1.0 / var).cpu().numpy()}
    del sample

    m = min(n, args.in_memory_n)
    resident = torch.from_numpy(np.array(data[:m])).cuda()
    mem_all, _, _ = timed_fit(resident, init, args)
    del resident
    mem_s = statistics.median(mem_all[1:] or mem_all)  # the first iteration compiles the kernels
    mem_rate = m / mem_s
    print(f"in memory ({m:,} rows on the GPU): {mem_s:.3f} s per iteration, {mem_rate / 1e6:.1f} M rows/s")

    if args.cold:
        evict(args.path)
    ooc_all, peak_alloc, peak_reserved = timed_fit(data, init, args)
    # Kernels are compiled by now. Cold, only the first pass reads the disk (the page cache keeps
    # what RAM holds of the file for the next ones).
    ooc_s = ooc_all[0] if args.cold else statistics.median(ooc_all)
    ooc_rate = n / ooc_s
    ratio = ooc_rate / mem_rate
    pcie_rows = h2d * 1e9 / data.shape[1]
    print(f"out of core ({n:,} rows from {args.path}): {ooc_s:.2f} s per iteration, {ooc_rate / 1e6:.1f} M rows/s "
          f"= {100 * ratio:.0f}% of in memory (host-to-device bound: {pcie_rows / 1e6:.0f} M rows/s); "
          f"peak GPU memory {peak_alloc / 1e9:.2f} GB allocated, {peak_reserved / 1e9:.2f} GB reserved "
          f"(bar {GPU_MEMORY_BAR / 1e9:.0f} GB)")
    result = {
        "environment": environment(torch.device("cuda")), "arguments": vars(args),
        "file": {"path": str(args.path), "bytes": HEADER + n * data.shape[1], "created_seconds": created_s,
                 "filesystem": filesystem(args.path), "page_cache": "evicted before the fit" if args.cold
                 else "as left by writing/reading it (warm where RAM holds it)"},
        "n": n, "d": int(data.shape[1]), "k": args.k, "covariance_type": args.covariance_type,
        "iterations": args.iterations, "chunk_size": args.chunk_size,
        "h2d_pinned_gbps": h2d, "memmap_to_pinned_one_thread_gbps": read,
        "in_memory": {"n": m, "seconds_per_iteration": mem_s, "seconds_each": mem_all, "rows_per_s": mem_rate},
        "out_of_core": {"n": n, "seconds_per_iteration": ooc_s, "seconds_each": ooc_all, "rows_per_s": ooc_rate,
                        "input_gbps": ooc_rate * data.shape[1] / 1e9,
                        "peak_gpu_bytes_allocated": peak_alloc, "peak_gpu_bytes_reserved": peak_reserved},
        "rate_fraction_of_in_memory": ratio,
        "rate_fraction_of_h2d_bound": ooc_rate / pcie_rows,
        "targets": {"peak_gpu_memory_under_4gb": peak_reserved < GPU_MEMORY_BAR,
                    "rate_at_least_70pct_of_in_memory": ratio >= RATE_BAR},
    }
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
