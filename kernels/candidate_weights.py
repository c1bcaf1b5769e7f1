"""What one exact-on-candidates E-step derives from the parameters, in two launches.

From natural parameters (``kernels.params``) the E-step needs, with the largest constant split off
(``split_offset``), the bfloat16 weights of its ranking pass (``kernel_weights(..., "bf16")``), the
candidate pass's weights with its error bound folded in (``candidates.search_weights``) and the exact
pass's centred form (``exact_candidates.centred_params``). Done as torch operations on (K, D) tensors that is about 30
small launches, issued by the host while the GPU waits for them (H100, K = 1024: ~0.4 ms of an E-step
that takes 3.5 ms at N = 100K, D = 960, spherical). Here one program finds the offset, then one
program per component writes everything, working in float64.

Rounding to bfloat16 is by bits (``tile.round_bf16``: ties away from zero, where torch's cast
rounds ties to even); the search's error bound holds for either rounding.

Torch reference: ``candidate_weights_reference`` (the functions named above).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .candidates import BOUND_COLUMNS, SearchWeights, fold_factors, search_weights
from .exact_candidates import centred_params
from .params import KernelWeights, NaturalParams, kernel_weights, split_offset
from .tile import round_bf16, round_bf16_directed, split_dtype


class CandidateWeights(NamedTuple):
    """The parameters' forms one exact-on-candidates E-step reads.

    Attributes
    ----------
    weights : KernelWeights laid out for precision "bf16", const less ``offset`` (the ranking pass's)
    search : SearchWeights, the candidate pass's (``candidates.search_weights``)
    centred : (means, precisions, consts), float32, as ``exact_candidates.centred_params`` of the
        parameters with ``offset`` split off
    offset : float64 0-dim Tensor, the largest finite constant (0 if none is finite)
    """

    weights: KernelWeights
    search: SearchWeights
    centred: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    offset: torch.Tensor


@triton.jit
def offset_kernel(const_ptr, out_ptr, n_comps, BLOCK: tl.constexpr):
    """out = the largest finite constant, 0 if none is finite (``params.split_offset``)."""
    top = tl.full([BLOCK], float("-inf"), dtype=tl.float64)
    for k0 in range(0, n_comps, BLOCK):
        comps = k0 + tl.arange(0, BLOCK)
        c = tl.load(const_ptr + comps, mask=comps < n_comps, other=float("-inf")).to(tl.float64)
        # NaN fails the comparison, so it counts as not finite.
        top = tl.maximum(top, tl.where(tl.abs(c) < float("inf"), c, float("-inf")))
    best = tl.max(top, axis=0)
    tl.store(out_ptr, tl.where(best > float("-inf"), best, 0.0))


@triton.jit
def _rounded_up(v):
    """float32 values >= the float64 ones (``candidates._rounded_up``)."""
    finite = tl.abs(v) < float("inf")
    return (v + 2.0 ** -23 * tl.abs(tl.where(finite, v, 0.0))).to(tl.float32)


@triton.jit
def candidate_weights_kernel(lin_ptr, quad_ptr, const_ptr, offset_ptr, lin_out, quad_out, const_out, s_quad_out,
                             lin_quad_out, bound_out, mean_out, prec_out, centred_const_out, n_cols, fold, eps, slack,
                             DIAGONAL: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT_DTYPE: tl.constexpr):
    comp = tl.program_id(0)
    row = comp.to(tl.int64) * n_cols
    const = tl.load(const_ptr + comp).to(tl.float64) - tl.load(offset_ptr)
    if not DIAGONAL:
        quad_s = tl.load(quad_ptr + comp).to(tl.float64)
        prec_s = -2.0 * quad_s
    maha = tl.zeros([BLOCK_D], dtype=tl.float64)
    # diag: C_k of ``candidates``, sum lin~^2 / (4 |quad|); spherical: ||lin~||^2
    bound = tl.zeros([BLOCK_D], dtype=tl.float64)
    for d0 in range(0, n_cols, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = cols < n_cols
        lin = tl.load(lin_ptr + row + cols, mask=mask, other=0.0).to(tl.float64)
        if DIAGONAL:
            # Padding lanes get a finite precision: their lin is 0, so they add nothing.
            quad = tl.load(quad_ptr + row + cols, mask=mask, other=-0.5).to(tl.float64)
            prec = -2.0 * quad
        else:
            prec = prec_s
        mean = lin / prec
        maha += lin * mean
        lin_hi = round_bf16(lin.to(tl.float32))
        tl.store(lin_out + row + cols, lin_hi.to(SPLIT_DTYPE), mask=mask)
        tl.store(mean_out + row + cols, mean.to(tl.float32), mask=mask)
        lin_sq = lin_hi.to(tl.float64) * lin_hi.to(tl.float64)
        if DIAGONAL:
            s_quad = round_bf16((fold * quad).to(tl.float32)).to(SPLIT_DTYPE)
            tl.store(quad_out + row + cols, round_bf16(quad.to(tl.float32)).to(SPLIT_DTYPE), mask=mask)
            tl.store(s_quad_out + row + cols, s_quad, mask=mask)
            tl.store(lin_quad_out + 2 * row + cols, lin_hi.to(SPLIT_DTYPE), mask=mask)
            tl.store(lin_quad_out + 2 * row + n_cols + cols, s_quad, mask=mask)
            tl.store(prec_out + row + cols, prec.to(tl.float32), mask=mask)
            # 0 where lin~ is 0 (padding lanes too); inf where only quad is
            bound += tl.where(lin_sq == 0, 0.0, lin_sq / (4.0 * tl.abs(quad)))
        else:
            bound += lin_sq
    tl.store(const_out + comp, const.to(tl.float32))
    tl.store(centred_const_out + comp, (const + 0.5 * tl.sum(maha, axis=0)).to(tl.float32))
    if DIAGONAL:
        tl.store(bound_out + comp, _rounded_up(const + eps * tl.sum(bound, axis=0)))
    else:
        tl.store(quad_out + comp, quad_s.to(tl.float32))
        tl.store(prec_out + comp, prec_s.to(tl.float32))
        # ``candidates.bound_columns``
        q = (fold * quad_s).to(tl.float32)
        q1 = round_bf16(q)
        # -inf (weight 0) stays b1 = -inf, b2 = 0: only finite values go through the arithmetic,
        # which would make inf - inf of it.
        finite = tl.abs(const) < float("inf")
        c0 = tl.where(finite, const, 0.0)
        bias = _rounded_up(tl.where(finite, c0 + slack * tl.abs(c0), const))
        b0 = tl.where(tl.abs(bias) < float("inf"), bias, 0.0)
        b0_hi = round_bf16(b0)
        b1 = tl.where(tl.abs(bias) < float("inf"), b0_hi, bias)
        b2 = round_bf16_directed(b0 - b0_hi, True)
        norm = _rounded_up(tl.sqrt(tl.sum(bound, axis=0)))
        w = round_bf16_directed(_rounded_up(eps * norm.to(tl.float64)), True)
        j = tl.arange(0, 16)
        q_j = tl.where(j % 2 == 0, q1, round_bf16_directed(q - q1, True))
        terms = tl.where(j < 4, q_j, tl.where(j == 4, b1, tl.where(j == 5, b2, tl.where(j == 6, w, 0.0))))
        tl.store(bound_out + comp.to(tl.int64) * 16 + j, terms.to(SPLIT_DTYPE))


def candidate_weights(params: NaturalParams, device) -> CandidateWeights:
    """Launch: the ``CandidateWeights`` of diagonal or spherical ``params`` (any float dtype)."""
    device = torch.device(device)
    lin, quad, const = (t.to(device).contiguous() for t in (params.lin, params.quad, params.const))
    k, d = lin.shape
    diagonal = quad.dim() == 2
    dtype = split_dtype(device)
    piece = torch.bfloat16 if dtype == tl.bfloat16 else torch.float32
    f32 = dict(dtype=torch.float32, device=device)
    lin_hi = torch.empty(k, d, dtype=piece, device=device)
    quad_hi = torch.empty(k, d, dtype=piece, device=device) if diagonal else torch.empty(k, **f32)
    s_quad = torch.empty_like(quad_hi) if diagonal else None
    lin_quad = torch.empty(k, 2 * d, dtype=piece, device=device) if diagonal else None
    bound = torch.empty(k, **f32) if diagonal else torch.empty(k, BOUND_COLUMNS, dtype=piece, device=device)
    means, prec = torch.empty(k, d, **f32), torch.empty(quad_hi.shape, **f32)
    kconst, cconst = torch.empty(k, **f32), torch.empty(k, **f32)
    offset = torch.empty((), dtype=torch.float64, device=device)
    fold, eps, slack = fold_factors(d, diagonal)
    offset_kernel[(1,)](const, offset, k, BLOCK=min(1024, triton.next_power_of_2(k)))
    candidate_weights_kernel[(k,)](lin, quad, const, offset, lin_hi, quad_hi, kconst,
                                   bound if s_quad is None else s_quad, bound if lin_quad is None else lin_quad,
                                   bound, means, prec, cconst, d, fold, eps, slack,
                                   DIAGONAL=diagonal, BLOCK_D=min(256, triton.next_power_of_2(d)), SPLIT_DTYPE=dtype)
    weights = KernelWeights(lin_hi, lin_hi, quad_hi, quad_hi, kconst)
    if diagonal:
        search = SearchWeights(lin_hi, s_quad, bound, lin_quad)
    else:
        search = SearchWeights(lin_hi, columns=bound)
    return CandidateWeights(weights, search, (means, prec, cconst), offset)


def candidate_weights_reference(params: NaturalParams, device) -> CandidateWeights:
    """``candidate_weights`` by the torch functions it fuses."""
    split, offset = split_offset(params.to(device))
    weights = kernel_weights(split, "bf16", device)
    return CandidateWeights(weights, search_weights(split, device), centred_params(split), offset.double())
