"""Candidate selection from precomputed products: the candidate pass for rows wide enough for library GEMMs.

``kernels.gemm.candidates`` computes, per block of rows, the bfloat16 product P of the
log-densities and the error-bound product B (``kernels.candidates``' two products) as cuBLAS
GEMMs with float32 output. One program owns BLOCK_N rows of P and B: a first sweep over the
components ranks them by their approximate log-densities l~; the exact log-density of each row's
first (``kernels.exact_log_prob``) less the margin is the row's threshold; a second sweep keeps
every component whose upper bound l~ + e reaches it, with the candidate pass's own bound and
slot layout (``candidates.upper_bound``, ``candidates.keep``). One launch per block of rows:
wide rows' iterations are paced by the host's launches.

Oracle: the float64 log-densities of ``kernels.reference`` (tests/test_exact_candidates.py).
"""
import triton
import triton.language as tl

from .candidates import keep, upper_bound
from .exact_log_prob import exact_log_prob, feature_tile
from .tile import finish_log_prob
from .truncated_select import load_rows


@triton.jit
def _log_prob(prod_ptr, stride_p, sq, quad_ptr, const_ptr, rows, row_mask, comps, comp_mask, DIAGONAL: tl.constexpr):
    offs = rows[:, None].to(tl.int64) * stride_p + comps[None, :]
    mask = row_mask[:, None] & comp_mask[None, :]
    ll = finish_log_prob(tl.load(prod_ptr + offs, mask=mask, other=0.0), sq, quad_ptr, const_ptr, comps, comp_mask,
                         DIAGONAL, True)
    return ll, offs, mask


@triton.jit
def candidate_select_kernel(prod_ptr, bound_ptr, stride_p, sq_ptr, quad_ptr, const_ptr, x_ptr, stride_x, shift_ptr,
                            mean_ptr, prec_ptr, cconst_ptr, cand_ptr, count_ptr, n_rows, n_comps, n_cols, margin, eps,
                            slack, CAPACITY: tl.constexpr, DIAGONAL: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, ONE_TILE: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    sq = tl.load(sq_ptr + rows, mask=row_mask, other=0.0)
    # A finite floor: components at -inf (zero weight, padding) never win the ranking.
    top_ll = tl.full([BLOCK_N], -3.0e38, dtype=tl.float32)
    top = tl.zeros([BLOCK_N], dtype=tl.int32)
    for k0 in range(0, n_comps, BLOCK_K):
        comps = k0 + tl.arange(0, BLOCK_K)
        ll, _, _ = _log_prob(prod_ptr, stride_p, sq, quad_ptr, const_ptr, rows, row_mask, comps, comps < n_comps,
                             DIAGONAL)
        tile_max = tl.max(ll, axis=1)
        top = tl.where(tile_max > top_ll, tl.argmax(ll, axis=1).to(tl.int32) + k0, top)
        top_ll = tl.maximum(top_ll, tile_max)
    if ONE_TILE:
        x_tile = load_rows(x_ptr, stride_x, shift_ptr, rows, row_mask, tl.arange(0, BLOCK_D), n_cols)
    else:
        x_tile = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    floor = exact_log_prob(x_ptr, stride_x, shift_ptr, x_tile, mean_ptr, prec_ptr, cconst_ptr, rows, row_mask,
                           top.to(tl.int64), n_cols, DIAGONAL, ONE_TILE, BLOCK_D) - margin
    count = tl.zeros([BLOCK_N], dtype=tl.int32)
    cand_ptr += tl.program_id(0).to(tl.int64) * BLOCK_N * CAPACITY
    out_rows = tl.arange(0, BLOCK_N) * CAPACITY
    for k0 in range(0, n_comps, BLOCK_K):
        comps = k0 + tl.arange(0, BLOCK_K)
        ll, offs, mask = _log_prob(prod_ptr, stride_p, sq, quad_ptr, const_ptr, rows, row_mask, comps,
                                   comps < n_comps, DIAGONAL)
        upper = upper_bound(ll, tl.load(bound_ptr + offs, mask=mask, other=0.0), eps, slack)
        count = keep(upper, floor, count, comps, row_mask, cand_ptr, out_rows, CAPACITY)
    tl.store(count_ptr + rows, count, mask=row_mask)


def candidate_select(prod, bound, sq, quad, const, x, shift, centred, margin, eps, slack, cand, count, *, block_n=32,
                     block_k=128, num_warps=4):
    """Launch: fill the candidate slots of the m rows of ``prod``.

    Parameters
    ----------
    prod, bound : float32 Tensors of shape (m, K), unit column stride: x~ . w~ and |x~| . |w~|
    sq : float32 Tensor of shape (m,), |x - shift|^2 (read by spherical models only)
    quad : float32 Tensor of shape (K,), the spherical quadratic coefficients; None for diagonal models
    const : float32 Tensor of shape (K,), each component's constant
    x : Tensor of shape (m, D), unit column stride: the rows themselves
    shift : float32 Tensor of shape (D,)
    centred : (means, precisions, consts) of ``exact_candidates.centred_params``
    margin : float, nats below the exact log-density of the row's first-ranked component
    eps, slack : the bound's factors (``candidates.bound_eps``, ``candidates.FLOAT32_SLACK``)
    cand, count : outputs of shapes (m, capacity), (m,), as returned by ``kernels.candidates.candidates``
    """
    m, k = prod.shape
    if bound.shape != prod.shape or bound.stride() != prod.stride() or prod.stride(1) != 1:
        raise ValueError("prod and bound must share one (m, K) layout with unit column stride")
    diagonal = quad is None
    block_d, one_tile = feature_tile(x.shape[1])
    candidate_select_kernel[(triton.cdiv(m, block_n),)](
        prod, bound, prod.stride(0), sq, const if diagonal else quad, const, x, x.stride(0), shift, *centred,
        cand, count, m, k, x.shape[1], float(margin), float(eps), float(slack), CAPACITY=cand.shape[1],
        DIAGONAL=diagonal, BLOCK_N=block_n, BLOCK_K=min(block_k, max(16, triton.next_power_of_2(k))),
        BLOCK_D=block_d, ONE_TILE=one_tile, num_warps=num_warps)
