"""Device functions shared by the kernels (no kernel lives here).

Both passes work on *transposed* log-density tiles, (BLOCK_K components, BLOCK_N
rows), the orientation of flash attention: in pass 2 the responsibilities r are
then the left operand of ``r @ x`` straight from registers, as attention's P is
in ``P @ V``, and the rows of x are loaded and split once per tile and serve
both products (``W @ x^T`` for the log-densities, ``r @ x`` for the statistics).
Pass 1 uses the same functions so its log Z has exactly pass 2's rounding; it may take
the tiles the other way round, (BLOCK_N, BLOCK_K) (``ROWS_FIRST``), adding the same
products in the same order.

``PRECISION`` selects how float32 tiles meet the tensor cores:

* ``"ieee"``: plain float32 FMAs, exact to float32 round-off, slowest;
* ``"tf32x3"``: Triton's three-pass TF32 split, near-float32 accuracy;
* ``"bf16x3"``: each operand split as hi + lo bfloat16 values and three bf16
  products (hi*hi + hi*lo + lo*hi): ~2^-17 relative per product, float32 accumulate;
* ``"tf32"``: one TF32 product, fast and loose (~1e-3): opt-in only;
* ``"bf16"``: one bfloat16 product of the rounded operands, fastest and loosest
  (~1e-3 on centred data): opt-in only.
"""
import struct

import triton
import triton.language as tl


def split_dtype(device):
    """Operand type of the bf16x3 products: bfloat16 on GPUs, float32 in the interpreter."""
    return tl.bfloat16 if device.type == "cuda" else tl.float32


@triton.jit
def round_bf16(a):
    """Nearest bfloat16 value of a float32 tile, kept in float32.

    Rounding by bits rather than casting keeps the split exact and identical
    under the interpreter, which cannot multiply bfloat16 tiles.
    """
    bits = a.to(tl.int32, bitcast=True)
    return ((bits + 0x8000) & -65536).to(tl.float32, bitcast=True)


@triton.jit
def round_bf16_directed(a, UP: tl.constexpr):
    """The bfloat16 value of a float32 tile next to it toward +inf (UP) or -inf, kept in float32:
    a rounding of known direction, for bounds (by bits, as ``round_bf16``)."""
    bits = a.to(tl.int32, bitcast=True)
    # Sign and magnitude: adding 0xFFFF before the mask moves the magnitude up. The sign is read
    # from the bits, where a float comparison may flush subnormal values to zero.
    away = bits > 0 if UP else bits < 0
    bits = tl.where(away, bits + 0xFFFF, bits) & -65536
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def split(a, PRECISION: tl.constexpr, SPLIT_DTYPE: tl.constexpr):
    """Operands (hi, lo) of a float32 tile: its bfloat16 pieces for bf16x3, else (a, a).

    SPLIT_DTYPE is the type the pieces reach the tensor cores in: bfloat16 on a GPU
    (lossless, they are bfloat16 values), float32 under the interpreter.
    """
    if PRECISION == "bf16x3":
        hi = round_bf16(a)
        return hi.to(SPLIT_DTYPE), round_bf16(a - hi).to(SPLIT_DTYPE)
    elif PRECISION == "bf16":
        hi = round_bf16(a).to(SPLIT_DTYPE)
        return hi, hi
    else:
        return a, a


@triton.jit
def dot_split(a_hi, a_lo, b_hi, b_lo, acc, PRECISION: tl.constexpr, B_LO_FIRST: tl.constexpr = False):
    """acc + a @ b for operands split by ``split`` (``*_lo`` unused unless bf16x3).

    The small terms go first, so the large one lands on an accumulator that already holds
    them; B_LO_FIRST adds a_hi @ b_lo before a_lo @ b_hi, so that b^T @ a^T rounds exactly
    as a @ b does in the default order.
    """
    if PRECISION == "bf16x3":
        if B_LO_FIRST:
            acc = tl.dot(a_hi, b_lo, acc)
            acc = tl.dot(a_lo, b_hi, acc)
        else:
            acc = tl.dot(a_lo, b_hi, acc)
            acc = tl.dot(a_hi, b_lo, acc)
        acc = tl.dot(a_hi, b_hi, acc)
    elif PRECISION == "bf16":
        acc = tl.dot(a_hi, b_hi, acc)
    else:
        acc = tl.dot(a_hi, b_hi, acc, input_precision=PRECISION)
    return acc


@triton.jit
def row_operands(x_ptr, stride_x, shift_ptr, rows, row_mask, cols, n_cols,
                 DIAGONAL: tl.constexpr, PRECISION: tl.constexpr, SPLIT_DTYPE: tl.constexpr):
    """A (BLOCK_N, BLOCK_D) tile of rows minus the shift, zero outside the matrix, split for
    the tensor cores: (x_hi, x_lo, xx_hi, xx_lo, sq_norm), xx = x * x (diagonal models
    only; spherical ones get x again, unused) and sq_norm the tile's sum of x * x per row.
    """
    col_mask = cols < n_cols
    mask = row_mask[:, None] & col_mask[None, :]
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=mask, other=0)
    shift = tl.load(shift_ptr + cols, mask=col_mask, other=0.0)
    x = tl.where(mask, x.to(tl.float32) - shift[None, :], 0.0)
    xx = x * x
    x_hi, x_lo = split(x, PRECISION, SPLIT_DTYPE)
    if DIAGONAL:
        xx_hi, xx_lo = split(xx, PRECISION, SPLIT_DTYPE)
    else:
        xx_hi, xx_lo = x_hi, x_lo
    return x_hi, x_lo, xx_hi, xx_lo, tl.sum(xx, axis=1)


