"""Candidate pass of the exact-on-candidates E-step: every component that can matter to a row.

One program owns BLOCK_N rows and streams over all K components in (BLOCK_N, BLOCK_K) tiles of
log-densities computed with one bfloat16 product (``tile``'s "bf16" scheme). Each approximate
log-density l~ comes with a proven error bound e_nk >= |l~ - l|:

    e_nk = EPS * (|lin_k| |x_n| + |quad_k| |x_n^2|)   (Euclidean norms; spherical: no quad term)
           + 2^-20 |l~|                                  (float32 constants and sums)

where EPS covers rounding both operands to bfloat16 (2 u + u^2, u = 2^-8) and float32
accumulation over D terms. The running best lower bound m_n = max_k (l~ - e) only grows, so a
component is stored when its upper bound l~ + e reaches m_n - ``margin`` at the time its tile is
seen: nothing whose exact log-density is within ``margin`` nats of the row's best is ever left
out. Entries stored before m_n grew may lie below the final threshold; the exact pass skips
them by their stored upper bound. Positions come from a running count per row plus a prefix sum
over the tile; the count goes on past ``capacity``, so rows that overflow are known.

Oracle: the float64 log-densities of ``kernels.reference`` (tests/test_exact_candidates.py).
"""
import torch
import triton
import triton.language as tl

from .tile import (
    finish_log_prob,
    log_prob_part,
    log_prob_streamed,
    row_operands,
    split_dtype,
)

# bfloat16 keeps 8 significant bits: each rounded operand is within u = 2^-8 (relative), a
# product of two within 2u + u^2.
BF16_PRODUCT_EPS = 2.0 ** -7 + 2.0 ** -16
# Relative slack for the float32 parts of a log-density (constants, |x|^2 quad, sums).
FLOAT32_SLACK = 2.0 ** -20


