"""Candidate pass of the exact-on-candidates E-step: every component that can matter to a row.

One program owns BLOCK_N rows and streams over all K components in (BLOCK_N, BLOCK_K) tiles of
log-densities computed with one bfloat16 product (``tile``'s "bf16" scheme). Each approximate
log-density l~ comes with a proven error bound e_nk >= |l~ - l|, itself one more bfloat16
product, of the absolute values of the same rounded operands:

    e_nk = EPS * (|lin~_k| . |x~_n| + |quad~_k| . x~_n^2)   (spherical: no quad term)
           + 2^-20 |l~|                                      (float32 constants and sums)

Rounding a to a~ (bfloat16, u = 2^-8) gives |a~ b~ - a b| <= (2u + u^2) |a| |b| and |a| <= |a~| /
(1 - u); EPS (``bound_eps``) is (2u + u^2) / (1 - u)^2 with room for the float32 sums of the
products. The bound follows each term's size: a norm (Cauchy-Schwarz) bound instead is tens
of nats loose on fitted SIFT models, whose variances differ by orders of magnitude between
features. The running best lower bound m_n = max_k (l~ - e) only grows, so a component is
stored when its upper bound l~ + e reaches m_n - ``margin`` at the time its tile is seen:
nothing whose exact log-density is within ``margin`` nats of the row's best is ever left out.
Entries stored before m_n grew may lie below the final threshold; the exact pass skips them by
their stored upper bound. Positions come from a running count per row plus a prefix sum over
the tile; the count goes on past ``capacity``, so rows that overflow are known.

Oracle: the float64 log-densities of ``kernels.reference`` (tests/test_exact_candidates.py).
"""
import torch
import triton
import triton.language as tl

from .tile import finish_log_prob, log_prob_part, row_operands, split_dtype

_U = 2.0 ** -8  # bfloat16 unit round-off
# Relative slack for the float32 parts of a log-density (constants, the spherical |x|^2 term).
FLOAT32_SLACK = 2.0 ** -20


def bound_eps(n_terms: int) -> float:
    """EPS of the module docstring for log-densities that sum ``n_terms`` products.

    Operand rounding gives (2u + u^2) / (1 - u)^2 of S = sum |a~| |b~|; the float32 sum of the
    log-density's products adds at most g S, g = n u32 / (1 - n u32) (Higham's gamma_n); and the
    float32 bound product itself may come out as low as (1 - g) S.
    """
    gamma = n_terms * 2.0 ** -24 / (1 - n_terms * 2.0 ** -24)
    return ((2 * _U + _U * _U) / (1 - _U) ** 2 + gamma) / (1 - gamma)


def n_terms(n_features: int, diagonal: bool) -> int:
    """Products summed in one log-density: x . lin and x^2 . quad (diag), x . lin (spherical)."""
    return 2 * n_features if diagonal else n_features


def abs_weights(weights):
    """(|lin~|, |quad~|): the absolute rounded weights of the error-bound product (spherical
    models: |quad~| is unused and repeats the (K,) vector)."""
    quad = weights.quad_hi.abs() if weights.diagonal else weights.quad_hi
    return weights.lin_hi.abs().contiguous(), quad.contiguous()


@triton.jit
def _tile(x_ptr, stride_x, shift_ptr, lin_ptr, quad_ptr, abs_lin_ptr, abs_quad_ptr, rows, row_mask, comps,
          comp_mask, cols, n_cols, DIAGONAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
          SPLIT_DTYPE: tl.constexpr):
    """One feature tile's (log-density part, error-bound part, sum of x^2), (BLOCK_N, BLOCK_K)."""
    x, _, xx, _, sq = row_operands(x_ptr, stride_x, shift_ptr, rows, row_mask, cols, n_cols,
                                   DIAGONAL, "bf16", SPLIT_DTYPE)
    part = log_prob_part(lin_ptr, lin_ptr, quad_ptr, quad_ptr, comps, comp_mask, cols, n_cols,
                         x, x, xx, xx, DIAGONAL, BLOCK_K, BLOCK_N, "bf16", True)
    ax = tl.abs(x)
    bound = log_prob_part(abs_lin_ptr, abs_lin_ptr, abs_quad_ptr, abs_quad_ptr, comps, comp_mask, cols, n_cols,
                          ax, ax, xx, xx, DIAGONAL, BLOCK_K, BLOCK_N, "bf16", True)
    return part, bound, sq


