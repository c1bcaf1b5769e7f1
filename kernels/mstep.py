"""Fused M-step of a diagonal or spherical mixture: statistics to the next parameters in two launches.

The M-step, the re-seeding of empty components and the move of the shift
(``flashgmm_ivf._mstep.m_step``, ``GaussianMixture._m_step`` and ``_recentre``) are some 60 torch
operations on (K, D) and (K,) float64 tensors. On a GPU each is a launch that takes a few
microseconds for almost no work. Here they are two kernels, in float64 (with ``kernels.estep_params``,
H100, N = 1M, K = 1024, D = 128, an EM iteration replayed from a CUDA graph took 3.20 against 3.34 ms
diag, 2.89 against 2.91 spherical, ``bench_fit_ab_noqueue_52133b5_k1024_h100.json``):

1. ``columns_kernel``, one program per tile of features, each reading every component's statistics
   in its columns: what depends on all components (the variance floor, the mean variance of the
   kept components that a re-seeded one takes, the shift's move: sum_k w_k mu_k) per feature. The
   per-component numbers these need (N_k, which components are empty and re-seeded, the weights)
   are a few K-long passes that every program repeats rather than waits for.
2. ``write_kernel``, one program per tile of components: the means, variances and precisions.

Spherical variances need sum_d mu_kd^2 first (one torch reduction). Sums run in other orders than
torch's, so results agree to float64 round-off; the float32 shift they round to may then differ by
one float32 unit in rare ties, which moves the means by the same amount (the model is the same).

Torch reference: ``flashgmm_ivf._mstep.m_step`` with ``GaussianMixture._m_step`` (the CPU path).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tile import float64_arg, float64_bits

# Fewer than one sample's worth of responsibility: the component is empty and re-seeded.
EMPTY_MASS = 1.0


@triton.jit
def _divisor(nk):
    """N_k, or 10 eps for a component without mass (``_mstep.m_step``)."""
    return tl.where(nk > 0, nk, tl.full([], 2.0 ** -52, tl.float64) * 10)


@triton.jit
def _comp_numbers(nk_ptr, comps, comp_mask, carry, n_worst, EMPTY_MASS: tl.constexpr):
    """(N_k or 10 eps, empty, rank among the empty, re-seeded) of a tile of components; ``carry``:
    empty components before the tile."""
    nk = tl.load(nk_ptr + comps, mask=comp_mask, other=1.0)
    nkp = _divisor(nk)
    empty = (nk < EMPTY_MASS) & comp_mask
    rank = carry + tl.cumsum(empty.to(tl.int32), axis=0) - 1
    return nkp, empty, rank, empty & (rank < n_worst)


@triton.jit
def _variance(s1, s2, nkp, msq, reg_covar, floor, n_cols, DIAGONAL: tl.constexpr):
    """The floored variances of a (components, features) tile (diag) or a tile of components
    (spherical: ``msq`` = sum_d mu_kd^2)."""
    if DIAGONAL:
        mean = s1 / nkp[:, None]
        cov = tl.maximum(s2 / nkp[:, None] - mean * mean + reg_covar, floor[None, :])
    else:
        cov = tl.maximum((s2 / nkp - msq) / n_cols + reg_covar, floor)
    return cov


@triton.jit
def _means(s1, nkp, reseed, rank, worst_ptr, shift, cols, col_mask, n_cols):
    """A (components, features) tile of the new means, relative to the old shift: S1 / N_k, or the
    component's worst row for a re-seeded one."""
    worst = tl.load(worst_ptr + tl.maximum(rank, 0)[:, None].to(tl.int64) * n_cols + cols[None, :],
                    mask=reseed[:, None] & col_mask[None, :], other=0.0)
    return tl.where(reseed[:, None], worst - shift[None, :], s1 / nkp[:, None])


