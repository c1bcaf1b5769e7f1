"""Pass 2 of the E-step: sufficient statistics from the responsibilities.

Grid (K tiles, row splits). A program recomputes the log-densities of its component
tile for the rows of its split as a (BLOCK_K, BLOCK_N) tile, forms r = exp(ll - log Z)
in registers and multiplies it into N_k, r @ x and r @ x^2, with r as the left operand
exactly as flash attention's P in P @ V; it writes its own slice of a (splits, K, D)
partial buffer. No atomics: the partials are summed afterwards, so results are
deterministic and the N x K responsibilities never reach memory.

When D fits one feature tile (D <= BLOCK_D, ``ONE_TILE``) the rows are loaded and split
once per row tile, feed both products, and the statistics accumulate in registers.
Beyond, the log-densities are computed once per row tile over all feature tiles, and
r @ x of each feature tile is added into the program's slice of the partial buffers
(zeroed by the launcher): a (BLOCK_K, D) accumulator would not fit in registers, and
recomputing the log-densities for every feature tile cost 7x at D = 960.
"""
import torch
import triton
import triton.language as tl

from .tile import dot_split, finish_log_prob, log_prob_part, log_prob_streamed, row_operands, split, split_dtype


@triton.jit
def stats_kernel(x_ptr, stride_x, shift_ptr, lin_hi_ptr, lin_lo_ptr, quad_hi_ptr, quad_lo_ptr, const_ptr, log_norm_ptr,
                 nk_ptr, s1_ptr, s2_ptr, n_rows, n_comps, n_cols, tiles_per_split,
                 DIAGONAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_D: tl.constexpr, ONE_TILE: tl.constexpr, PRECISION: tl.constexpr,
                 SPLIT_DTYPE: tl.constexpr):
    pid_k = tl.program_id(0)
    split_id = tl.program_id(1)
    comps = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    comp_mask = comps < n_comps
    cols = tl.arange(0, BLOCK_D)
    out = split_id * n_comps + comps
    nk = tl.zeros([BLOCK_K], dtype=tl.float32)
    s1 = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    if DIAGONAL:
        s2 = tl.zeros_like(s1)
    else:
        s2 = tl.zeros([BLOCK_K], dtype=tl.float32)
    first_tile = split_id * tiles_per_split
    last_tile = tl.minimum(first_tile + tiles_per_split, tl.cdiv(n_rows, BLOCK_N))
    for tile in range(first_tile, last_tile):
        rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < n_rows
        if ONE_TILE:
            x_hi, x_lo, xx_hi, xx_lo, sq_norm = row_operands(x_ptr, stride_x, shift_ptr, rows, row_mask, cols,
                                                             n_cols, DIAGONAL, PRECISION, SPLIT_DTYPE)
            ll = log_prob_part(lin_hi_ptr, lin_lo_ptr, quad_hi_ptr, quad_lo_ptr, comps, comp_mask, cols, n_cols,
                               x_hi, x_lo, xx_hi, xx_lo, DIAGONAL, BLOCK_K, BLOCK_N, PRECISION, False)
            ll = finish_log_prob(ll, sq_norm, quad_hi_ptr, const_ptr, comps, comp_mask, DIAGONAL, False)
        else:
            ll, sq_norm = log_prob_streamed(x_ptr, stride_x, shift_ptr, lin_hi_ptr, lin_lo_ptr, quad_hi_ptr,
                                            quad_lo_ptr, const_ptr, rows, row_mask, comps, n_comps, n_cols,
                                            DIAGONAL, BLOCK_N, BLOCK_K, BLOCK_D, PRECISION, SPLIT_DTYPE, False)
        log_z = tl.load(log_norm_ptr + rows, mask=row_mask, other=float("inf"))
        resp = tl.exp(ll - log_z[None, :])  # padded rows and components give exactly 0
        nk += tl.sum(resp, axis=1)
        if not DIAGONAL:
            s2 += tl.sum(resp * sq_norm[None, :], axis=1)
        r_hi, r_lo = split(resp, PRECISION, SPLIT_DTYPE)
        if ONE_TILE:
            s1 = dot_split(r_hi, r_lo, x_hi, x_lo, s1, PRECISION)
            if DIAGONAL:
                s2 = dot_split(r_hi, r_lo, xx_hi, xx_lo, s2, PRECISION)
        else:
            # Each element is loaded and stored by the same thread (same pointer tile), so
            # the read-modify-write needs no barrier; no other program owns this slice.
            for d0 in range(0, n_cols, BLOCK_D):
                at = d0 + cols
                x_hi, x_lo, xx_hi, xx_lo, _ = row_operands(x_ptr, stride_x, shift_ptr, rows, row_mask, at, n_cols,
                                                           DIAGONAL, PRECISION, SPLIT_DTYPE)
                offs = out[:, None] * n_cols + at[None, :]
                mask = comp_mask[:, None] & (at[None, :] < n_cols)
                part = dot_split(r_hi, r_lo, x_hi, x_lo, tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32), PRECISION)
                tl.store(s1_ptr + offs, tl.load(s1_ptr + offs, mask=mask) + part, mask=mask)
                if DIAGONAL:
                    part = dot_split(r_hi, r_lo, xx_hi, xx_lo, tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32),
                                     PRECISION)
                    tl.store(s2_ptr + offs, tl.load(s2_ptr + offs, mask=mask) + part, mask=mask)
    if ONE_TILE:
        out_2d = out[:, None] * n_cols + cols[None, :]
        mask_2d = comp_mask[:, None] & (cols[None, :] < n_cols)
        tl.store(s1_ptr + out_2d, s1, mask=mask_2d)
        if DIAGONAL:
            tl.store(s2_ptr + out_2d, s2, mask=mask_2d)
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
    one_tile = d <= config.block_d
    f32 = dict(dtype=torch.float32, device=x.device)
    nk = torch.empty(n_split, k, **f32)
    # Beyond one feature tile the kernel adds into s1 (and diagonal s2) tile by tile.
    s1 = (torch.empty if one_tile else torch.zeros)(n_split, k, d, **f32)
    s2 = torch.empty(n_split, k, **f32) if not weights.diagonal else \
        (torch.empty if one_tile else torch.zeros)(n_split, k, d, **f32)
    grid = (triton.cdiv(k, config.block_k), n_split)
    stats_kernel[grid](x, x.stride(0), shift, *weights, log_norm,
                       nk, s1, s2, n, k, d, tiles_per_split,
                       DIAGONAL=weights.diagonal, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                       BLOCK_D=config.block_d, ONE_TILE=one_tile, PRECISION=precision,
                       SPLIT_DTYPE=split_dtype(x.device), num_warps=config.num_warps, num_stages=config.num_stages)
    return nk, s1, s2
