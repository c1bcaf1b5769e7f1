"""The exact-on-candidates E-step: a bfloat16 search, then float32 log Z and statistics.

A dense E-step must compute every (row, component) log-density accurately, because it cannot
know in advance which ones carry mass. Real posteriors are sparse (SIFT, K = 1024: about two
components per row within 40 nats of the best), so this E-step splits the work:

1. the search (``kernels.candidates``, fused after a bfloat16 pass 1 that ranks the components,
   ``kernels.log_norm``; ``kernels.gemm.candidates``, library products for wide rows): one
   bfloat16 product per tile pair gives every log-density with a proven error bound. Each row's
   threshold is the exact log-density (``kernels.exact_log_prob``) of the component its
   approximate log-densities rank first, less ``MARGIN_NATS``: a lower bound of the row's best,
   within round-off of it wherever the bfloat16 ranking is right. The row keeps every component
   whose upper bound reaches the threshold. A component left out is more than ``MARGIN_NATS``
   below the best, so all left out together carry at most K e^-30 ~ 1e-10 of the row's mass.
2. ``kernels.candidate_resp``: log Z and the responsibilities over the candidates, in float32
   from centred differences (x - mu).
3. ``kernels.truncated_stats.pair_stats``: N_k, S1, S2 as float64 segment sums over the
   (row, component, r) triples whose r exceeds e^-MARGIN_NATS, sorted by component.

Rows with more than ``capacity`` candidates (flat posteriors: early iterations, standardised
data) take the dense E-step, given as ``dense``.
"""
from __future__ import annotations

import math

import torch

from .candidate_resp import candidate_resp
from .exact_log_prob import exact_log_probs
from .params import NaturalParams
from .result import EStepResult
from .truncated_stats import pair_stats

MARGIN_NATS = 30.0
# Candidate slots per row, by covariance type; rows beyond take the dense path. Replayed in
# float64 on 60,000 real SIFT rows, K = 1024, EM iterations 0-20 from bench_estep's start
# (eval/check_candidates.py, eval/results/check_candidates_*_sift_cpu.json): diag rows store
# 11-20 slots (p99 26-76) of which 4-8 are live, 1.8% overflow 64 slots at iteration 20;
# spherical posteriors are flatter (11-21 components within 30 nats), rows store 29-44 slots
# (p99 79-122): 64 slots overflow 4-20% of them, 128 slots 0-1%.
CAPACITY = {"diag": 64, "spherical": 128}
# Candidate slots that exist at once: slots and responsibilities take 8 bytes a slot (128 MB).
# Each sub-block ends in one host read (the count of its kept pairs), and the GPU idles while the host launches the next: fewer, larger sub-blocks idle it less (H100, N = 1M,
# K = 1024, D = 128: diag 22.7 ms per iteration at 2^23 slots, 22.2 at 2^24; spherical 19.5, 17.4).
SLOT_BUDGET = 1 << 24


def centred_params(params: NaturalParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(means, precisions, consts) in float32 from natural parameters (worked out in float64):
    log pi_k + log N(x | k) = consts_k - 1/2 sum_d precisions_kd (x_d - means_kd)^2."""
    quad, lin, const = (t.double() for t in (params.quad, params.lin, params.const))
    prec = -2.0 * quad
    means = lin / (prec if params.diagonal else prec[:, None])
    consts = const + 0.5 * (lin * means).sum(1)
    return tuple(t.float().contiguous() for t in (means, prec, consts))


def estep(x, params: NaturalParams, shift, diagonal, search, dense, *, capacity=None, margin=MARGIN_NATS):
    """Exact-on-candidates E-step of a block of rows.

    Parameters
    ----------
    x : Tensor of shape (n, D), n > 0, unit column stride, on the kernels' device
    params : NaturalParams relative to ``shift``, its largest constant split off
        (``params.split_offset``)
    shift : float32 Tensor of shape (D,)
    diagonal : bool, whether the mixture is diagonal (else spherical)
    search : callable (rows, threshold, capacity) -> (cand, count), the candidate search
        (``kernels.candidates.candidates`` after a ranking pass, or ``kernels.gemm.candidates``)
        of a block of rows; ``threshold(rows, top)`` gives the rows' thresholds from the
        components ``top`` their approximate log-densities rank first
    dense : callable (rows) -> EStepResult (log_norm float64 without the offset), the dense
        E-step of the rows that overflow their capacity
    capacity : int, candidate slots per row, or None for ``CAPACITY``
    margin : float, nats

    Returns
    -------
    EStepResult, float64 (log_norm without the offset), and the number of overflowed rows
    """
    capacity = capacity or CAPACITY["diag" if diagonal else "spherical"]
    means, prec, consts = centred_params(params)

    def threshold(rows, top):
        return exact_log_probs(rows, shift, means, prec, consts, top).sub_(margin)

    log_norm = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    rows, comps, resp, counts = [], [], [], []
    sub_block = max(1, SLOT_BUDGET // capacity)
    for start in range(0, x.shape[0], sub_block):
        part = x[start:start + sub_block]
        cand, count = search(part, threshold, capacity)
        lz, r = candidate_resp(part, shift, means, prec, consts, cand, count)
        log_norm[start:start + len(part)] = lz
        kept = torch.nonzero(r.view(-1) > math.exp(-margin)).view(-1)
        rows.append(torch.div(kept, capacity, rounding_mode="floor").to(torch.int32) + start)
        comps.append(cand.view(-1)[kept])
        resp.append(r.view(-1)[kept])
        counts.append(count)
    nk, s1, s2 = pair_stats(x, shift, torch.cat(rows), torch.cat(comps), torch.cat(resp), len(consts), diagonal)
    over = torch.nonzero(torch.cat(counts) > capacity).view(-1)
    if over.numel():
        rest = dense(x[over])
        log_norm[over] = rest.log_norm
        nk, s1, s2 = nk + rest.nk, s1 + rest.s1, s2 + rest.s2
    return EStepResult(log_norm, nk, s1, s2), over.numel()