def error_scales(lin: torch.Tensor, quad: torch.Tensor, n_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per component, the factors of |x_n| and |x_n^2| in the error bound (float32, (K,) each).

    Spherical models (``quad`` of shape (K,)) multiply |x|^2 in float32: their second factor is 0.
    """
    eps = BF16_PRODUCT_EPS + n_features * 2.0 ** -24  # float32 accumulation over D products
    eps *= 1.01  # the norms themselves are rounded
    lin_scale = eps * torch.linalg.vector_norm(lin.double(), dim=1)
    quad_scale = eps * torch.linalg.vector_norm(quad.double(), dim=1) if quad.dim() == 2 \
        else torch.zeros_like(lin_scale)
    return lin_scale.float().contiguous(), quad_scale.float().contiguous()


@triton.jit
def _row_norms(x_ptr, stride_x, shift_ptr, rows, row_mask, n_cols, BLOCK_D: tl.constexpr):
    """|x_n - shift| and |(x_n - shift)^2| (Euclidean), float32."""
    sq = tl.zeros([rows.shape[0]], dtype=tl.float32)
    quart = tl.zeros([rows.shape[0]], dtype=tl.float32)
    for d0 in range(0, n_cols, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_mask = cols < n_cols
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=mask, other=0)
        shift = tl.load(shift_ptr + cols, mask=col_mask, other=0.0)
        x = tl.where(mask, x.to(tl.float32) - shift[None, :], 0.0)
        xx = x * x
        sq += tl.sum(xx, axis=1)
        quart += tl.sum(xx * xx, axis=1)
    return tl.sqrt(sq), tl.sqrt(quart)


@triton.jit
def candidates_kernel(x_ptr, stride_x, shift_ptr, lin_ptr, quad_ptr, const_ptr, lin_scale_ptr, quad_scale_ptr,
                      cand_ptr, upper_ptr, count_ptr, floor_ptr, n_rows, n_comps, n_cols, margin, slack,
                      CAPACITY: tl.constexpr, DIAGONAL: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, ONE_TILE: tl.constexpr,
                      SPLIT_DTYPE: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    x_norm, xx_norm = _row_norms(x_ptr, stride_x, shift_ptr, rows, row_mask, n_cols, BLOCK_D)
    if ONE_TILE:
        cols = tl.arange(0, BLOCK_D)
        x_hi, x_lo, xx_hi, xx_lo, sq_norm = row_operands(x_ptr, stride_x, shift_ptr, rows, row_mask, cols, n_cols,
                                                         DIAGONAL, "bf16", SPLIT_DTYPE)
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
                               x_hi, x_lo, xx_hi, xx_lo, DIAGONAL, BLOCK_K, BLOCK_N, "bf16", True)
            ll = finish_log_prob(ll, sq_norm, quad_ptr, const_ptr, comps, comp_mask, DIAGONAL, True)
        else:
            ll, _ = log_prob_streamed(x_ptr, stride_x, shift_ptr, lin_ptr, lin_ptr, quad_ptr, quad_ptr, const_ptr,
                                      rows, row_mask, comps, n_comps, n_cols,
                                      DIAGONAL, BLOCK_N, BLOCK_K, BLOCK_D, "bf16", SPLIT_DTYPE, True)
        err = tl.load(lin_scale_ptr + comps, mask=comp_mask, other=0.0)[None, :] * x_norm[:, None]
        if DIAGONAL:
            err += tl.load(quad_scale_ptr + comps, mask=comp_mask, other=0.0)[None, :] * xx_norm[:, None]
        # min(): -inf log-densities keep a finite bound, so l~ +- e stays -inf (not NaN).
        err += slack * tl.minimum(tl.abs(ll), 3.0e38)
        best = tl.maximum(best, tl.max(ll - err, axis=1))
        upper = ll + err
        take = (upper >= (best - margin)[:, None]) & row_mask[:, None]
        place = count[:, None] + tl.cumsum(take.to(tl.int32), axis=1) - 1
        keep = take & (place < CAPACITY)
        at = out_rows[:, None] + place
        tl.store(cand_ptr + at, comps[None, :], mask=keep)
        tl.store(upper_ptr + at, upper, mask=keep)
        count += tl.sum(take.to(tl.int32), axis=1)
    tl.store(count_ptr + rows, count, mask=row_mask)
    tl.store(floor_ptr + rows, best - margin, mask=row_mask)


def candidates(x, shift, weights, lin_scale, quad_scale, margin, capacity, config):
    """Launch the candidate pass.

    Parameters
    ----------
    x : Tensor of shape (n, D), unit column stride
    shift : float32 Tensor of shape (D,)
    weights : KernelWeights laid out for precision "bf16"
    lin_scale, quad_scale : float32 Tensors of shape (K,), from ``error_scales``
    margin : float, nats below the row's best (lower bound) that a component may lie and still be kept
    capacity : int, candidate slots per row
    config : LaunchConfig (``rows_first`` tiles)

    Returns
    -------
    cand : int32 Tensor of shape (n, capacity), the first min(count, capacity) slots written
    upper : float32 Tensor of shape (n, capacity), each stored candidate's upper bound
    count : int32 Tensor of shape (n,), candidates found (> capacity: the row overflowed)
    floor : float32 Tensor of shape (n,), the row's threshold: best lower bound - margin
    """
    n, d = x.shape
    cand = torch.empty(n, capacity, dtype=torch.int32, device=x.device)
    upper = torch.empty(n, capacity, dtype=torch.float32, device=x.device)
    count = torch.empty(n, dtype=torch.int32, device=x.device)
    floor = torch.empty(n, dtype=torch.float32, device=x.device)
    candidates_kernel[(triton.cdiv(n, config.block_n),)](
        x, x.stride(0), shift, weights.lin_hi, weights.quad_hi, weights.const, lin_scale, quad_scale,
        cand, upper, count, floor, n, weights.n_comps, d, float(margin), FLOAT32_SLACK,
        CAPACITY=capacity, DIAGONAL=weights.diagonal, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        BLOCK_D=config.block_d, ONE_TILE=d <= config.block_d, SPLIT_DTYPE=split_dtype(x.device),
        num_warps=config.num_warps, num_stages=config.num_stages)
    return cand, upper, count, floor

