"""Time the statistics pass of the truncated and exact-on-candidates E-steps on balanced and skewed pairs (CUDA).

``kernels.truncated_stats.pair_stats`` sums r x and r x^2 over (row, component, r) triples. Its
cost should not depend on how the triples spread over the components: here K = 1024, 3.3
triples a row (as exact-on-candidates keeps on SIFT-like rows), with every component equally
likely, or with one component given 50% or 90% of the triples (skewed posteriors, as early EM
iterations or duplicate-heavy data give). ``--baseline FILE`` also times an earlier version of
``kernels/truncated_stats.py`` (e.g. ``git show <commit>:kernels/truncated_stats.py > FILE``) in the
same run and reports the largest relative difference of its statistics.

Run: ``python -m flashgmm_ivf.eval.bench_pair_stats --out eval/results/bench_pair_stats.json``
"""
from __future__ import annotations

import argparse
from importlib.util import module_from_spec, spec_from_file_location

import torch

from flashgmm_ivf.kernels import truncated_stats

from .bench_estep import time_ms, write_json
from .environment import environment

CASES = (("balanced", 0.0), ("one component 50%", 0.5), ("one component 90%", 0.9))
SHAPES = ((1_000_000, 128), (100_000, 960))  # (N, D)
REPEATS = 20  # timed calls per row, median


def load_baseline(path):
    """An earlier truncated_stats.py, imported inside the kernels package so its relative imports resolve."""
    spec = spec_from_file_location("flashgmm_ivf.kernels._baseline_truncated_stats", path)
    module = module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--pairs-per-row", type=float, default=3.3)
    parser.add_argument("--baseline", help="an earlier kernels/truncated_stats.py to time in the same run")
    parser.add_argument("--out", default="eval/results/bench_pair_stats.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("the statistics pass is timed on a CUDA device")
    device = torch.device("cuda")
    baseline = load_baseline(args.baseline) if args.baseline else None
    gen = torch.Generator(device).manual_seed(0)
    result = {"environment": environment(device), "arguments": vars(args), "rows": []}
    print(f"{'N':>9} {'D':>4} {'cov':9} {'case':18} {'ms':>8} {'baseline ms':>12} {'max rel diff':>12}")
    for n, d in SHAPES:
        x = (torch.rand(n, d, device=device, generator=gen) * 255).round()
        shift = x.mean(0)
        p = int(args.pairs_per_row * n)
        rows = torch.randint(n, (p,), device=device, generator=gen, dtype=torch.int32)
        resp = torch.rand(p, device=device, generator=gen)
        for case, share in CASES:
            comps = torch.randint(args.k, (p,), device=device, generator=gen, dtype=torch.int32)
            comps[torch.rand(p, device=device, generator=gen) < share] = 7
            for diagonal in (True, False):
                call = (x, shift, rows, comps, resp, args.k, diagonal)
                row = {"n": n, "d": d, "k": args.k, "pairs": p, "case": case, "diagonal": diagonal,
                       "ms": time_ms(lambda: truncated_stats.pair_stats(*call), REPEATS)[0]}
                if baseline is not None:
                    row["baseline_ms"] = time_ms(lambda: baseline.pair_stats(*call), REPEATS)[0]
                    ours, theirs = truncated_stats.pair_stats(*call), baseline.pair_stats(*call)
                    row["max_relative_difference"] = max(
                        ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item() for a, b in zip(ours, theirs))
                result["rows"].append(row)
                nan = float("nan")
                print(f"{n:9,} {d:4} {'diag' if diagonal else 'spherical':9} {case:18} {row['ms']:8.2f} "
                      f"{row.get('baseline_ms', nan):12.2f} {row.get('max_relative_difference', nan):12.1e}",
                      flush=True)
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