@triton.jit(do_not_specialize=["n_worst", "n_rows", "reg_bits", "floor_bits"])
def columns_kernel(nk_ptr, s1_ptr, s2_ptr, msq_ptr, worst_ptr, shift_ptr, n_comps, n_cols, n_worst, n_rows,
                   reg_bits, floor_bits, rw_out, rank_out, floor_out, kept_out, shift_out, scalar_out, count_out,
                   DIAGONAL: tl.constexpr, ROUND_SHIFT: tl.constexpr, EMPTY_MASS: tl.constexpr,
                   BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    reg_covar = float64_arg(reg_bits)
    relative_floor = float64_arg(floor_bits)
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < n_cols
    first = tl.program_id(0) == 0
    # Pass 1: N = sum N_k, the sum of the N_k that divide (10 eps for empty ones), and the rows' second
    # moment about the shift.
    nk_sum = tl.zeros([BLOCK_K], dtype=tl.float64)
    nkp_sum = tl.zeros([BLOCK_K], dtype=tl.float64)
    if DIAGONAL:
        m2 = tl.zeros([BLOCK_D], dtype=tl.float64)
    else:
        m2_k = tl.zeros([BLOCK_K], dtype=tl.float64)
    for k0 in range(0, n_comps, BLOCK_K):
        comps = k0 + tl.arange(0, BLOCK_K)
        comp_mask = comps < n_comps
        nk = tl.load(nk_ptr + comps, mask=comp_mask, other=0.0)
        nk_sum += nk
        nkp_sum += tl.where(comp_mask, _divisor(nk), 0.0)
        if DIAGONAL:
            m2 += tl.sum(tl.load(s2_ptr + comps[:, None].to(tl.int64) * n_cols + cols[None, :],
                                 mask=comp_mask[:, None] & col_mask[None, :], other=0.0), axis=0)
        else:
            m2_k += tl.load(s2_ptr + comps, mask=comp_mask, other=0.0)
    n_total = tl.sum(nk_sum, axis=0)
    nkp_total = tl.sum(nkp_sum, axis=0)
    if not DIAGONAL:
        m2 = tl.sum(m2_k, axis=0) / n_cols
    floor = tl.where(relative_floor != 0, tl.maximum(relative_floor * (m2 / n_total), reg_covar), reg_covar)
    # Pass 2: which components are re-seeded, their weights before renormalising, the mean
    # variance of the others, and sum_k w_k mu_k with the re-seeded means at their worst rows.
    shift = tl.load(shift_ptr + cols, mask=col_mask, other=0.0)
    carry = tl.full([], 0, tl.int32)
    n_reseeded = tl.full([], 0, tl.int32)
    kept_n = tl.zeros([BLOCK_K], dtype=tl.float64)
    rw_sum = tl.zeros([BLOCK_K], dtype=tl.float64)
    move = tl.zeros([BLOCK_D], dtype=tl.float64)
    if DIAGONAL:
        kept_sum = tl.zeros([BLOCK_D], dtype=tl.float64)
    else:
        kept_sum_k = tl.zeros([BLOCK_K], dtype=tl.float64)
    for k0 in range(0, n_comps, BLOCK_K):
        comps = k0 + tl.arange(0, BLOCK_K)
        comp_mask = comps < n_comps
        nkp, empty, rank, reseed = _comp_numbers(nk_ptr, comps, comp_mask, carry, n_worst, EMPTY_MASS)
        carry += tl.sum(empty.to(tl.int32), axis=0)
        n_reseeded += tl.sum(reseed.to(tl.int32), axis=0)
        kept = comp_mask & ~reseed
        kept_n += kept.to(tl.float64)
        rw = tl.where(comp_mask, tl.where(reseed, 1.0 / n_rows.to(tl.float64), nkp / nkp_total), 0.0)
        rw_sum += rw
        tile = comps[:, None].to(tl.int64) * n_cols + cols[None, :]
        mask = comp_mask[:, None] & col_mask[None, :]
        s1 = tl.load(s1_ptr + tile, mask=mask, other=0.0)
        if DIAGONAL:
            cov = _variance(s1, tl.load(s2_ptr + tile, mask=mask, other=0.0), nkp, 0.0, reg_covar, floor, n_cols,
                            DIAGONAL)
            kept_sum += tl.sum(tl.where(kept[:, None], cov, 0.0), axis=0)
        else:
            cov = _variance(0.0, tl.load(s2_ptr + comps, mask=comp_mask, other=0.0), nkp,
                            tl.load(msq_ptr + comps, mask=comp_mask, other=0.0), reg_covar, floor, n_cols, DIAGONAL)
            kept_sum_k += tl.where(kept, cov, 0.0)
        mean = _means(s1, nkp, reseed, rank, worst_ptr, shift, cols, col_mask, n_cols)
        move += tl.sum(rw[:, None] * mean, axis=0)
        if first:
            tl.store(rw_out + comps, rw, mask=comp_mask)
            tl.store(rank_out + comps, tl.where(reseed, rank, -1), mask=comp_mask)
    if not DIAGONAL:
        kept_sum = tl.sum(kept_sum_k, axis=0)
    kept_mean = kept_sum / tl.maximum(tl.sum(kept_n, axis=0), 1.0)
    # The weights are renormalised only where a component was re-seeded.
    scale = tl.where(n_reseeded > 0, tl.sum(rw_sum, axis=0), 1.0)
    new_shift = shift + move / scale
    if ROUND_SHIFT:
        # A float32 shift, which the float32 kernels subtract exactly.
        new_shift = new_shift.to(tl.float32).to(tl.float64)
    tl.store(shift_out + cols, new_shift, mask=col_mask)
    if DIAGONAL:
        tl.store(floor_out + cols, floor, mask=col_mask)
        tl.store(kept_out + cols, kept_mean, mask=col_mask)
    if first:
        if not DIAGONAL:
            tl.store(floor_out, floor)
            tl.store(kept_out, kept_mean)
        tl.store(scalar_out, scale)
        # Whether any component kept its own variance (else re-seeded ones keep theirs too).
        tl.store(scalar_out + 1, tl.where(tl.sum(kept_n, axis=0) > 0, 1.0, 0.0))
        tl.store(count_out, n_reseeded.to(tl.int64))


@triton.jit(do_not_specialize=["reg_bits"])
def write_kernel(nk_ptr, s1_ptr, s2_ptr, msq_ptr, worst_ptr, shift_ptr, rw_ptr, rank_ptr, floor_ptr, kept_ptr,
                 new_shift_ptr, scalar_ptr, n_comps, n_cols, reg_bits, weights_out, means_out, cov_out, prec_out,
                 DIAGONAL: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    reg_covar = float64_arg(reg_bits)
    comps = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    comp_mask = comps < n_comps
    nkp = _divisor(tl.load(nk_ptr + comps, mask=comp_mask, other=1.0))
    rank = tl.load(rank_ptr + comps, mask=comp_mask, other=-1)
    reseed = rank >= 0
    scale = tl.load(scalar_ptr)
    # A re-seeded component takes the kept components' mean variance, where there are any.
    shared = reseed & (tl.load(scalar_ptr + 1 + tl.zeros_like(rank)) > 0)
    tl.store(weights_out + comps, tl.load(rw_ptr + comps, mask=comp_mask, other=0.0) / scale, mask=comp_mask)
    if not DIAGONAL:
        cov = _variance(0.0, tl.load(s2_ptr + comps, mask=comp_mask, other=1.0), nkp,
                        tl.load(msq_ptr + comps, mask=comp_mask, other=0.0), reg_covar, tl.load(floor_ptr), n_cols,
                        DIAGONAL)
        cov = tl.where(shared, tl.load(kept_ptr), cov)
        tl.store(cov_out + comps, cov, mask=comp_mask)
        tl.store(prec_out + comps, 1.0 / tl.sqrt(cov), mask=comp_mask)
    for d0 in range(0, n_cols, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_mask = cols < n_cols
        tile = comps[:, None].to(tl.int64) * n_cols + cols[None, :]
        mask = comp_mask[:, None] & col_mask[None, :]
        shift = tl.load(shift_ptr + cols, mask=col_mask, other=0.0)
        s1 = tl.load(s1_ptr + tile, mask=mask, other=0.0)
        mean = _means(s1, nkp, reseed, rank, worst_ptr, shift, cols, col_mask, n_cols)
        move = tl.load(new_shift_ptr + cols, mask=col_mask, other=0.0) - shift
        tl.store(means_out + tile, mean - move[None, :], mask=mask)
        if DIAGONAL:
            cov = _variance(s1, tl.load(s2_ptr + tile, mask=mask, other=1.0), nkp, 0.0, reg_covar,
                            tl.load(floor_ptr + cols, mask=col_mask, other=1.0), n_cols, DIAGONAL)
            cov = tl.where(shared[:, None], tl.load(kept_ptr + cols, mask=col_mask, other=1.0)[None, :], cov)
            tl.store(cov_out + tile, cov, mask=mask)
            tl.store(prec_out + tile, 1.0 / tl.sqrt(cov), mask=mask)


def m_step(stats, worst_rows, shift, n_rows, reg_covar, relative_floor, round_shift, *, block_k=64, block_d=8):
    """Launch the fused M-step (module docstring).

    Parameters
    ----------
    stats : EStepResult, float64: nk (K,), s1 (K, D), s2 (K, D) (diag) or (K,) (spherical), of the
        rows less ``shift``
    worst_rows : float64 Tensor of shape (R, D), the worst-explained rows, worst first: the empty
        components (N_k < ``EMPTY_MASS``), in index order, take them as their means (R = 0: none is
        re-seeded)
    shift : float64 Tensor of shape (D,)
    n_rows : int, the rows' count (a re-seeded component's weight before renormalising is 1 / n_rows)
    reg_covar, relative_floor : float, as ``flashgmm_ivf._mstep.m_step``'s
    round_shift : bool, round the new shift to float32 values

    Returns
    -------
    weights (K,), means (K, D) relative to the new shift, covariances (K, D) or (K,), precisions'
    Cholesky factors 1 / sqrt(covariances), the new shift (D,): all float64; and the number of
    re-seeded components, an int64 0-d Tensor
    """
    nk, s1, s2 = (t.contiguous() for t in stats[1:])
    k, d = s1.shape
    diagonal = s2.dim() == 2
    device = s1.device
    f64 = dict(dtype=torch.float64, device=device)
    shift = shift.to(**f64).contiguous()
    n_worst = worst_rows.shape[0]
    # With no rows to re-seed from, nothing is read from them: any row of the right width will do.
    worst = worst_rows.to(**f64).contiguous() if n_worst else shift[None]
    if diagonal:
        msq = nk  # not read
    else:
        # sum_d mu_kd^2 of the spherical variances.
        means = s1 / torch.where(nk > 0, nk, 10 * torch.finfo(torch.float64).eps)[:, None]
        msq = torch.linalg.vecdot(means, means)
    rw, rank = torch.empty(k, **f64), torch.empty(k, dtype=torch.int32, device=device)
    floor, kept = (torch.empty(d if diagonal else 1, **f64) for _ in range(2))
    new_shift, scalars = torch.empty(d, **f64), torch.empty(2, **f64)
    count = torch.empty((), dtype=torch.int64, device=device)
    block_d = min(block_d, triton.next_power_of_2(d))
    reg_bits = float64_bits(reg_covar)
    columns_kernel[(triton.cdiv(d, block_d),)](
        nk, s1, s2, msq, worst, shift, k, d, n_worst, n_rows, reg_bits, float64_bits(relative_floor), rw, rank,
        floor, kept, new_shift, scalars, count, DIAGONAL=diagonal, ROUND_SHIFT=bool(round_shift),
        EMPTY_MASS=EMPTY_MASS, BLOCK_K=block_k, BLOCK_D=block_d)
    weights, means, cov = torch.empty(k, **f64), torch.empty(k, d, **f64), torch.empty(s2.shape, **f64)
    prec = torch.empty_like(cov)
    write_block_d = min(64, triton.next_power_of_2(d))
    write_kernel[(triton.cdiv(k, 16),)](
        nk, s1, s2, msq, worst, shift, rw, rank, floor, kept, new_shift, scalars, k, d, reg_bits, weights, means, cov,
        prec, DIAGONAL=diagonal, BLOCK_K=16, BLOCK_D=write_block_d)
    return weights, means, cov, prec, new_shift, count
