"""Candidate selection from precomputed products: the candidate pass for rows wide enough for library GEMMs.

``kernels.gemm.candidates`` computes, per block of rows, the approximate log-densities l~ from
a bfloat16 product and the error-bound product B (``kernels.candidates``' two products) as
cuBLAS GEMMs with float32 output, and each row's threshold. One program owns BLOCK_N rows of l~
and B and keeps every component whose upper bound l~ + e reaches the row's threshold, with the
candidate pass's own bound and slot layout (``candidates.upper_bound``, ``candidates.keep``).

Oracle: the float64 log-densities of ``kernels.reference`` (tests/test_exact_candidates.py).
"""
import triton
import triton.language as tl

from .candidates import keep, upper_bound


@triton.jit
def candidate_select_kernel(ll_ptr, bound_ptr, stride_p, floor_ptr, cand_ptr, count_ptr, n_rows, n_comps, eps, slack,
                            CAPACITY: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    floor = tl.load(floor_ptr + rows, mask=row_mask, other=0.0)
    count = tl.zeros([BLOCK_N], dtype=tl.int32)
    cand_ptr += tl.program_id(0).to(tl.int64) * BLOCK_N * CAPACITY
    out_rows = tl.arange(0, BLOCK_N) * CAPACITY
    for k0 in range(0, n_comps, BLOCK_K):
        comps = k0 + tl.arange(0, BLOCK_K)
        comp_mask = comps < n_comps
        offs = rows[:, None].to(tl.int64) * stride_p + comps[None, :]
        mask = row_mask[:, None] & comp_mask[None, :]
        ll = tl.load(ll_ptr + offs, mask=mask, other=float("-inf"))
        upper = upper_bound(ll, tl.load(bound_ptr + offs, mask=mask, other=0.0), eps, slack)
        count = keep(upper, floor, count, comps, row_mask, cand_ptr, out_rows, CAPACITY)
    tl.store(count_ptr + rows, count, mask=row_mask)


def candidate_select(ll, bound, floor, eps, slack, cand, count, *, block_n=32, block_k=128, num_warps=4):
    """Launch: fill the candidate slots of the m rows of ``prod``.

    Parameters
    ----------
    ll, bound : float32 Tensors of shape (m, K), unit column stride: the approximate log-densities
        (x~ . w~ plus the constants) and the error-bound product |x~| . |w~|
    floor : float32 Tensor of shape (m,), each row's threshold
    eps, slack : the bound's factors (``candidates.bound_eps``, ``candidates.FLOAT32_SLACK``)
    cand, count : outputs of shapes (m, capacity), (m,), as returned by ``kernels.candidates.candidates``
    """
    m, k = ll.shape
    if bound.shape != ll.shape or bound.stride() != ll.stride() or ll.stride(1) != 1:
        raise ValueError("ll and bound must share one (m, K) layout with unit column stride")
    candidate_select_kernel[(triton.cdiv(m, block_n),)](
        ll, bound, ll.stride(0), floor, cand, count, m, k, float(eps), float(slack), CAPACITY=cand.shape[1],
        BLOCK_N=block_n,
        BLOCK_K=min(block_k, max(16, triton.next_power_of_2(k))), num_warps=num_warps)
