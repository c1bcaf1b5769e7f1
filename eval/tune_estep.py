"""Time each E-step pass over launch configurations on a GPU; print a table, write the best as JSON.

``python -m flashgmm_ivf.eval.tune_estep --out tuned.json`` then
``python -m flashgmm_ivf.eval.bench_estep --configs tuned.json`` benchmarks with the winners.
"""
from __future__ import annotations

import argparse
import itertools
import json

import torch
import triton

from flashgmm_ivf import kernels
from flashgmm_ivf.eval.bench_estep import raw_scale_rows, starting_params, time_ms
from flashgmm_ivf.kernels import LaunchConfig
from flashgmm_ivf.kernels.estep import default_split
from flashgmm_ivf.kernels.log_norm import log_norm
from flashgmm_ivf.kernels.stats import stats

# BLOCK_D is not swept: both passes use default_configs' (D in one feature tile up to 128).
SPACES = {
    "pass 1": dict(block_n=(64, 128), block_k=(64, 128), num_warps=(4, 8), num_stages=(1, 2),
                   rows_first=(False, True)),
    "pass 2": dict(block_n=(32, 64, 128), block_k=(64, 128), num_warps=(4, 8), num_stages=(1, 2)),
}


def sweep(name, run, block_d):
    best = None
    for values in itertools.product(*SPACES[name].values()):
        config = LaunchConfig(block_d=block_d, **dict(zip(SPACES[name], values)))
        try:
            ms, _ = time_ms(lambda config=config: run(config), 3)
        except triton.runtime.errors.OutOfResources:
            print(f"{name:8} {config}: out of resources")
            continue
        print(f"{name:8} {config}: {ms:.3f} ms")
        if best is None or ms < best[0]:
            best = (ms, config)
    return best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--covariance-type", default="diag")
    parser.add_argument("--precision", default="bf16x3")
    parser.add_argument("--passes", default="pass 1,pass 2")
    parser.add_argument("--out", default="tuned_estep.json")
    args = parser.parse_args(argv)
    gen = torch.Generator("cuda").manual_seed(0)
    x = raw_scale_rows(args.n, args.d, 256, gen, "cuda")
    weights, means, var, shift = starting_params(x, args.k, args.covariance_type, gen)
    params = kernels.kernel_weights(kernels.natural_params(weights, means, var), args.precision, "cuda")
    shift = shift.float()
    defaults = kernels.default_configs(args.d, args.covariance_type == "diag", args.precision)
    lz, _ = log_norm(x, shift, params, args.precision, defaults[0])
    passes = args.passes.split(",")
    block_d = defaults[0].block_d
    first = sweep("pass 1", lambda c: log_norm(x, shift, params, args.precision, c), block_d) \
        if "pass 1" in passes else (float("nan"), defaults[0])
    diagonal = args.covariance_type == "diag"
    second = sweep("pass 2", lambda c: stats(x, shift, params, lz, default_split(args.k, args.d, diagonal, c, x.device),
                                             args.precision, c), block_d) \
        if "pass 2" in passes else (float("nan"), defaults[1])
    result = {"n": args.n, "k": args.k, "d": args.d, "covariance_type": args.covariance_type,
              "precision": args.precision, "pass1": first[1]._asdict(), "pass1_ms": first[0],
              "pass2": second[1]._asdict(), "pass2_ms": second[0]}
    print(json.dumps(result))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
