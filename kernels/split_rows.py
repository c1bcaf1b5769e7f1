"""Row operands of the library-product E-step (``kernels.gemm``): rows centred, squared and split, in one pass.

For precision "bf16x3" each row becomes ``[x_lo | x_hi | x_hi]``, three segments of ``width``
columns: x (and for diagonal models x * x after it) relative to the shift, as bfloat16 pieces
(``tile.split``: hi = the value rounded to bfloat16, lo = the remainder rounded), zero-padded
to ``width``, a multiple of 8 so that every segment starts on a 16-byte boundary for the
tensor cores. One GEMM against ``[w_hi | w_lo | w_hi]`` then adds the three bf16x3 products;
the first two segments serve the statistics' products too. For "bf16" the row is the one
segment ``[x_hi]`` (also the wide candidate pass's operand, ``kernels.candidates_wide``). Also
writes |x - shift|^2 per row in float32, and on request ||x_hi||, the norm of the rounded row (a
separate norm re-read the pieces: ~0.18 ms of a 3.5 ms E-step, H100, N = 100K, K = 1024, D = 960).

Torch reference: ``kernels.gemm.split_rows_reference``.
"""
import triton
import triton.language as tl

from .tile import split, split_dtype
from .truncated_select import load_rows

SEGMENTS = {"bf16x3": 3, "bf16": 1}  # [lo | hi | hi], [hi]


def segment_width(n_features: int, diagonal: bool) -> int:
    """Columns of one segment: D (spherical) or 2 D (diag), rounded up to a multiple of 8."""
    return triton.cdiv(n_features * (2 if diagonal else 1), 8) * 8


@triton.jit
def _store_pieces(out_ptr, offs, mask, width, value, N_SEGMENTS: tl.constexpr, SPLIT_DTYPE: tl.constexpr):
    """Store a tile's pieces; returns hi."""
    if N_SEGMENTS == 3:
        hi, lo = split(value, "bf16x3", SPLIT_DTYPE)
        tl.store(out_ptr + offs, lo, mask=mask)
        tl.store(out_ptr + offs + width, hi, mask=mask)
        tl.store(out_ptr + offs + 2 * width, hi, mask=mask)
    else:
        hi, _ = split(value, "bf16", SPLIT_DTYPE)
        tl.store(out_ptr + offs, hi, mask=mask)
    return hi


@triton.jit
def split_rows_kernel(x_ptr, stride_x, shift_ptr, out_ptr, sq_ptr, norm_ptr, n_rows, n_cols, width,
                      DIAGONAL: tl.constexpr, N_SEGMENTS: tl.constexpr, NORM: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT_DTYPE: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    base = rows[:, None].to(tl.int64) * (N_SEGMENTS * width)
    sq = tl.zeros([BLOCK_N], dtype=tl.float32)
    rounded_sq = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, n_cols, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (cols < n_cols)[None, :]
        x = load_rows(x_ptr, stride_x, shift_ptr, rows, row_mask, cols, n_cols)
        xx = x * x
        hi = _store_pieces(out_ptr, base + cols[None, :], mask, width, x, N_SEGMENTS, SPLIT_DTYPE)
        if DIAGONAL:
            _store_pieces(out_ptr, base + n_cols + cols[None, :], mask, width, xx, N_SEGMENTS, SPLIT_DTYPE)
        sq += tl.sum(xx, axis=1)
        if NORM:
            hi = hi.to(tl.float32)
            rounded_sq += tl.sum(hi * hi, axis=1)
    tl.store(sq_ptr + rows, sq, mask=row_mask)
    if NORM:
        tl.store(norm_ptr + rows, tl.sqrt(rounded_sq), mask=row_mask)


def split_rows(x, shift, diagonal, out, sq, *, precision="bf16x3", norm=None, block_n=32, block_d=64, num_warps=4):
    """Launch: fill ``out[:n]`` and ``sq[:n]`` for the n rows of ``x`` (and ``norm[:n]``).

    Parameters
    ----------
    x : Tensor of shape (n, D), unit column stride, any real dtype
    shift : float32 Tensor of shape (D,)
    diagonal : bool
    out : Tensor of shape (>= n, SEGMENTS[precision] * segment_width(D, diagonal)), bfloat16
        (float32 on the CPU), its padding columns zero (they are never written)
    sq : float32 Tensor of shape (>= n,)
    precision : "bf16x3" or "bf16"
    norm : float32 Tensor of shape (>= n,) or None: the norm of each row's x pieces (the first D
        columns), in float32
    """
    n, d = x.shape
    segments = SEGMENTS[precision]
    width = out.shape[1] // segments
    split_rows_kernel[(triton.cdiv(n, block_n),)](
        x, x.stride(0), shift, out, sq, sq if norm is None else norm, n, d, width,
        DIAGONAL=diagonal, N_SEGMENTS=segments, NORM=norm is not None, BLOCK_N=block_n,
        BLOCK_D=min(block_d, triton.next_power_of_2(d)), SPLIT_DTYPE=split_dtype(x.device), num_warps=num_warps)
