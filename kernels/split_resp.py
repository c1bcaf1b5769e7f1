"""Responsibilities of the library-product E-step (``kernels.gemm``) from its log-density products, in one kernel.

The product ``P = [x_lo | x_hi | x_hi] [w_hi | w_lo | w_hi]^T`` (float32, rows x K) still
lacks each component's constant (and for spherical models quad_k |x_n|^2, added here in
float32 as the fused kernels do). One program owns BLOCK_N rows: a first walk over the
components' tiles takes the online log-sum-exp (log Z), a second writes r = exp(L - log Z)
as bfloat16 pieces (hi, and lo unless only r rounded is wanted) for the statistics'
products, and the program's column sums of r (N_k; spherical models also sum_n r_nk |x_n|^2)
as one float32 partial row, summed in float64 by the caller. Every byte of P is read twice
and no (rows, K) float32 is written.

Torch reference: ``kernels.gemm.split_resp_reference``.
"""
import torch
import triton
import triton.language as tl

from .tile import split, split_dtype


@triton.jit
def _log_prob(prod_ptr, stride_p, const_ptr, quad_ptr, sq, rows, row_mask, comps, n_comps,
              DIAGONAL: tl.constexpr):
    comp_mask = comps < n_comps
    mask = row_mask[:, None] & comp_mask[None, :]
    ll = tl.load(prod_ptr + rows[:, None].to(tl.int64) * stride_p + comps[None, :], mask=mask, other=0.0)
    ll += tl.load(const_ptr + comps, mask=comp_mask, other=float("-inf"))[None, :]
    if not DIAGONAL:
        ll += sq[:, None] * tl.load(quad_ptr + comps, mask=comp_mask, other=0.0)[None, :]
    return ll, mask


@triton.jit
def split_resp_kernel(prod_ptr, stride_p, const_ptr, quad_ptr, sq_ptr, log_norm_ptr, hi_ptr, lo_ptr, stride_r,
                      nk_ptr, s2_ptr, n_rows, n_comps,
                      DIAGONAL: tl.constexpr, WRITE_LO: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      SPLIT_DTYPE: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    sq = tl.load(sq_ptr + rows, mask=row_mask, other=0.0)
    run_max = tl.full([BLOCK_N], -3.0e38, dtype=tl.float32)  # finite: -inf components add 0
    run_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, n_comps, BLOCK_K):
        ll, _ = _log_prob(prod_ptr, stride_p, const_ptr, quad_ptr, sq, rows, row_mask, k0 + tl.arange(0, BLOCK_K),
                          n_comps, DIAGONAL)
        new_max = tl.maximum(run_max, tl.max(ll, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(ll - new_max[:, None]), axis=1)
        run_max = new_max
    log_z = run_max + tl.log(run_sum)
    tl.store(log_norm_ptr + rows, log_z, mask=row_mask)
    out_rows = rows[:, None].to(tl.int64) * stride_r
    for k0 in range(0, n_comps, BLOCK_K):
        comps = k0 + tl.arange(0, BLOCK_K)
        ll, mask = _log_prob(prod_ptr, stride_p, const_ptr, quad_ptr, sq, rows, row_mask, comps, n_comps, DIAGONAL)
        r = tl.where(mask, tl.exp(ll - log_z[:, None]), 0.0)
        if WRITE_LO:
            hi, lo = split(r, "bf16x3", SPLIT_DTYPE)
            tl.store(lo_ptr + out_rows + comps[None, :], lo, mask=mask)
        else:
            hi, _ = split(r, "bf16", SPLIT_DTYPE)
        tl.store(hi_ptr + out_rows + comps[None, :], hi, mask=mask)
        comp_mask = comps < n_comps
        tl.store(nk_ptr + pid * n_comps + comps, tl.sum(r, axis=0), mask=comp_mask)
        if not DIAGONAL:
            tl.store(s2_ptr + pid * n_comps + comps, tl.sum(r * sq[:, None], axis=0), mask=comp_mask)


def split_resp(prod, const, quad, sq, resp_hi, resp_lo, *, diagonal, block_n=32, block_k=128, num_warps=4):
    """Launch over the n rows of ``prod``.

    Parameters
    ----------
    prod : float32 Tensor of shape (n, K), unit column stride: the GEMM's products
    const : float32 Tensor of shape (K,); quad : float32 Tensor of shape (K,) (spherical; ignored for diag)
    sq : float32 Tensor of shape (>= n,), |x_n - shift|^2
    resp_hi, resp_lo : Tensors of shape (>= n, K), one row stride, unit column stride (bfloat16, float32 on
        the CPU), written; resp_lo None: resp_hi gets r rounded to bfloat16 and no remainder is kept
    diagonal : bool

    Returns
    -------
    log_norm : float32 Tensor of shape (n,)
    nk : float64 Tensor of shape (K,)
    s2 : float64 Tensor of shape (K,), sum_n r_nk |x_n|^2 (spherical), or None (diag)
    """
    n, k = prod.shape
    programs = triton.cdiv(n, block_n)
    log_norm = torch.empty(n, dtype=torch.float32, device=prod.device)
    nk = torch.empty(programs, k, dtype=torch.float32, device=prod.device)
    s2 = nk if diagonal else torch.empty(programs, k, dtype=torch.float32, device=prod.device)
    split_resp_kernel[(programs,)](
        prod, prod.stride(0), const, quad, sq, log_norm, resp_hi, resp_hi if resp_lo is None else resp_lo,
        resp_hi.stride(0), nk, s2, n, k, DIAGONAL=diagonal, WRITE_LO=resp_lo is not None, BLOCK_N=block_n,
        BLOCK_K=min(block_k, triton.next_power_of_2(k)),
        SPLIT_DTYPE=split_dtype(prod.device), num_warps=num_warps)
    return log_norm, nk.sum(0, dtype=torch.float64), None if diagonal else s2.sum(0, dtype=torch.float64)
