"""Candidate pass for rows wider than one feature tile: the rows split once, then one fused pass.

``kernels.candidates`` loads a row tile once and keeps it in registers while it streams over the
components, which holds up to D = 128; wider rows would be re-read and re-split (shift, square,
bfloat16 rounding) for every tile of components, and cuBLAS products of the split rows would
send every (row, component) product through memory twice more (stored, then read back to be
marked). Here each block of rows is split once (``kernels.split_rows``, precision "bf16": [x~ | x~^2]
for diagonal models, x~ for spherical ones, and each row's |x|^2 and ||x~||), then one program
per BLOCK_N rows streams over (component tile, feature tile) pairs as a GEMM does, reading the
pieces, and marks its candidates from the accumulators in registers.

The products and their upper bound are those of ``kernels.candidates`` (whose docstring proves
it): diag P = x~ . lin~ + x~^2 . q~, two bfloat16 products a tile pair into one accumulator, then
+ b_k; spherical P = x~ . lin~, one product, then the bound's 16 columns into the same accumulator.
An accumulator sums at most 2 D (diag) or D + 16 products in float32, as the bound's factors allow,
in any order. The threshold is each row's given floor (``kernels.exact_log_prob`` of a hint
component less the margin), as in the fused pass.

Oracle: the float64 log-densities of ``kernels.reference`` (tests/test_exact_candidates.py).
"""
import torch
import triton
import triton.language as tl

from .candidates import bound_rows, check_block_k, mark, mark_floor, n_words, product, upper_bound
from .exact_log_prob import exact_log_probs
from .split_rows import segment_width, split_rows
from .tile import split_dtype

# Bytes of one block's split rows (bfloat16 pieces): fewer blocks, fewer launches.
BLOCK_BYTES = 256 << 20


@triton.jit
def candidates_wide_kernel(xs_ptr, stride_xs, sq_ptr, norm_ptr, lin_ptr, quad_ptr, bound_ptr, floor_ptr, mark_ptr,
                           n_rows, n_comps, n_cols, n_words, DIAGONAL: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_K: tl.constexpr,
                           SPLIT_DTYPE: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    base = rows.to(tl.int64)[:, None] * stride_xs
    floor = mark_floor(tl.load(floor_ptr + rows, mask=row_mask, other=0.0), row_mask)
    row_terms = floor
    if not DIAGONAL:
        row_terms = bound_rows(tl.load(sq_ptr + rows, mask=row_mask, other=0.0),
                               tl.load(norm_ptr + rows, mask=row_mask, other=0.0), SPLIT_DTYPE)
    for k0 in range(0, n_comps, BLOCK_K):
        comps = k0 + tl.arange(0, BLOCK_K)
        comp_mask = comps < n_comps
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for d0 in range(0, n_cols, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            col_mask = cols < n_cols
            mask = row_mask[:, None] & col_mask[None, :]
            x = tl.load(xs_ptr + base + cols[None, :], mask=mask, other=0.0)
            acc = product(acc, x, lin_ptr, comps, comp_mask, cols, col_mask, n_cols)
            if DIAGONAL:
                xx = tl.load(xs_ptr + base + n_cols + cols[None, :], mask=mask, other=0.0)
                acc = product(acc, xx, quad_ptr, comps, comp_mask, cols, col_mask, n_cols)
        upper = upper_bound(acc, row_terms, bound_ptr, comps, comp_mask, DIAGONAL, EVEN_K)
        mark(upper, floor, rows, row_mask, k0, mark_ptr, n_words, BLOCK_N, BLOCK_K)


def candidates_wide(x, shift, weights, centred, hint, margin, config, *, rows=None):
    """Launch the candidate pass of wide rows, block by block of rows.

    Parameters
    ----------
    x : Tensor of shape (n, D), unit column stride, any real dtype
    shift : float32 Tensor of shape (D,)
    weights : ``candidates.SearchWeights``
    centred, hint, margin : each row's threshold, as ``kernels.candidates.candidates``
    config : LaunchConfig: tiles (block_n, block_k a multiple of 32, block_d), warps, stages
    rows : int, rows per block of split rows (default: ``BLOCK_BYTES`` of pieces)

    Returns
    -------
    marks : as ``kernels.candidates.candidates``
    """
    n, d = x.shape
    check_block_k(config.block_k)
    diagonal = weights.diagonal
    width = segment_width(d, diagonal)
    piece = weights.lin.dtype
    rows = min(max(n, 1), rows or max(config.block_n, BLOCK_BYTES // (piece.itemsize * width)))
    pieces = torch.zeros(rows, width, dtype=piece, device=x.device)
    sq = torch.empty(rows, dtype=torch.float32, device=x.device)
    norm = None if diagonal else torch.empty(rows, dtype=torch.float32, device=x.device)
    marks = torch.empty(n, n_words(weights.n_comps), dtype=torch.int32, device=x.device)
    floor = exact_log_probs(x, shift, *centred, hint, less=margin)
    for start in range(0, n, rows):
        block = x[start:start + rows]
        m = block.shape[0]
        split_rows(block, shift, diagonal, pieces, sq, precision="bf16", norm=norm)
        candidates_wide_kernel[(triton.cdiv(m, config.block_n),)](
            pieces, pieces.stride(0), sq, sq if norm is None else norm, weights.lin,
            *((weights.quad, weights.bias) if diagonal else (weights.lin, weights.columns)), floor[start:start + m],
            marks[start:start + m], m, weights.n_comps, d, marks.shape[1], DIAGONAL=diagonal,
            BLOCK_N=config.block_n, BLOCK_K=config.block_k, BLOCK_D=config.block_d,
            EVEN_K=weights.n_comps % config.block_k == 0, SPLIT_DTYPE=split_dtype(x.device),
            num_warps=config.num_warps, num_stages=config.num_stages)
    return marks
