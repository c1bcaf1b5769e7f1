"""Exact pass of the exact-on-candidates E-step: log Z and responsibilities over each row's candidates.

One program owns BLOCK_N rows and walks their candidate slots (``kernels.candidates``) one
slot at a time, up to the block's largest count. For every stored slot the log-density is
computed in float32 from centred differences (``kernels.exact_log_prob``), so raw-scale rows
(SIFT: 0..255) lose nothing to cancellation, and folded into an online log-sum-exp; the slot
of the largest is the row's best component (the next E-step's hint, ``exact_candidates``). A second
walk turns the stored log-densities into responsibilities in place. Slots past a row's count
get responsibility 0, and so do all slots of rows that overflowed their capacity (their E-step
is the dense one; their log Z is left unwritten).

Oracle: the float64 dense E-step of ``kernels.reference`` (tests/test_exact_candidates.py).
"""
import torch
import triton
import triton.language as tl

from .exact_log_prob import exact_log_prob, feature_tile, row_tile


@triton.jit
def candidate_resp_kernel(x_ptr, stride_x, shift_ptr, mean_ptr, prec_ptr, const_ptr, cand_ptr, count_ptr,
                          log_norm_ptr, resp_ptr, best_ptr, n_rows, n_cols,
                          CAPACITY: tl.constexpr, DIAGONAL: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_D: tl.constexpr, ONE_TILE: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    # Rows of one feature tile stay in registers for every slot; wider rows are re-read per slot.
    x_tile = row_tile(x_ptr, stride_x, shift_ptr, rows, row_mask, n_cols, BLOCK_N, BLOCK_D, ONE_TILE)
    count = tl.load(count_ptr + rows, mask=row_mask, other=0)
    count = tl.where(count <= CAPACITY, count, 0)  # overflowed rows: the dense E-step's
    slots = rows.to(tl.int64) * CAPACITY
    run_max = tl.full([BLOCK_N], -3.0e38, dtype=tl.float32)
    run_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    best = tl.zeros([BLOCK_N], dtype=tl.int64)
    for s in range(tl.max(count)):
        live = s < count
        comp = tl.load(cand_ptr + slots + s, mask=live, other=0).to(tl.int64)
        ll = exact_log_prob(x_ptr, stride_x, shift_ptr, x_tile, mean_ptr, prec_ptr, const_ptr, rows, live, comp,
                            n_cols, DIAGONAL, ONE_TILE, BLOCK_D)
        tl.store(resp_ptr + slots + s, ll, mask=live)
        best = tl.where(ll > run_max, comp, best)
        new_max = tl.maximum(run_max, ll)
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.exp(ll - new_max)
        run_max = new_max
    log_z = run_max + tl.log(tl.where(count > 0, run_sum, 1.0))  # rows with no slot: log Z unused
    tl.store(log_norm_ptr + rows, log_z, mask=row_mask & (count > 0))
    tl.store(best_ptr + rows, best.to(tl.int32), mask=row_mask & (count > 0))
    for s in range(tl.max(count)):
        live = s < count
        ll = tl.load(resp_ptr + slots + s, mask=live, other=float("-inf"))
        tl.store(resp_ptr + slots + s, tl.exp(ll - log_z), mask=live)  # slots past the count keep their 0


def candidate_resp(x, shift, means, precisions, consts, cand, count, *, block_n=4, num_warps=1):
    """Launch the exact pass.

    Parameters
    ----------
    x : Tensor of shape (n, D), unit column stride
    shift : float32 Tensor of shape (D,)
    means : float32 Tensor of shape (K, D), relative to the shift
    precisions : float32 Tensor of shape (K, D) (diag) or (K,) (spherical), 1 / variance
    consts : float32 Tensor of shape (K,), log pi_k - 1/2 log det(2 pi Sigma_k) (less the E-step's offset)
    cand, count : from ``kernels.candidates.candidates``

    Returns
    -------
    log_norm : float32 Tensor of shape (n,), written where 0 < count <= capacity
    resp : float32 Tensor of shape (n, capacity), 0 past each row's count and on overflowed rows
    best : int32 Tensor of shape (n,), the component of largest log-density, written where
        0 < count <= capacity
    """
    n, d = x.shape
    capacity = cand.shape[1]
    log_norm = torch.empty(n, dtype=torch.float32, device=x.device)
    resp = torch.zeros(n, capacity, dtype=torch.float32, device=x.device)
    best = torch.empty(n, dtype=torch.int32, device=x.device)
    # A block walks as many slots as its longest row holds: few rows a block waste few steps.
    # Timed on an H100 (bench_estep's D = 128 cell, rows in registers): 4 rows with 1 warp took
    # 1.2-3.8x less time than 4-32 rows with 2-4 warps, diag and spherical.
    block_d, one_tile = feature_tile(d)
    candidate_resp_kernel[(triton.cdiv(n, block_n),)](
        x, x.stride(0), shift, means, precisions, consts, cand, count, log_norm, resp, best, n, d,
        CAPACITY=capacity, DIAGONAL=precisions.dim() == 2, BLOCK_N=block_n, BLOCK_D=block_d, ONE_TILE=one_tile,
        num_warps=num_warps)
    return log_norm, resp, best
