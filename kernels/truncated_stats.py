"""Truncated E-step, statistics pass: N_k, sum r x, sum r x^2 from (row, component, r) triples.

The selection pass (``kernels.truncated_select``) leaves every row with C' components and
their responsibilities. Sorted by component (a stable sort, so each component's entries keep
row order), the triples form one segment per component, cut into pieces of at most
``PIECE`` entries: program (piece, D tile) gathers its piece's rows and sums r x and r x^2 in
float64 registers, and a second pass adds each component's pieces in order. A component that
owns most rows (skewed posteriors) is thus spread over many programs instead of keeping one
busy while the rest idle. Every partial and every output is written by exactly one program in
a fixed order: no atomics, so the statistics are bit-for-bit deterministic. Spherical models
sum r |x|^2 as one partial per D tile, added afterwards.

Torch reference: ``kernels.truncated._add_stats``.
"""
import torch
import triton
import triton.language as tl

from .truncated_select import load_rows


# Entries per piece of a component's segment: large enough that a piece's partial sums cost
# little to add, small enough that a segment of a million entries spreads over hundreds of programs.
PIECE = 4096


# Probes of each step of a search: a step narrows the range 17-fold, so 3.4M sorted keys take 6
# dependent reads where a binary search takes 22.
FANOUT = 16


@triton.jit
def _lower_bound(sorted_ptr, n, values, n_steps, FANOUT: tl.constexpr):
    """For each of ``values`` (1-D), how many of the n sorted entries are below it: a search of
    ``n_steps`` (``_steps``) steps, each reading FANOUT evenly spaced entries of the range left."""
    lo = tl.zeros(values.shape, dtype=tl.int64)
    hi = lo + n
    at = tl.arange(1, FANOUT + 1)
    for _ in range(n_steps):
        probe = lo[:, None] + ((hi - lo)[:, None] * at[None, :]) // (FANOUT + 1)
        live = probe < hi[:, None]
        below = live & (tl.load(sorted_ptr + probe, mask=live, other=0) < values[:, None])
        # Sorted entries: the probes below the value come first.
        lo = tl.max(tl.where(below, probe + 1, lo[:, None]), axis=1)
        hi = tl.min(tl.where(live & ~below, probe, hi[:, None]), axis=1)
    return lo


