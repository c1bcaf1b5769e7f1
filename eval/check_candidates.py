"""Candidates per row of the exact-on-candidates E-step on real rows, across EM (float64, CPU).

A float64 EM fit (diag or spherical, from ``bench_estep``'s start: means at random rows,
variances a quarter of the data's) runs on the first ``--n`` base rows of a data set, raw or
standardised per feature. At some iterations, on the first ``--sample`` of those rows, the
search's rule (``kernels.exact_candidates``) is replayed on float64 log-densities with what the
candidate pass's upper bound adds to them (``kernels.candidates``: diag (1 - c) Q + eps C_k,
spherical (1 - c') Q + eps' ||x~|| ||lin~|| + g_b |const|, from ``candidates.fold_factors``):

* ``stored``: slots the pass fills: components whose upper bound reaches the row's threshold,
  the exact log-density of its best component less the margin (the slots the exact pass
  evaluates, ``kernels.candidate_resp``);
* ``kept``: (row, component) pairs whose responsibility exceeds e^-margin (the statistics'
  pairs), ``within``: components within the margin of the row's best (exact);
* ``overflow``: rows with more stored slots than ``--capacity`` (they take the dense E-step).

The rounded operands' products are taken as exact: each lies within the allowance of them, so
the counts show the rule, not one rounding draw. Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from flashgmm_ivf.datasets import load_dataset
from flashgmm_ivf.eval.bench_estep import starting_params, write_json
from flashgmm_ivf.eval.environment import environment
from flashgmm_ivf.kernels.candidates import fold_factors, linear_bound
from flashgmm_ivf.kernels.exact_candidates import CAPACITY, MARGIN_NATS

from flashgmm_ivf import kernels
from flashgmm_ivf._mstep import FLOAT32_RELATIVE_FLOOR, m_step


def error_bound(xc, split):
    """(n, K) float64: what the candidate pass's upper bound adds to the log-density
    (``kernels.candidates``), for centred rows ``xc``."""
    c, eps, slack = fold_factors(xc.shape[1], split.diagonal)
    lin = split.lin.float().to(torch.bfloat16).double()
    if split.diagonal:
        quad = (1 - c) * (xc * xc) @ split.quad.abs().T
        return quad + eps * linear_bound(lin, split.quad).sum(1)[None, :]
    xb = xc.float().to(torch.bfloat16).double()
    quad = (1 - c) * (xc * xc).sum(1)[:, None] * split.quad.abs()[None, :]
    const = torch.where(torch.isfinite(split.const), split.const.abs(), 0.0)
    return quad + eps * xb.norm(dim=1)[:, None] * lin.norm(dim=1)[None, :] + slack * const[None, :]


def replay(xs, params, shift, capacity, margin):
    """The counts of the module docstring for rows ``xs`` under ``params`` (float64)."""
    split, _ = kernels.params.split_offset(params.to(dtype=torch.float32))
    split = split.to(dtype=torch.float64)
    ll = kernels.reference.weighted_log_prob(xs, split, shift)
    err = error_bound(xs - shift, split)
    stored = ll + err >= ll.amax(1, keepdim=True) - margin
    log_z = torch.logsumexp(ll, 1, keepdim=True)
    count = stored.sum(1).double()
    return {"stored_mean": float(count.mean()), "stored_p99": float(count.quantile(0.99)),
            "stored_max": int(count.max()),
            "kept_mean": float((stored & (ll - log_z > -margin)).sum(1).double().mean()),
            "within_mean": float((ll >= ll.amax(1, keepdim=True) - margin).sum(1).double().mean()),
            "bound_at_best_nats": float(err.gather(1, ll.argmax(1, keepdim=True)).mean()),
            "overflow_fraction": float((count > capacity).double().mean())}


def rows(name, kind, n):
    x = torch.from_numpy(np.asarray(load_dataset(name).base[:n], dtype=np.float64))
    if kind == "standardised":
        x = (x - x.mean(0)) / x.std(0)
    return x


def run(args, covariance_type, kind, at):
    x = rows(args.dataset, kind, args.n)
    gen = torch.Generator().manual_seed(args.seed)
    weights, means, var, shift = starting_params(x.float(), args.k, covariance_type, gen)
    out = []
    for it in range(max(at) + 1):
        params = kernels.natural_params(weights, means, var)
        if it in at:
            row = {"covariance_type": covariance_type, "data": kind, "iteration": it,
                   **replay(x[:args.sample], params, shift, args.capacity or CAPACITY[covariance_type],
                            args.margin)}
            print_row(row)
            out.append(row)
        if it < max(at):
            stats = kernels.reference.estep(x, params, shift, dtype=torch.float64)
            weights, means, var = m_step(stats, covariance_type, 1e-6, FLOAT32_RELATIVE_FLOOR)
    return out


def print_row(r):
    print(f"{r['covariance_type']:>9} {r['data']:>12} {r['iteration']:>4} {r['bound_at_best_nats']:8.1f} "
          f"{r['stored_mean']:7.1f} {r['stored_p99']:5.0f} {r['stored_max']:5d} "
          f"{r['kept_mean']:6.2f} {r['within_mean']:7.2f} {r['overflow_fraction']:9.4f}", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="sift-photos-128")
    parser.add_argument("--n", type=int, default=60_000, help="rows the EM fit runs on")
    parser.add_argument("--sample", type=int, default=4_000, help="rows the candidate rule is replayed on")
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--iterations", default="0,1,2,5,10,20")
    parser.add_argument("--covariance-types", default="diag,spherical")
    parser.add_argument("--data", default="raw,standardised")
    parser.add_argument("--capacity", type=int, help="slots per row (default: the E-step's per covariance type)")
    parser.add_argument("--margin", type=float, default=MARGIN_NATS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="eval/results/check_candidates_cpu.json")
    args = parser.parse_args(argv)
    at = sorted({int(i) for i in args.iterations.split(",")})
    print(f"{'cov':>9} {'data':>12} {'iter':>4} {'bound':>8} {'stored':>7} {'p99':>5} {'max':>5} "
          f"{'kept':>6} {'within':>7} {'overflow':>9}")
    results, start = [], time.time()
    for covariance_type in args.covariance_types.split(","):
        for kind in args.data.split(","):
            results += run(args, covariance_type, kind, at)
    write_json(args.out, {"environment": environment(), "arguments": vars(args), "rows": results,
                          "seconds": time.time() - start})


if __name__ == "__main__":
    main()
