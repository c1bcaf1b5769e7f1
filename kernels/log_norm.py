"""Pass 1 of the E-step: log Z_n and the best component of every row.

One program owns BLOCK_N rows and streams over all K components in tiles,
keeping an online log-sum-exp (running max m and scaled sum s), so nothing of
size N x K is ever stored. When D fits one feature tile the rows are loaded
and split once, before the loop over components. With ``rows_first`` the
log-density tiles are (BLOCK_N, BLOCK_K), so the log-sum-exp over components
reduces within threads instead of across warps.
"""
import torch
import triton
import triton.language as tl

from .tile import finish_log_prob, log_prob_part, log_prob_streamed, row_operands, split_dtype


@triton.jit
def log_norm_kernel(x_ptr, stride_x, shift_ptr, lin_hi_ptr, lin_lo_ptr, quad_hi_ptr, quad_lo_ptr, const_ptr,
                    log_norm_ptr, best_ptr, n_rows, n_comps, n_cols,
                    DIAGONAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    BLOCK_D: tl.constexpr, ONE_TILE: tl.constexpr, PRECISION: tl.constexpr,
                    SPLIT_DTYPE: tl.constexpr, ROWS_FIRST: tl.constexpr, COMP_AXIS: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    if ONE_TILE:
        cols = tl.arange(0, BLOCK_D)
        x_hi, x_lo, xx_hi, xx_lo, sq_norm = row_operands(x_ptr, stride_x, shift_ptr, rows, row_mask, cols, n_cols,
                                                         DIAGONAL, PRECISION, SPLIT_DTYPE)
    # A finite floor instead of -inf: a tile of components all at -inf (zero weight)
    # must give exp(-inf - floor) = 0, not exp(-inf + inf) = NaN.
    floor = -3.0e38
    run_max = tl.full([BLOCK_N], floor, dtype=tl.float32)
    run_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    best = tl.zeros([BLOCK_N], dtype=tl.int32)
    for k0 in range(0, n_comps, BLOCK_K):
        comps = k0 + tl.arange(0, BLOCK_K)
        if ONE_TILE:
            comp_mask = comps < n_comps
            ll = log_prob_part(lin_hi_ptr, lin_lo_ptr, quad_hi_ptr, quad_lo_ptr, comps, comp_mask, cols, n_cols,
                               x_hi, x_lo, xx_hi, xx_lo, DIAGONAL, BLOCK_K, BLOCK_N, PRECISION, ROWS_FIRST)
            ll = finish_log_prob(ll, sq_norm, quad_hi_ptr, const_ptr, comps, comp_mask, DIAGONAL, ROWS_FIRST)
        else:
            ll, _ = log_prob_streamed(x_ptr, stride_x, shift_ptr, lin_hi_ptr, lin_lo_ptr, quad_hi_ptr, quad_lo_ptr,
                                      const_ptr, rows, row_mask, comps, n_comps, n_cols,
                                      DIAGONAL, BLOCK_N, BLOCK_K, BLOCK_D, PRECISION, SPLIT_DTYPE, ROWS_FIRST)
        tile_max = tl.max(ll, axis=COMP_AXIS)
        tile_arg = tl.argmax(ll, axis=COMP_AXIS).to(tl.int32) + k0
        best = tl.where(tile_max > run_max, tile_arg, best)
        new_max = tl.maximum(run_max, tile_max)
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(ll - tl.expand_dims(new_max, COMP_AXIS)),
                                                               axis=COMP_AXIS)
        run_max = new_max
    tl.store(log_norm_ptr + rows, run_max + tl.log(run_sum), mask=row_mask)
    tl.store(best_ptr + rows, best, mask=row_mask)


def log_norm(x, shift, weights, precision, config):
    """Launch pass 1; returns (log_norm float32 (n,), best component int32 (n,))."""
    n, d = x.shape
    out = torch.empty(n, dtype=torch.float32, device=x.device)
    best = torch.empty(n, dtype=torch.int32, device=x.device)
    grid = (triton.cdiv(n, config.block_n),)
    log_norm_kernel[grid](x, x.stride(0), shift, *weights,
                          out, best, n, weights.n_comps, d,
                          DIAGONAL=weights.diagonal, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                          BLOCK_D=config.block_d, ONE_TILE=d <= config.block_d, PRECISION=precision,
                          SPLIT_DTYPE=split_dtype(x.device), ROWS_FIRST=config.rows_first,
                          # ROWS_FIRST as an axis number, derived here: the interpreter does not
                          # evaluate a conditional expression on a constexpr inside the kernel.
                          COMP_AXIS=1 if config.rows_first else 0,
                          num_warps=config.num_warps, num_stages=config.num_stages)
    return out, best