@triton.jit
def _weights_dot(w_hi_ptr, w_lo_ptr, w_offs, w_mask, x_hi, x_lo, acc, PRECISION: tl.constexpr,
                 ROWS_FIRST: tl.constexpr):
    w_hi = tl.load(w_hi_ptr + w_offs, mask=w_mask, other=0.0)
    w_lo = tl.load(w_lo_ptr + w_offs, mask=w_mask, other=0.0)
    if ROWS_FIRST:
        return dot_split(x_hi, x_lo, tl.trans(w_hi), tl.trans(w_lo), acc, PRECISION, True)
    else:
        return dot_split(w_hi, w_lo, tl.trans(x_hi), tl.trans(x_lo), acc, PRECISION)


@triton.jit
def log_prob_part(lin_hi_ptr, lin_lo_ptr, quad_hi_ptr, quad_lo_ptr, comps, comp_mask, cols, n_cols,
                  x_hi, x_lo, xx_hi, xx_lo, DIAGONAL: tl.constexpr, BLOCK_K: tl.constexpr,
                  BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, ROWS_FIRST: tl.constexpr):
    """Contribution of one feature tile to the log-densities, in a fresh accumulator: round-off
    grows with the size of the partial sums, and with D ~ 1000 a single running sum costs a
    decimal digit.

    The tile is (BLOCK_K, BLOCK_N), or (BLOCK_N, BLOCK_K) with ROWS_FIRST (pass 1's choice:
    its log-sum-exp then reduces within threads); both orientations add the same products
    in the same order. The weights are (K, D) matrices split by the launcher (see
    ``kernels.params``).
    """
    w_mask = comp_mask[:, None] & (cols[None, :] < n_cols)
    w_offs = comps[:, None] * n_cols + cols[None, :]
    if ROWS_FIRST:
        part = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    else:
        part = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    part = _weights_dot(lin_hi_ptr, lin_lo_ptr, w_offs, w_mask, x_hi, x_lo, part, PRECISION, ROWS_FIRST)
    if DIAGONAL:
        part = _weights_dot(quad_hi_ptr, quad_lo_ptr, w_offs, w_mask, xx_hi, xx_lo, part, PRECISION, ROWS_FIRST)
    return part


@triton.jit
def finish_log_prob(ll, sq_norm, quad_ptr, const_ptr, comps, comp_mask, DIAGONAL: tl.constexpr,
                    ROWS_FIRST: tl.constexpr):
    """Add the per-component constants (and the spherical rank-one |x|^2 term, kept exact
    in float32) to summed feature tiles: log pi_k + log N(x_n | k), -inf for padded components."""
    const = tl.load(const_ptr + comps, mask=comp_mask, other=float("-inf"))
    if not DIAGONAL:
        quad = tl.load(quad_ptr + comps, mask=comp_mask, other=0.0)
        # A fused multiply-add: an addition to the products would become their starting
        # accumulator, worked out in another register layout and converted through shared memory.
        if ROWS_FIRST:
            ll = tl.fma(sq_norm[:, None], quad[None, :], ll)
        else:
            ll = tl.fma(quad[:, None], sq_norm[None, :], ll)
    if ROWS_FIRST:
        return ll + const[None, :]
    else:
        return ll + const[:, None]


@triton.jit
def log_prob_streamed(x_ptr, stride_x, shift_ptr, lin_hi_ptr, lin_lo_ptr, quad_hi_ptr, quad_lo_ptr, const_ptr,
                      rows, row_mask, comps, n_comps, n_cols,
                      DIAGONAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, SPLIT_DTYPE: tl.constexpr,
                      ROWS_FIRST: tl.constexpr):
    """Log-densities (oriented as ``log_prob_part``'s) when D spans several feature tiles,
    re-reading the rows tile by tile; also returns |x_n - shift|^2. (When D fits one tile
    the kernels load the rows once and call ``log_prob_part`` and ``finish_log_prob``.)"""
    comp_mask = comps < n_comps
    if ROWS_FIRST:
        ll = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    else:
        ll = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    sq_norm = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, n_cols, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        x_hi, x_lo, xx_hi, xx_lo, sq = row_operands(x_ptr, stride_x, shift_ptr, rows, row_mask, cols, n_cols,
                                                    DIAGONAL, PRECISION, SPLIT_DTYPE)
        ll += log_prob_part(lin_hi_ptr, lin_lo_ptr, quad_hi_ptr, quad_lo_ptr, comps, comp_mask, cols, n_cols,
                            x_hi, x_lo, xx_hi, xx_lo, DIAGONAL, BLOCK_K, BLOCK_N, PRECISION, ROWS_FIRST)
        sq_norm += sq
    return finish_log_prob(ll, sq_norm, quad_hi_ptr, const_ptr, comps, comp_mask, DIAGONAL, ROWS_FIRST), sq_norm


@triton.jit
def float64_arg(bits):
    """The float64 whose bits an integer argument carries (``float64_bits``): Triton passes Python
    floats as float32 scalars."""
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


def float64_bits(value: float) -> int:
    """A float64's bits as a signed integer, for ``float64_arg`` (mark the argument
    ``do_not_specialize``: Triton folds an integer 1 into the kernel)."""
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]
