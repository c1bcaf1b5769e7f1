"""Candidate selection from precomputed products: the candidate pass for rows wide enough for library GEMMs.

``kernels.gemm.candidates`` computes, per block of rows, the bfloat16 product P of the
log-densities and, for diagonal models, the error-bound product B (``kernels.candidates``' products)
as cuBLAS GEMMs with float32 output; a spherical model's bound is the product of the rounded
rows' and weights' norms, taken here. One program owns BLOCK_N rows of P (and B): a first sweep over the
components finds each row's best lower bound m_n = max_k (l~ - e), a proven lower bound of its
best log-density; a second marks every component whose upper bound l~ + e reaches m_n less the
margin, with the candidate pass's own bound and marks (``candidates.bound_error``,
``candidates.mark``). With the products stored, the second sweep costs no product; and one
launch per block of rows keeps the host, which paces wide rows' iterations, out of the way.

Oracle: the float64 log-densities of ``kernels.reference`` (tests/test_exact_candidates.py).
"""
import torch
import triton
import triton.language as tl

from .candidates import bound_error, mark
from .tile import finish_log_prob


@triton.jit
def _tile(prod_ptr, bound_ptr, stride_p, sq, quad_ptr, const_ptr, row_norm, comp_norm_ptr, rows, row_mask, comps,
          comp_mask, eps, slack, DIAGONAL: tl.constexpr):
    """(l~, e) of a (BLOCK_N, BLOCK_K) tile."""
    offs = rows[:, None].to(tl.int64) * stride_p + comps[None, :]
    mask = row_mask[:, None] & comp_mask[None, :]
    ll = finish_log_prob(tl.load(prod_ptr + offs, mask=mask, other=0.0), sq, quad_ptr, const_ptr, comps, comp_mask,
                         DIAGONAL, True)
    if DIAGONAL:
        bound = tl.load(bound_ptr + offs, mask=mask, other=0.0)
    else:
        bound = row_norm[:, None] * tl.load(comp_norm_ptr + comps, mask=comp_mask, other=0.0)[None, :]
    return ll, bound_error(ll, bound, eps, slack)


@triton.jit
def candidate_select_kernel(prod_ptr, bound_ptr, stride_p, sq_ptr, quad_ptr, const_ptr, row_norm_ptr, comp_norm_ptr,
                            mark_ptr, n_rows, n_comps, n_words, margin, eps, slack, DIAGONAL: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    sq = tl.load(sq_ptr + rows, mask=row_mask, other=0.0)
    row_norm = sq if DIAGONAL else tl.load(row_norm_ptr + rows, mask=row_mask, other=0.0)
    # A finite floor: components at -inf (zero weight, padding) never raise it.
    best = tl.full([BLOCK_N], -3.0e38, dtype=tl.float32)
    for k0 in range(0, n_comps, BLOCK_K):
        comps = k0 + tl.arange(0, BLOCK_K)
        ll, err = _tile(prod_ptr, bound_ptr, stride_p, sq, quad_ptr, const_ptr, row_norm, comp_norm_ptr, rows,
                        row_mask, comps, comps < n_comps, eps, slack, DIAGONAL)
        best = tl.maximum(best, tl.max(ll - err, axis=1))
    floor = best - margin
    for k0 in range(0, n_comps, BLOCK_K):
        comps = k0 + tl.arange(0, BLOCK_K)
        comp_mask = comps < n_comps
        ll, err = _tile(prod_ptr, bound_ptr, stride_p, sq, quad_ptr, const_ptr, row_norm, comp_norm_ptr, rows,
                        row_mask, comps, comp_mask, eps, slack, DIAGONAL)
        mark(ll + err, floor, rows, row_mask, comps, comp_mask, k0, mark_ptr, n_words, BLOCK_N, BLOCK_K)


def candidate_select(prod, bound, sq, quad, const, margin, eps, slack, marks, *, block_n=32, block_k=128,
                     num_warps=4):
    """Launch: mark the candidates of the m rows of ``prod``.

    Parameters
    ----------
    prod : float32 Tensor of shape (m, K), unit column stride: x~ . w~
    bound : float32 Tensor of shape (m, K), |x~| . |w~| in ``prod``'s layout (diagonal models), or
        the pair (||x~||, ||w~||) of float32 Tensors of shapes (m,) and (K,) (spherical models)
    sq : float32 Tensor of shape (m,), |x - shift|^2 (read by spherical models only)
    quad : float32 Tensor of shape (K,), the spherical quadratic coefficients; None for diagonal models
    const : float32 Tensor of shape (K,), each component's constant
    margin : float, nats below the row's best lower bound that a component may lie and still be kept
    eps, slack : the bound's factors (``candidates.bound_eps`` or ``candidates.norm_bound_eps``,
        ``candidates.FLOAT32_SLACK``)
    marks : int32 output of shape (m, ceil(K / 32)), as returned by ``kernels.candidates.candidates``
    """
    m, k = prod.shape
    diagonal = quad is None
    if diagonal:
        if not isinstance(bound, torch.Tensor) or bound.shape != prod.shape or bound.stride() != prod.stride() \
                or prod.stride(1) != 1:
            raise ValueError("prod and bound must share one (m, K) layout with unit column stride")
        bound_tile, row_norm, comp_norm = bound, sq, const  # the norms' pointers go unread
    else:
        row_norm, comp_norm = bound
        if prod.stride(1) != 1 or row_norm.shape != (m,) or comp_norm.shape != (k,):
            raise ValueError(f"spherical models take prod of unit column stride and norms of shapes ({m},) and "
                             f"({k},), got {tuple(row_norm.shape)} and {tuple(comp_norm.shape)}")
        bound_tile = prod  # unread
    candidate_select_kernel[(triton.cdiv(m, block_n),)](
        prod, bound_tile, prod.stride(0), sq, const if diagonal else quad, const, row_norm, comp_norm, marks, m, k,
        marks.shape[1], float(margin), float(eps), float(slack), DIAGONAL=diagonal, BLOCK_N=block_n,
        BLOCK_K=min(block_k, max(32, triton.next_power_of_2(k))), num_warps=num_warps)