@triton.jit
def piece_layout_kernel(keys_ptr, n_keys, start_ptr, count_ptr, n_comps, n_steps, PIECE: tl.constexpr,
                        BLOCK: tl.constexpr, FANOUT: tl.constexpr):
    """Where each component's segment of the sorted keys starts (components 0..K+1, K's segment
    the skipped triples') and how many pieces it takes, at least one (components below K), written
    one place on so that a cumulative sum gives each component's first piece."""
    comps = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = comps < n_comps + 2
    start = _lower_bound(keys_ptr, n_keys, comps, n_steps, FANOUT)
    length = _lower_bound(keys_ptr, n_keys, comps + 1, n_steps, FANOUT) - start
    pieces = tl.where(comps < n_comps, tl.maximum((length + PIECE - 1) // PIECE, 1), 0)
    tl.store(start_ptr + comps, start, mask=mask)
    tl.store(count_ptr + comps + 1, pieces, mask=comps < n_comps + 1)
    if tl.program_id(0) == 0:
        tl.store(count_ptr, 0)


@triton.jit
def _triples(order_ptr, row_ptr, resp_ptr, e0, last, BLOCK_E: tl.constexpr):
    """(mask, rows, r in float64) of the sorted entries e0 .. e0 + BLOCK_E (below ``last``): the
    triples in the order they were given, read through the sort's permutation ``order``."""
    entries = e0 + tl.arange(0, BLOCK_E)
    mask = entries < last
    triple = tl.load(order_ptr + entries, mask=mask, other=0)
    rows = tl.load(row_ptr + triple, mask=mask, other=0)
    return mask, rows, tl.load(resp_ptr + triple, mask=mask, other=0.0).to(tl.float64)


@triton.jit
def piece_stats_kernel(x_ptr, stride_x, shift_ptr, row_ptr, resp_ptr, order_ptr, start_ptr, piece_first_ptr,
                       part_ptr, width, n_cols, n_comps, n_steps,
                       DIAGONAL: tl.constexpr, PIECE: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
                       FANOUT: tl.constexpr):
    """Partial sums of one piece (program axis 0) and D tile (axis 1), written to the piece's row
    of ``part``: N_k, then S1's D columns, then S2's D (diag) or one per D tile (spherical)."""
    piece = tl.program_id(0)
    pid_d = tl.program_id(1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    # The piece's component: how many components' pieces end at or before it (pieces past the
    # last component's belong to component K, whose segment is skipped).
    comp = tl.sum(_lower_bound(piece_first_ptr + 1, n_comps, tl.zeros([1], dtype=tl.int64) + piece + 1, n_steps,
                               FANOUT), axis=0)
    first = tl.load(start_ptr + comp) + (piece - tl.load(piece_first_ptr + comp)) * PIECE
    # Component K's entries (pairs that stand for none) are never read.
    last = tl.where(comp < n_comps, tl.minimum(first + PIECE, tl.load(start_ptr + comp + 1)), first)
    # (BLOCK_E, BLOCK_D) partial sums, reduced across entries once at the end: a reduction per
    # step would cross warps through shared memory every BLOCK_E entries.
    nk = tl.zeros([BLOCK_E], dtype=tl.float64)
    s1 = tl.zeros([BLOCK_E, BLOCK_D], dtype=tl.float64)
    s2 = tl.zeros([BLOCK_E, BLOCK_D], dtype=tl.float64)
    # Each step's triples are read one step ahead, before the sums of the step before: the two
    # dependent reads (permutation, then triple) then wait alongside the rows' read. H100, 6M
    # triples of a 'candidates' E-step (N = 1M, K = 1024, D = 128, byte rows): 0.71 against 0.91 ms.
    mask, rows, r = _triples(order_ptr, row_ptr, resp_ptr, first, last, BLOCK_E)
    for e0 in range(first, last, BLOCK_E):
        # Centred in float32 as the selection pass saw them, then widened: the products and
        # sums are float64, so thousands of rows per component lose nothing to round-off.
        x = load_rows(x_ptr, stride_x, shift_ptr, rows, mask, cols, n_cols).to(tl.float64)
        step = r
        mask, rows, r = _triples(order_ptr, row_ptr, resp_ptr, e0 + BLOCK_E, last, BLOCK_E)
        rx = step[:, None] * x
        s1 += rx
        s2 += rx * x
        nk += step
    col_mask = cols < n_cols
    part = part_ptr + piece.to(tl.int64) * width
    tl.store(part + 1 + cols, tl.sum(s1, axis=0), mask=col_mask)
    if DIAGONAL:
        tl.store(part + 1 + n_cols + cols, tl.sum(s2, axis=0), mask=col_mask)
    else:
        tl.store(part + 1 + n_cols + pid_d, tl.sum(tl.sum(s2, axis=0)))
    if pid_d == 0:
        tl.store(part, tl.sum(nk))


@triton.jit
def piece_sum_kernel(part_ptr, piece_first_ptr, out_ptr, width, BLOCK: tl.constexpr):
    """out[k] = sum of the (width,) partials of component k's pieces, in piece order."""
    comp = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    # Piece indices are int64 (loaded from piece_first), so their offsets do not overflow.
    for piece in range(tl.load(piece_first_ptr + comp), tl.load(piece_first_ptr + comp + 1)):
        acc += tl.load(part_ptr + piece * width + cols, mask=mask, other=0.0)
    tl.store(out_ptr + comp.to(tl.int64) * width + cols, acc, mask=mask)


def _steps(n: int) -> int:
    """Steps of ``_lower_bound`` over n sorted entries: each leaves at most 1 / (FANOUT + 1) of
    the range (rounded down) to search."""
    steps = 1
    while n := n // (FANOUT + 1):
        steps += 1
    return steps


def _sum_pieces(partials, piece_first, n_comps):
    """(K, ...) float64: each component's partials (pieces along axis 0) added in piece order."""
    width = partials[0].numel()
    out = torch.empty((n_comps,) + partials.shape[1:], dtype=torch.float64, device=partials.device)
    block = min(128, triton.next_power_of_2(width))
    piece_sum_kernel[(n_comps, triton.cdiv(width, block))](partials, piece_first, out, width, BLOCK=block)
    return out


def segment_stats(x, shift, members, resp, n_comps, diagonal, *, block_e=32, num_warps=4):
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


def pair_stats(x, shift, rows, comps, resp, n_comps, diagonal, *, block_e=32, block_d=64, num_warps=4):
    """The statistics of (row, component, responsibility) triples in any order.

    Parameters
    ----------
    x : Tensor of shape (n, D), unit column stride
    shift : float32 Tensor of shape (D,)
    rows, comps : integer Tensors of shape (P,), row and component of every triple; component K
        stands for none (the triple is skipped: unused entries of a buffer sized in advance)
    resp : float32 Tensor of shape (P,)
    n_comps : int, K
    diagonal : bool

    Returns
    -------
    nk, s1, s2 : as ``segment_stats``
    """
    d = x.shape[1]
    # Components (and K, the skipped triples') fit 16 bits: cub's radix sort then makes two passes
    # over the keys, not four (H100, 3.4M keys: 0.16 against 0.24 ms).
    keys, order = torch.sort(comps.to(torch.int16 if n_comps < 2 ** 15 else torch.int32), stable=True)
    # Segment bounds of components 0..K+1, where component K's segment holds the skipped triples, and
    # each component's first piece. Every component gets at least one piece, so every output is
    # written; sum_k ceil(L_k / PIECE) is at most K + P // PIECE, a size the host knows without
    # reading the GPU. Pieces past the last component's belong to component K: they read nothing.
    # One launch and a cumulative sum, where torch's searches and arithmetic took a dozen
    # launches that the GPU waited for.
    start = torch.empty(n_comps + 2, dtype=torch.int64, device=x.device)
    counts = torch.empty(n_comps + 2, dtype=torch.int64, device=x.device)
    # Small programs: each value's search holds FANOUT probes.
    layout = 64
    piece_layout_kernel[(triton.cdiv(n_comps + 2, layout),)](
        keys, len(keys), start, counts, n_comps, _steps(len(keys)), PIECE=PIECE, BLOCK=layout,
        FANOUT=FANOUT)
    piece_first = torch.cumsum(counts, 0)
    n_pieces = n_comps + len(comps) // PIECE
    block_d = min(block_d, triton.next_power_of_2(d))
    d_tiles = triton.cdiv(d, block_d)
    # One row of partials a piece (N_k, S1, S2 side by side): one launch adds them up.
    width = 1 + d + (d if diagonal else d_tiles)
    partials = torch.empty(n_pieces, width, dtype=torch.float64, device=x.device)
    piece_stats_kernel[(n_pieces, d_tiles)](
        x, x.stride(0), shift, rows, resp, order, start, piece_first, partials, width, d, n_comps, _steps(n_comps),
        DIAGONAL=diagonal, PIECE=PIECE, BLOCK_E=block_e, BLOCK_D=block_d, FANOUT=FANOUT, num_warps=num_warps)
    total = _sum_pieces(partials, piece_first, n_comps)
    nk, s1, s2 = total[:, 0], total[:, 1:1 + d], total[:, 1 + d:]
    return nk, s1, s2 if diagonal else s2.sum(1)