@triton.jit
def candidates_kernel(x_ptr, stride_x, shift_ptr, lin_ptr, quad_ptr, const_ptr, abs_lin_ptr, abs_quad_ptr,
                      cand_ptr, upper_ptr, count_ptr, floor_ptr, n_rows, n_comps, n_cols, margin, eps, slack,
                      CAPACITY: tl.constexpr, DIAGONAL: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, ONE_TILE: tl.constexpr,
                      SPLIT_DTYPE: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    if ONE_TILE:
        cols = tl.arange(0, BLOCK_D)
        x, _, xx, _, sq_norm = row_operands(x_ptr, stride_x, shift_ptr, rows, row_mask, cols, n_cols,
                                            DIAGONAL, "bf16", SPLIT_DTYPE)
        ax = tl.abs(x)
    # A finite floor: components at -inf (zero weight, padding) never raise it.
    best = tl.full([BLOCK_N], -3.0e38, dtype=tl.float32)
    count = tl.zeros([BLOCK_N], dtype=tl.int32)
    # This program's slots, addressed by 32-bit offsets from one 64-bit base: (BLOCK_N, BLOCK_K)
    # tiles of 64-bit row offsets would take registers the products need.
    pid = tl.program_id(0).to(tl.int64)
    cand_ptr += pid * BLOCK_N * CAPACITY
    upper_ptr += pid * BLOCK_N * CAPACITY
    out_rows = tl.arange(0, BLOCK_N) * CAPACITY
    for k0 in range(0, n_comps, BLOCK_K):
        comps = k0 + tl.arange(0, BLOCK_K)
        comp_mask = comps < n_comps
        if ONE_TILE:
            ll = log_prob_part(lin_ptr, lin_ptr, quad_ptr, quad_ptr, comps, comp_mask, cols, n_cols,
                               x, x, xx, xx, DIAGONAL, BLOCK_K, BLOCK_N, "bf16", True)
            err = log_prob_part(abs_lin_ptr, abs_lin_ptr, abs_quad_ptr, abs_quad_ptr, comps, comp_mask, cols,
                                n_cols, ax, ax, xx, xx, DIAGONAL, BLOCK_K, BLOCK_N, "bf16", True)
        else:
            ll = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
            err = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
            sq_norm = tl.zeros([BLOCK_N], dtype=tl.float32)
            for d0 in range(0, n_cols, BLOCK_D):
                part, bound, sq = _tile(x_ptr, stride_x, shift_ptr, lin_ptr, quad_ptr, abs_lin_ptr, abs_quad_ptr,
                                        rows, row_mask, comps, comp_mask, d0 + tl.arange(0, BLOCK_D), n_cols,
                                        DIAGONAL, BLOCK_N, BLOCK_K, SPLIT_DTYPE)
                ll += part
                err += bound
                sq_norm += sq
        ll = finish_log_prob(ll, sq_norm, quad_ptr, const_ptr, comps, comp_mask, DIAGONAL, True)
        lower, upper = bounds(ll, err, eps, slack)
        best = tl.maximum(best, tl.max(lower, axis=1))
        count = keep(upper, best - margin, count, comps, row_mask, cand_ptr, upper_ptr, out_rows, CAPACITY)
    tl.store(count_ptr + rows, count, mask=row_mask)
    tl.store(floor_ptr + rows, best - margin, mask=row_mask)


@triton.jit
def bounds(ll, bound, eps, slack):
    """(l~ - e, l~ + e) from approximate log-densities and their error-bound product."""
    # min(): -inf log-densities keep a finite bound, so l~ +- e stays -inf (not NaN).
    err = eps * bound + slack * tl.minimum(tl.abs(ll), 3.0e38)
    return ll - err, ll + err


@triton.jit
def keep(upper, floor, count, comps, row_mask, cand_ptr, upper_ptr, out_rows, CAPACITY: tl.constexpr):
    """Store a tile's components whose upper bound reaches the row's floor in the row's next
    slots (``out_rows``: each row's first slot); return the running count, which goes on past
    ``CAPACITY`` so that overflowing rows are known."""
    take = (upper >= floor[:, None]) & row_mask[:, None]
    place = count[:, None] + tl.cumsum(take.to(tl.int32), axis=1) - 1
    at = out_rows[:, None] + place
    stored = take & (place < CAPACITY)
    tl.store(cand_ptr + at, comps[None, :], mask=stored)
    tl.store(upper_ptr + at, upper, mask=stored)
    return count + tl.sum(take.to(tl.int32), axis=1)


def candidates(x, shift, weights, margin, capacity, config, bound_weights=None):
    """Launch the candidate pass.

    Parameters
    ----------
    x : Tensor of shape (n, D), unit column stride
    shift : float32 Tensor of shape (D,)
    weights : KernelWeights laid out for precision "bf16"
    margin : float, nats below the row's best (lower bound) that a component may lie and still be kept
    capacity : int, candidate slots per row
    config : LaunchConfig (``rows_first`` tiles)
    bound_weights : ``abs_weights(weights)``, or None to compute them here

    Returns
    -------
    cand : int32 Tensor of shape (n, capacity), the first min(count, capacity) slots written
    upper : float32 Tensor of shape (n, capacity), each stored candidate's upper bound
    count : int32 Tensor of shape (n,), candidates found (> capacity: the row overflowed)
    floor : float32 Tensor of shape (n,), the row's threshold: best lower bound - margin
    """
    n, d = x.shape
    abs_lin, abs_quad = bound_weights or abs_weights(weights)
    cand = torch.empty(n, capacity, dtype=torch.int32, device=x.device)
    upper = torch.empty(n, capacity, dtype=torch.float32, device=x.device)
    count = torch.empty(n, dtype=torch.int32, device=x.device)
    floor = torch.empty(n, dtype=torch.float32, device=x.device)
    candidates_kernel[(triton.cdiv(n, config.block_n),)](
        x, x.stride(0), shift, weights.lin_hi, weights.quad_hi, weights.const, abs_lin, abs_quad,
        cand, upper, count, floor, n, weights.n_comps, d, float(margin), bound_eps(n_terms(d, weights.diagonal)),
        FLOAT32_SLACK,
        CAPACITY=capacity, DIAGONAL=weights.diagonal, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        BLOCK_D=config.block_d, ONE_TILE=d <= config.block_d, SPLIT_DTYPE=split_dtype(x.device),
        num_warps=config.num_warps, num_stages=config.num_stages)
    return cand, upper, count, floor

