"""Time the fused E-step over kernel configurations (blocks, warps) on a GPU; prints a table."""
from __future__ import annotations

import argparse
import itertools

import torch

from flashgmm_ivf import kernels
from flashgmm_ivf.eval.bench_estep import raw_scale_rows, starting_params, time_ms


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--covariance-type", default="diag")
    parser.add_argument("--precision", default="bf16x3")
    args = parser.parse_args(argv)
    gen = torch.Generator("cuda").manual_seed(0)
    x = raw_scale_rows(args.n, args.d, 256, gen, "cuda")
    weights, means, var, shift = starting_params(x, args.k, args.covariance_type, gen)
    params = kernels.natural_params(weights, means, var)
    block_d = kernels.default_blocks(args.d)[2]
    print(f"{'BLOCK_N':>7} {'BLOCK_K':>7} {'warps':>7} {'ms':>8}")
    for block_n, block_k, warps in itertools.product((64, 128), (64, 128), ((4, 4), (4, 8), (8, 8))):
        try:
            ms, _ = time_ms(lambda: kernels.estep(x, params, shift, precision=args.precision,
                                                  blocks=(block_n, block_k, block_d), num_warps=warps), 5)
        except Exception as err:  # out of registers or shared memory: report, keep sweeping
            print(f"{block_n:7} {block_k:7} {str(warps):>7} failed: {type(err).__name__}")
            continue
        print(f"{block_n:7} {block_k:7} {str(warps):>7} {ms:8.2f}")


if __name__ == "__main__":
    main()
