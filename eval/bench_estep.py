"""Benchmark of record for one EM iteration (E-step + M-step) on a GPU.

Compares, on the same data and parameters, in one run:

* ``ours``: the fused Triton E-step (``flashgmm_ivf.kernels.estep``) at each precision;
* ``torch chunked TF32``: the torch reference in float32, 65,536 rows at a time, TF32 matmuls;
* ``torch materialised``: the torch reference over all N rows at once (an N x K matrix).

For each: median milliseconds per EM iteration, achieved TFLOP/s (12 N K D flop for diag,
the dense count), peak GPU memory above the input, and the relative error of the statistics
(N_k, S1, S2) and the max |log Z| error against a float64 run of the same E-step.
Then peak memory of ours at a larger N (the "input + 64 MB" bar).

Data: SIFT-like raw-scale rows (integers 0..255 drawn around random cluster centres), float32
on the GPU. Run: ``python -m flashgmm_ivf.eval.bench_estep --out eval/results/bench_estep.json``.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import statistics
import subprocess
import time

import torch
import triton

from flashgmm_ivf import GaussianMixture, kernels
from flashgmm_ivf._mstep import m_step

TORCH_CHUNK = 65536
CHUNK = inspect.signature(GaussianMixture).parameters["chunk_size"].default


def raw_scale_rows(n, d, clusters, gen, device):
    """(n, d) float32 integers in 0..255 around ``clusters`` centres: SIFT-like scale and spread."""
    centres = torch.rand(clusters, d, generator=gen, device=device) * 120
    spread = 5 + torch.rand(clusters, d, generator=gen, device=device) * 25
    x = torch.empty(n, d, device=device)
    for start in range(0, n, 1 << 20):
        m = min(1 << 20, n - start)
        label = torch.randint(clusters, (m,), generator=gen, device=device)
        noise = torch.randn(m, d, generator=gen, device=device)
        x[start:start + m] = (centres[label] + noise * spread[label]).round_().clamp_(0, 255)
    return x


def starting_params(x, k, covariance_type, gen):
    """Means at random rows, variances a quarter of the data's: realistic, moderately peaked posteriors."""
    x64 = x[: min(len(x), 200_000)].double()
    shift = x64.mean(0).float().double()
    means = x[torch.randint(len(x), (k,), generator=gen, device=x.device)].double() - shift
    var = x64.var(0) / 4
    var = var.expand(k, -1).clone() if covariance_type == "diag" else var.mean().expand(k).clone()
    weights = torch.full((k,), 1.0 / k, dtype=torch.float64, device=x.device)
    return weights, means, var, shift


def em_iteration(estep, x, weights, means, var, shift, covariance_type):
    stats = estep(x, kernels.natural_params(weights, means, var), shift)
    return float(stats.log_norm.sum()), m_step(stats, covariance_type, 1e-6)


def methods(precisions, configs, keep_rows=False):
    """E-step callables by name; ``keep_rows`` keeps every row's log Z (for the accuracy check only:
    an EM iteration, like GaussianMixture, keeps just its sum)."""
    def ours(precision):
        # As GaussianMixture runs it: blocks of its default chunk_size rows, statistics summed.
        def run(x, p, s):
            log_norms, total = [], None
            for i in range(0, len(x), CHUNK):
                r = kernels.estep(x[i:i + CHUNK], p, s, precision=precision, configs=configs)
                log_norms.append(r.log_norm if keep_rows else r.log_norm.sum(0, keepdim=True))
                total = list(r[1:]) if total is None else [t.add_(u) for t, u in zip(total, r[1:])]
            return kernels.EStepResult(torch.cat(log_norms), *total)
        return run

    def torch_ref(chunk, tf32):
        def run(x, p, s):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            try:
                return kernels.reference.estep(x, p, s, dtype=torch.float32, chunk_size=chunk or len(x))
            finally:
                torch.backends.cuda.matmul.allow_tf32 = False
        return run

    table = {f"ours ({p})": ours(p) for p in precisions}
    table["torch chunked TF32"] = torch_ref(TORCH_CHUNK, True)
    table["torch materialised N x K"] = torch_ref(None, False)
    return table


def time_ms(fn, repeat):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), times


def peak_above(fn, baseline_bytes):
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - baseline_bytes) / 2**20


def relative_errors(got, ref):
    rel = {name: float((g.double() - r).norm() / r.norm()) for name, g, r in
           zip(("nk", "s1", "s2"), got[1:], ref[1:])}
    rel["log_z_max_abs"] = float((got.log_norm.double() - ref.log_norm).abs().max())
    return rel


