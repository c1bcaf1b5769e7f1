"""Truncated E-step, statistics pass: N_k, sum r x, sum r x^2 from (row, component, r) triples.

The selection pass (``kernels.truncated_select``) leaves every row with C' components and
their responsibilities. Sorted by component (a stable sort, so each component's entries keep
row order), the triples form one segment per component; program (k, D tile) walks the
segment of component k, gathers its rows and sums r x and r x^2 in float64 registers. Each
output is written by exactly one program in a fixed order: no atomics, so the statistics are
bit-for-bit deterministic. Spherical models write their sum r |x|^2 as one partial per D
tile, added afterwards.

Torch reference: ``kernels.truncated._add_stats``.
"""
import torch
import triton
import triton.language as tl

from .truncated_select import load_rows


@triton.jit
def segment_stats_kernel(x_ptr, stride_x, shift_ptr, row_ptr, resp_ptr, start_ptr, nk_ptr, s1_ptr, s2_ptr,
                         n_comps, n_cols,
                         DIAGONAL: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr):
    comp = tl.program_id(0)
    pid_d = tl.program_id(1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    first = tl.load(start_ptr + comp)
    last = tl.load(start_ptr + comp + 1)
    nk = tl.zeros([BLOCK_E], dtype=tl.float64)
    s1 = tl.zeros([BLOCK_D], dtype=tl.float64)
    if DIAGONAL:
        s2 = tl.zeros([BLOCK_D], dtype=tl.float64)
    else:
        s2 = tl.zeros([BLOCK_E], dtype=tl.float64)
    for e0 in range(first, last, BLOCK_E):
        entries = e0 + tl.arange(0, BLOCK_E)
        mask = entries < last
        rows = tl.load(row_ptr + entries, mask=mask, other=0)
        r = tl.load(resp_ptr + entries, mask=mask, other=0.0).to(tl.float64)
        # Centred in float32 as the selection pass saw them, then widened: the products and
        # sums are float64, so thousands of rows per component lose nothing to round-off.
        x = load_rows(x_ptr, stride_x, shift_ptr, rows, mask, cols, n_cols).to(tl.float64)
        rx = r[:, None] * x
        s1 += tl.sum(rx, axis=0)
        if DIAGONAL:
            s2 += tl.sum(rx * x, axis=0)
        else:
            s2 += tl.sum(rx * x, axis=1)
        nk += r
    col_mask = cols < n_cols
    tl.store(s1_ptr + comp.to(tl.int64) * n_cols + cols, s1, mask=col_mask)
    if DIAGONAL:
        tl.store(s2_ptr + comp.to(tl.int64) * n_cols + cols, s2, mask=col_mask)
    else:
        tl.store(s2_ptr + pid_d * n_comps + comp, tl.sum(s2))
    if pid_d == 0:
        tl.store(nk_ptr + comp, tl.sum(nk))


def segment_stats(x, shift, members, resp, n_comps, diagonal, *, block_e=64, num_warps=4):
    """Launch the statistics pass over the kept components of every row.

    Parameters
    ----------
    x : Tensor of shape (n, D), as given to ``select``
    shift : float32 Tensor of shape (D,)
    members : int32 Tensor of shape (n, C'), valid component indices
    resp : float32 Tensor of shape (n, C')
    n_comps : int, K
    diagonal : bool

    Returns
    -------
    nk : float64 Tensor of shape (K,)
    s1 : float64 Tensor of shape (K, D)
    s2 : float64 Tensor of shape (K, D) (diag) or (K,) (spherical)
    """
    n, c = members.shape
    rows = torch.arange(n, dtype=torch.int32, device=x.device).repeat_interleave(c)
    return pair_stats(x, shift, rows, members.flatten(), resp.flatten(), n_comps, diagonal,
                      block_e=block_e, num_warps=num_warps)


def pair_stats(x, shift, rows, comps, resp, n_comps, diagonal, *, block_e=64, num_warps=4):
    """The statistics of (row, component, responsibility) triples in any order.

    Parameters
    ----------
    x : Tensor of shape (n, D), unit column stride
    shift : float32 Tensor of shape (D,)
    rows, comps : integer Tensors of shape (P,), row and component of every triple
    resp : float32 Tensor of shape (P,)
    n_comps : int, K
    diagonal : bool

    Returns
    -------
    nk, s1, s2 : as ``segment_stats``
    """
    d = x.shape[1]
    keys, order = torch.sort(comps, stable=True)
    bounds = torch.arange(n_comps + 1, dtype=keys.dtype, device=x.device)
    start = torch.searchsorted(keys, bounds)
    block_d = min(64, triton.next_power_of_2(d))
    d_tiles = triton.cdiv(d, block_d)
    f64 = dict(dtype=torch.float64, device=x.device)
    nk = torch.empty(n_comps, **f64)
    s1 = torch.empty(n_comps, d, **f64)
    s2 = torch.empty((n_comps, d) if diagonal else (d_tiles, n_comps), **f64)
    segment_stats_kernel[(n_comps, d_tiles)](
        x, x.stride(0), shift, rows[order], resp[order], start, nk, s1, s2, n_comps, d,
        DIAGONAL=diagonal, BLOCK_E=block_e, BLOCK_D=block_d, num_warps=num_warps)
    return nk, s1, s2 if diagonal else s2.sum(0)
