"""Where an exact-on-candidates EM iteration spends its time, by sub-block size (CUDA only).

For the ``bench_estep`` cell (SIFT-like raw rows, N = 1M, K = 1024, D = 128 by default) and each
covariance type: the median ms of 5 EM iterations with ``precision='candidates'`` for each
``kernels.exact_candidates.SUB_BLOCK_BYTES`` given (bytes of one sub-block's candidate buffers:
each sub-block of rows ends in one host read), bf16x3 and bf16 in the same run, then a
``torch.profiler`` table of one iteration at the default size, by GPU time (kernels) and by
host time (calls, synchronisations). Prints them and writes JSON.

Run: ``python -m flashgmm_ivf.eval.profile_candidates --out eval/results/profile_candidates.json``
"""
from __future__ import annotations

import argparse
import json

import torch

from flashgmm_ivf.kernels import exact_candidates

from . import bench_estep
from .environment import environment


def profile_tables(run) -> tuple[str, str]:
    """torch.profiler tables of one call of ``run``: by GPU time, by host time."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        run()
        torch.cuda.synchronize()
    averages = prof.key_averages()
    return (averages.table(sort_by="cuda_time_total", row_limit=20),
            averages.table(sort_by="self_cpu_time_total", row_limit=20))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=float, default=1e6)
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--covariance-types", default="diag,spherical")
    parser.add_argument("--sub-block-bytes", default="100663296,402653184", help="comma-separated")
    parser.add_argument("--out", default="eval/results/profile_candidates.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("the candidates E-step's profile needs a CUDA device")
    device = torch.device("cuda")
    result = {"environment": environment(device), "arguments": vars(args), "rows": [], "profiles": {}}
    default_bytes = exact_candidates.SUB_BLOCK_BYTES
    for cov in args.covariance_types.split(","):
        cell = bench_estep.Cell(int(args.n), args.k, args.d, cov, device)
        variants = [("candidates", int(b)) for b in args.sub_block_bytes.split(",")]
        variants += [("bf16x3", None), ("bf16", None)]
        for precision, size in variants:
            exact_candidates.SUB_BLOCK_BYTES = size or default_bytes
            estep = bench_estep.blocked_estep(precision, None, False)
            ms, _ = bench_estep.time_ms(lambda: cell.iteration(estep), 5)
            result["rows"].append({"covariance_type": cov, "precision": precision, "sub_block_bytes": size, "ms": ms})
            print(f"{cov:9s} {precision:10s} sub-block bytes {size or '-':>10} {ms:7.2f} ms/iter", flush=True)
        exact_candidates.SUB_BLOCK_BYTES = default_bytes
        run = bench_estep.blocked_estep("candidates", None, False)
        cell.iteration(run)
        by_gpu, by_host = profile_tables(lambda: cell.iteration(run))
        print(by_gpu, by_host, sep="\n")
        result["profiles"][cov] = {"by_gpu_time": by_gpu, "by_host_time": by_host}
        cell = None  # free its rows before the next covariance type
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
