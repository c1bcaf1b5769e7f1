"""The E-step passes against the fastest attention kernels on the same shape (CUDA only).

Pass 1 (log Z) computes N x K logits and exponentiates each one; pass 2 (statistics) does the same
and adds a second product, r @ x. That is the work of an attention forward pass with N queries,
K keys and head dimension D (logits, exp, P @ V), which cuDNN and FlashAttention implement with
hand-scheduled, warp-specialised Hopper kernels. Timing ``torch.nn.functional.scaled_dot_product_attention``
on (N, K, D) in bf16 therefore shows what the best kernels available do with the work of one E-step
pass, and how far our Triton passes are from them. Also timed: the logits alone as a cuBLAS bf16 GEMM
(it writes N x K, which we never do) and the measured bf16 matmul ceiling.

``python -m flashgmm_ivf.eval.bench_ceiling --out eval/results/bench_ceiling_h100.json``
"""
from __future__ import annotations

import argparse
import json

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

from .. import kernels
from ..kernels.estep import default_configs, default_split
from ..kernels.log_norm import log_norm as launch_log_norm
from ..kernels.params import kernel_weights, split_offset
from ..kernels.stats import stats as launch_stats
from .bench_estep import matmul_ceilings, raw_scale_rows, starting_params
from .environment import environment

# (covariance type, precision): the fit's cells (see bench_fit).
CELLS = (("spherical", "bf16"), ("spherical", "bf16x3"), ("diag", "bf16x3"))
ATTENTION_BACKENDS = {"cuDNN": SDPBackend.CUDNN_ATTENTION, "FlashAttention-2": SDPBackend.FLASH_ATTENTION}


def pass_times(x, k, covariance_type, precision, gen, rep_ms, splits=()):
    """Pass 1 ms, pass 2 ms and its row splits as ``estep`` chooses them (``default_split``), and
    pass 2 ms at each of ``splits`` (how the choice compares)."""
    weights, means, var, shift = starting_params(x, k, covariance_type, gen)
    params, _ = split_offset(kernels.natural_params(weights, means, var).to(dtype=torch.float32))
    layout = kernel_weights(params, precision, x.device)
    shift = shift.float()
    first, second = default_configs(x.shape[1], covariance_type == "diag", precision)
    log_norm, _ = launch_log_norm(x, shift, layout, precision, first)

    def pass2(n_split):
        return do_bench(lambda: launch_stats(x, shift, layout, log_norm, n_split, precision, second), rep=rep_ms)

    n_split = default_split(k, x.shape[1], covariance_type == "diag", second, x.device)
    return {"pass1_ms": do_bench(lambda: launch_log_norm(x, shift, layout, precision, first), rep=rep_ms),
            "pass2_ms": pass2(n_split), "pass2_splits": n_split,
            "pass2_ms_by_splits": {s: pass2(s) for s in splits}}


def attention_times(n, k, d, device, rep_ms):
    """ms of an attention forward pass (n queries, k keys, head dim d, bf16) per backend."""
    gen = torch.Generator(device).manual_seed(1)
    q, key, value = (torch.randn(1, 1, m, d, generator=gen, device=device, dtype=torch.bfloat16)
                     for m in (n, k, k))
    out = {}
    for name, backend in ATTENTION_BACKENDS.items():
        try:
            with sdpa_kernel(backend):
                out[name] = do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, key, value),
                                     rep=rep_ms)
        except RuntimeError as err:  # a backend this build or card lacks
            out[name] = f"not run: {str(err).splitlines()[0][:160]}"
    out["cuBLAS logits only (writes N x K)"] = do_bench(lambda: q[0, 0] @ key[0, 0].T, rep=rep_ms)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1 << 20)
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--rep-ms", type=int, default=300, help="timing window per measurement (do_bench)")
    parser.add_argument("--splits", default="", help="also time pass 2 at these row splits, e.g. 31,33,66")
    parser.add_argument("--out", default="eval/results/bench_ceiling.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_ceiling times CUDA kernels against cuDNN attention: it needs a CUDA device")
    device = torch.device("cuda")
    gen = torch.Generator(device).manual_seed(0)
    x = raw_scale_rows(args.n, args.d, 256, gen, device)
    rows = []
    for covariance_type, precision in CELLS:
        splits = [int(s) for s in args.splits.split(",") if s]
        rows.append({"method": f"ours, {covariance_type} {precision}",
                     **pass_times(x, args.k, covariance_type, precision, gen, args.rep_ms, splits)})
    attention = attention_times(args.n, args.k, args.d, device, args.rep_ms)
    ceilings = matmul_ceilings(8192, device)
    print(f"N={args.n:,} K={args.k} D={args.d}; bf16 matmul ceiling {ceilings['bf16']:.0f} TFLOP/s")
    print(f"{'E-step pass':34} {'pass 1 ms':>9} {'pass 2 ms':>9} {'splits':>6}  pass 2 ms at other splits")
    for r in rows:
        print(f"{r['method']:34} {r['pass1_ms']:9.3f} {r['pass2_ms']:9.3f} {r['pass2_splits']:6}  "
              + ", ".join(f"{s}: {ms:.3f}" for s, ms in r["pass2_ms_by_splits"].items()))
    print("attention forward on the same shape (logits, exp, P @ V), bf16:")
    for name, ms in attention.items():
        print(f"  {name:32} " + (f"{ms:9.3f} ms" if isinstance(ms, float) else ms))
    doc = {"environment": environment(device), "arguments": vars(args), "passes": rows,
           "attention_forward_ms": attention, "matmul_ceilings_tflops": ceilings}
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
