"""Gather pass of the exact-on-candidates E-step: each row's kept (component, r) pairs as flat triples.

``kernels.candidate_resp`` leaves each row's kept pairs packed to the front of its slots, with
their count. Given the counts' inclusive prefix sum ``ends``, row n's pairs go to positions
ends[n] - kept[n] .. ends[n] - 1, so the triples come out in row order, as the statistics pass
(``kernels.truncated_stats.pair_stats``) expects before its stable sort by component. One
program owns BLOCK_N rows and all their slots: one launch where gathering by torch indexing
takes a dozen (repeat_interleave, the slot arithmetic, three index operations).

Torch reference: ``kept_pairs_reference``.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def kept_pairs_kernel(cand_ptr, resp_ptr, kept_ptr, ends_ptr, rows_out, comps_out, resp_out, n_out, first_row, n_rows,
                      CAPACITY: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    kept = tl.load(kept_ptr + rows, mask=row_mask, other=0)
    first = tl.load(ends_ptr + rows, mask=row_mask, other=0) - kept
    row_ids = tl.broadcast_to((rows + first_row)[:, None], (BLOCK_N, BLOCK_S)).to(tl.int32)
    # Slots in chunks up to the block's longest row: rows keep a few of their slots (spherical
    # ~6 of 128), and a lane per slot mostly idled (H100, N = 1M, K = 1024, D = 128, through fit:
    # 0.07 / 0.08 ms diag / spherical against 0.18 / 0.47, bench_fit_candidates_profile_h100.json).
    for s0 in range(0, tl.max(kept), BLOCK_S):
        slots = s0 + tl.arange(0, BLOCK_S)
        src = rows.to(tl.int64)[:, None] * CAPACITY + slots[None, :]
        dst = first.to(tl.int64)[:, None] + slots[None, :]
        mask = (slots[None, :] < kept[:, None]) & (dst < n_out)
        tl.store(comps_out + dst, tl.load(cand_ptr + src, mask=mask), mask=mask)
        tl.store(resp_out + dst, tl.load(resp_ptr + src, mask=mask), mask=mask)
        tl.store(rows_out + dst, row_ids, mask=mask)


def kept_pairs(cand, resp, kept, ends, n_kept, *, first_row=0):
    """The kept (row, component, r) triples of a block of rows, in row order.

    Parameters
    ----------
    cand : int32 Tensor of shape (n, capacity), each row's kept components in its first ``kept`` slots
    resp : float32 Tensor of shape (n, capacity), their responsibilities
    kept : int32 Tensor of shape (n,), kept pairs a row (0 <= kept <= capacity)
    ends : integer Tensor of shape (n,), ``torch.cumsum(kept, 0)``
    n_kept : int, ``ends[-1]`` (read by the caller: it sizes the outputs)
    first_row : int, added to every row index (the rows' offset in a larger block)

    Returns
    -------
    rows : int32 Tensor of shape (n_kept,), row of each pair (plus ``first_row``), ascending
    comps : int32 Tensor of shape (n_kept,)
    resp : float32 Tensor of shape (n_kept,)
    """
    device = cand.device
    out = (torch.empty(n_kept, dtype=torch.int32, device=device), torch.empty(n_kept, dtype=torch.int32, device=device),
           torch.empty(n_kept, dtype=torch.float32, device=device))
    if n_kept:
        kept_pairs_into(out, cand, resp, kept, ends, first_row=first_row)
    return out


def kept_pairs_into(out, cand, resp, kept, ends, *, first_row=0, block_n=64, block_s=8, num_warps=4):
    """Launch the gather pass into given tensors: row n's pairs go to positions
    ends[n] - kept[n] .. ends[n] - 1 of ``out`` = (rows, comps, resp), each of shape (P,); pairs
    at positions >= P are dropped, so that a caller that cannot read ``ends[-1]`` (a CUDA graph)
    can size ``out`` from an estimate. ``ends`` may start past 0 (the pairs of earlier blocks);
    other arguments as ``kept_pairs``'s."""
    n, capacity = cand.shape
    rows, comps, out_resp = out
    if n:
        kept_pairs_kernel[(triton.cdiv(n, block_n),)](
            cand, resp, kept, ends, rows, comps, out_resp, rows.shape[0], first_row, n, CAPACITY=capacity,
            BLOCK_N=block_n, BLOCK_S=min(block_s, triton.next_power_of_2(capacity)), num_warps=num_warps)


def kept_pairs_reference(cand, resp, kept, n_kept, *, first_row=0):
    """``kept_pairs`` by torch indexing."""
    capacity = cand.shape[1]
    row = torch.repeat_interleave(kept.long(), output_size=n_kept)
    ends = torch.cumsum(kept.long(), 0)
    slot = row * capacity + torch.arange(n_kept, device=cand.device) - (ends - kept)[row]
    return (row + first_row).to(torch.int32), cand.reshape(-1)[slot], resp.reshape(-1)[slot]
