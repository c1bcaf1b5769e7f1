"""Time each E-step pass over launch configurations on a GPU; print a table, write the best as JSON.

``python -m flashgmm_ivf.eval.tune_estep --out tuned.json`` then
``python -m flashgmm_ivf.eval.bench_estep --configs tuned.json`` benchmarks with the winners.
``--precision candidates`` sweeps the candidate pass of the exact-on-candidates E-step instead
(``kernels.candidates``; its exact pass picks its own tiles), every configuration's marks checked
against the default's.
"""
from __future__ import annotations

import argparse
import itertools
import json

import torch
import triton

from flashgmm_ivf import kernels
from flashgmm_ivf.eval.bench_estep import raw_scale_rows, starting_params, time_ms
from flashgmm_ivf.eval.environment import environment
from flashgmm_ivf.kernels import LaunchConfig
from flashgmm_ivf.kernels.candidate_weights import candidate_weights
from flashgmm_ivf.kernels.estep import candidate_search, default_split
from flashgmm_ivf.kernels.exact_candidates import MARGIN_NATS
from flashgmm_ivf.kernels.log_norm import log_norm
from flashgmm_ivf.kernels.stats import stats

# BLOCK_D is not swept: both passes use default_configs' (D in one feature tile up to 128).
SPACES = {
    "pass 1": {"block_n": (64, 128), "block_k": (64, 128), "num_warps": (4, 8), "num_stages": (1, 2),
               "rows_first": (False, True)},
    "pass 2": {"block_n": (32, 64, 128), "block_k": (64, 128), "num_warps": (4, 8), "num_stages": (1, 2)},
    "candidate pass": {"block_n": (128, 256), "block_k": (32, 64, 128), "num_warps": (4, 8, 16),
                       "num_stages": (2, 3)},
}


def sweep(name, run, block_d):
    best = None
    rows = []
    for values in itertools.product(*SPACES[name].values()):
        config = LaunchConfig(block_d=block_d, **dict(zip(SPACES[name], values)))
        try:
            ms, _ = time_ms(lambda config=config: run(config), 3)
        except triton.runtime.errors.OutOfResources:
            print(f"{name:8} {config}: out of resources")
            continue
        print(f"{name:8} {config}: {ms:.3f} ms")
        rows.append({"config": config._asdict(), "ms": ms})
        if best is None or ms < best[0]:
            best = (ms, config)
    return best, rows


def sweep_candidates(x, params, shift, covariance_type):
    """The candidate pass's sweep on ``x`` at its default BLOCK_D, each row's threshold from its best
    component of a "bf16" ranking pass; a configuration whose marks differ from the default's is an error."""
    diagonal = covariance_type == "diag"
    cw = candidate_weights(params, x.device)
    hint = log_norm(x, shift, cw.weights, "bf16", kernels.default_configs(x.shape[1], diagonal, "bf16")[0])[1]

    def run(config):
        return candidate_search(x, shift, cw.weights, cw.search, (config, None))(x, cw.centred, MARGIN_NATS, hint)
    default = kernels.default_configs(x.shape[1], diagonal, "candidates")[0]
    expected = run(default)

    def checked(config):
        marks = run(config)
        if not torch.equal(marks, expected):
            raise AssertionError(f"{config} marks {int((marks != expected).sum())} words unlike the default's")
    return sweep("candidate pass", checked, default.block_d)


def tune_passes(x, natural, shift, covariance_type, precision, passes):
    """Sweep pass 1 and/or pass 2 of the dense E-step: {"pass1" / "pass2": ((best ms, best config), rows)}."""
    params = kernels.kernel_weights(natural, precision, "cuda")
    diagonal = covariance_type == "diag"
    defaults = kernels.default_configs(x.shape[1], diagonal, precision)
    block_d = defaults[0].block_d
    lz, _ = log_norm(x, shift, params, precision, defaults[0])
    # A pass not swept keeps its default (bench_estep --configs reads both).
    out = {"pass1": ((float("nan"), defaults[0]), []), "pass2": ((float("nan"), defaults[1]), [])}
    if "pass 1" in passes:
        out["pass1"] = sweep("pass 1", lambda c: log_norm(x, shift, params, precision, c), block_d)
    if "pass 2" in passes:
        def split(config):
            return default_split(natural.lin.shape[0], x.shape[1], diagonal, config, x.device)
        out["pass2"] = sweep("pass 2", lambda c: stats(x, shift, params, lz, split(c), precision, c), block_d)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--covariance-type", default="diag")
    parser.add_argument("--precision", default="bf16x3")
    parser.add_argument("--passes", default="pass 1,pass 2", help="dense precisions: which passes to sweep")
    parser.add_argument("--out", default="tuned_estep.json")
    args = parser.parse_args(argv)
    gen = torch.Generator("cuda").manual_seed(0)
    x = raw_scale_rows(args.n, args.d, 256, gen, "cuda")
    weights, means, var, shift = starting_params(x, args.k, args.covariance_type, gen)
    natural, shift = kernels.natural_params(weights, means, var), shift.float()
    if args.precision == "candidates":
        swept = {"candidate_pass": sweep_candidates(x, natural, shift, args.covariance_type)}
    else:
        swept = tune_passes(x, natural, shift, args.covariance_type, args.precision, args.passes.split(","))
    result = {"n": args.n, "k": args.k, "d": args.d, "covariance_type": args.covariance_type,
              "precision": args.precision, "environment": environment(x.device)}
    for name, ((ms, config), rows) in swept.items():
        result |= {name: config._asdict(), f"{name}_ms": ms, f"{name}_rows": rows}
    print(json.dumps({key: value for key, value in result.items() if not key.endswith("_rows")}))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