def environment():
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    props = torch.cuda.get_device_properties(0)
    return {"device": props.name, "sm_count": props.multi_processor_count, "torch": torch.__version__,
            "triton": triton.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "commit": os.environ.get("FLASHGMM_COMMIT") or commit,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def bench(n, k, d, covariance_type, precisions, configs, repeat, gen):
    x = raw_scale_rows(n, d, 256, gen, "cuda")
    weights, means, var, shift = starting_params(x, k, covariance_type, gen)
    params = kernels.natural_params(weights, means, var)
    ref = kernels.reference.estep(x, params, shift, dtype=torch.float64)
    flop = (12 if covariance_type == "diag" else 6) * n * k * d
    input_bytes = torch.cuda.memory_allocated()
    rows = []
    checked = methods(precisions, configs, keep_rows=True)
    for name, estep in methods(precisions, configs).items():
        def iteration():
            return em_iteration(estep, x, weights, means, var, shift, covariance_type)
        median, times = time_ms(iteration, repeat)
        got = checked[name](x, params, shift)
        rows.append({"method": name, "covariance_type": covariance_type, "n": n, "k": k, "d": d,
                     "ms_per_iteration": median, "ms_all": times, "tflops": flop / median / 1e9,
                     "peak_mib_above_input": peak_above(iteration, input_bytes),
                     "relative_error": relative_errors(got, ref)})
        del got
    x8 = x.to(torch.uint8)
    ours = methods(["bf16x3"], configs)["ours (bf16x3)"]
    median, times = time_ms(lambda: em_iteration(ours, x8, weights, means, var, shift, covariance_type), repeat)
    rows.append({"method": "ours (bf16x3, uint8 input)", "covariance_type": covariance_type, "n": n, "k": k,
                 "d": d, "ms_per_iteration": median, "ms_all": times, "tflops": flop / median / 1e9,
                 "relative_error": relative_errors(methods(["bf16x3"], configs, True)["ours (bf16x3)"](x8, params, shift),
                                                   ref)})
    return rows


def memory_at_scale(n, k, d, configs, gen):
    """Peak GPU memory of our EM iteration above the float32 input, at large N."""
    x = raw_scale_rows(n, d, 256, gen, "cuda")
    weights, means, var, shift = starting_params(x, k, "diag", gen)
    input_bytes = torch.cuda.memory_allocated()
    ours = methods(["bf16x3"], configs)["ours (bf16x3)"]
    peak = peak_above(lambda: em_iteration(ours, x, weights, means, var, shift, "diag"), input_bytes)
    return {"n": n, "k": k, "d": d, "input_mib": n * d * 4 / 2**20, "peak_mib_above_input": peak}


def print_table(rows):
    header = f"{'cov':9} {'method':28} {'ms/iter':>8} {'TFLOP/s':>8} {'peak MiB':>9} {'rel err N_k':>11} " \
             f"{'rel err S1':>10} {'rel err S2':>10} {'max|dlogZ|':>10}"
    print(header)
    print("-" * len(header))
    for r in rows:
        e = r["relative_error"]
        peak = f"{r['peak_mib_above_input']:9.0f}" if "peak_mib_above_input" in r else f"{'':9}"
        print(f"{r['covariance_type']:9} {r['method']:28} {r['ms_per_iteration']:8.2f} {r['tflops']:8.1f} {peak} "
              f"{e['nk']:11.1e} {e['s1']:10.1e} {e['s2']:10.1e} {e['log_z_max_abs']:10.1e}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--covariance-types", default="diag,spherical")
    parser.add_argument("--precisions", default="bf16x3,ieee,tf32x3,tf32")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--memory-n", type=int, default=10_000_000, help="N of the peak-memory check (0: skip)")
    parser.add_argument("--configs", help="JSON from tune_estep (pass1, pass2 launch configs); default: built-in")
    parser.add_argument("--out", default="eval/results/bench_estep.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_estep needs a CUDA device")
    configs = None
    if args.configs:
        with open(args.configs) as f:
            tuned = json.load(f)
        configs = (kernels.LaunchConfig(**tuned["pass1"]), kernels.LaunchConfig(**tuned["pass2"]))
    gen = torch.Generator("cuda").manual_seed(0)
    rows = []
    for cov in filter(None, args.covariance_types.split(",")):
        rows += bench(args.n, args.k, args.d, cov, args.precisions.split(","), configs, args.repeat, gen)
        torch.cuda.empty_cache()
    memory = memory_at_scale(args.memory_n, args.k, args.d, configs, gen) if args.memory_n else None
    if rows:
        print_table(rows)
    if memory:
        print(f"\npeak GPU memory of ours at N={memory['n']:,}: input {memory['input_mib']:.0f} MiB "
              f"+ {memory['peak_mib_above_input']:.1f} MiB")
    launch = configs or kernels.default_configs(args.d)
    result = {"environment": environment(), "launch_configs": [c._asdict() for c in launch], "rows": rows,
              "memory_at_scale": memory}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
