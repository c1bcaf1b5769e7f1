"""Pass 2 of the E-step: sufficient statistics from the responsibilities.

Grid (K tiles, D tiles, row splits).  A program recomputes the log-densities of
its component tile for the rows of its split, forms r = exp(ll - log Z) in
registers and accumulates N_k, sum r x and sum r x^2 in registers; at the end it
writes its own slice of a (splits, K, D) partial buffer.  No atomics: the
partials are summed afterwards in float64, so results are deterministic and the
N x K responsibilities never reach memory.
"""
import torch
import triton
import triton.language as tl

from .tile import dot, load_rows, split_dtype, weighted_log_prob


@triton.jit
def stats_kernel(x_ptr, stride_x, shift_ptr, lin_hi_ptr, lin_lo_ptr, quad_hi_ptr, quad_lo_ptr, const_ptr, log_norm_ptr,
                 nk_ptr, s1_ptr, s2_ptr, n_rows, n_comps, n_cols, tiles_per_split,
                 DIAGONAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
                 SPLIT_DTYPE: tl.constexpr, X_LEFT: tl.constexpr):
    # X_LEFT: accumulate x^T r as (BLOCK_D, BLOCK_K) tiles instead of r^T x as (BLOCK_K, BLOCK_D):
    # which operand order the tensor cores take better is measured, not guessed (eval/tune_estep).
    pid_k = tl.program_id(0)
    pid_d = tl.program_id(1)
    split = tl.program_id(2)
    comps = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    comp_mask = comps < n_comps
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    nk = tl.zeros([BLOCK_K], dtype=tl.float32)
    if X_LEFT:
        s1 = tl.zeros([BLOCK_D, BLOCK_K], dtype=tl.float32)
    else:
        s1 = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    if DIAGONAL:
        s2 = tl.zeros_like(s1)
    else:
        s2 = tl.zeros([BLOCK_K], dtype=tl.float32)
    first_tile = split * tiles_per_split
    last_tile = tl.minimum(first_tile + tiles_per_split, tl.cdiv(n_rows, BLOCK_N))
    for tile in range(first_tile, last_tile):
        rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < n_rows
        ll, sq_norm = weighted_log_prob(x_ptr, stride_x, shift_ptr, lin_hi_ptr, lin_lo_ptr, quad_hi_ptr,
                                        quad_lo_ptr, const_ptr, rows, row_mask, comps, n_comps, n_cols,
                                        DIAGONAL, BLOCK_N, BLOCK_K, BLOCK_D, PRECISION, SPLIT_DTYPE)
        log_z = tl.load(log_norm_ptr + rows, mask=row_mask, other=float("inf"))
        resp = tl.exp(ll - log_z[:, None])  # padded rows and components give exactly 0
        nk += tl.sum(resp, axis=0)
        x = load_rows(x_ptr, stride_x, shift_ptr, rows, row_mask, cols, n_cols)
        if X_LEFT:
            x_t = tl.trans(x)
            s1 = dot(x_t, resp, s1, PRECISION, SPLIT_DTYPE)
            if DIAGONAL:
                s2 = dot(x_t * x_t, resp, s2, PRECISION, SPLIT_DTYPE)
        else:
            resp_t = tl.trans(resp)
            s1 = dot(resp_t, x, s1, PRECISION, SPLIT_DTYPE)
            if DIAGONAL:
                s2 = dot(resp_t, x * x, s2, PRECISION, SPLIT_DTYPE)
        if not DIAGONAL:
            s2 += tl.sum(resp * sq_norm[:, None], axis=0)
    out = split * n_comps + comps
    if X_LEFT:
        out_2d = out[None, :] * n_cols + cols[:, None]
        mask_2d = comp_mask[None, :] & (cols[:, None] < n_cols)
    else:
        out_2d = out[:, None] * n_cols + cols[None, :]
        mask_2d = comp_mask[:, None] & (cols[None, :] < n_cols)
    tl.store(s1_ptr + out_2d, s1, mask=mask_2d)
    if DIAGONAL:
        tl.store(s2_ptr + out_2d, s2, mask=mask_2d)
    if pid_d == 0:
        tl.store(nk_ptr + out, nk, mask=comp_mask)
        if not DIAGONAL:
            tl.store(s2_ptr + out, s2, mask=comp_mask)


def stats(x, shift, weights, log_norm, n_split, precision, config):
    """Launch pass 2; returns float32 partials (nk, s1, s2), each with a leading split axis."""
    n, d = x.shape
    k = weights.n_comps
    n_tiles = triton.cdiv(n, config.block_n)
    n_split = max(1, min(n_split, n_tiles))
    tiles_per_split = triton.cdiv(n_tiles, n_split)
    n_split = triton.cdiv(n_tiles, tiles_per_split)
    f32 = dict(dtype=torch.float32, device=x.device)
    nk = torch.empty(n_split, k, **f32)
    s1 = torch.empty(n_split, k, d, **f32)
    s2 = torch.empty((n_split, k, d) if weights.diagonal else (n_split, k), **f32)
    grid = (triton.cdiv(k, config.block_k), triton.cdiv(d, config.block_d), n_split)
    stats_kernel[grid](x, x.stride(0), shift, *weights, log_norm,
                       nk, s1, s2, n, k, d, tiles_per_split,
                       DIAGONAL=weights.diagonal, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                       BLOCK_D=config.block_d, PRECISION=precision, SPLIT_DTYPE=split_dtype(x.device),
                       X_LEFT=config.x_left, num_warps=config.num_warps, num_stages=config.num_stages)
    return nk, s1, s2
