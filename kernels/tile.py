"""Device functions shared by the two E-step kernels (no kernel lives here).

``PRECISION`` selects how float32 tiles meet the tensor cores:

* ``"ieee"``: plain float32 FMAs, exact to float32 round-off, slowest;
* ``"tf32x3"``: Triton's three-pass TF32 split, near-float32 accuracy;
* ``"bf16x3"``: each operand split as hi + lo bfloat16 values and three bf16
  products (hi*hi + hi*lo + lo*hi): ~2^-17 relative per product, float32 accumulate;
* ``"tf32"``: one TF32 product, fast and loose (~1e-3): opt-in only.
"""
import triton
import triton.language as tl


def split_dtype(device):
    """Operand type of the bf16x3 products: bfloat16 on GPUs, float32 in the interpreter."""
    return tl.bfloat16 if device.type == "cuda" else tl.float32


@triton.jit
def _round_bf16(a):
    """Nearest bfloat16 value of a float32 tile, kept in float32.

    Rounding by bits rather than casting keeps the split exact and identical
    under the interpreter, which cannot multiply bfloat16 tiles.
    """
    bits = a.to(tl.int32, bitcast=True)
    return ((bits + 0x8000) & -65536).to(tl.float32, bitcast=True)


@triton.jit
def _split(a, SPLIT_DTYPE: tl.constexpr):
    hi = _round_bf16(a)
    return hi.to(SPLIT_DTYPE), _round_bf16(a - hi).to(SPLIT_DTYPE)


@triton.jit
def dot_presplit(a, b_hi, b_lo, acc, PRECISION: tl.constexpr, SPLIT_DTYPE: tl.constexpr):
    """acc + a @ b for a float32 tile ``a`` and ``b`` already split as b_hi + b_lo (bf16x3),
    or ``b_hi`` = b itself for the other precisions.

    SPLIT_DTYPE is the type the bf16x3 pieces reach the tensor cores in:
    bfloat16 on a GPU (lossless, they are bfloat16 values), float32 under the
    interpreter.
    """
    if PRECISION == "bf16x3":
        a_hi, a_lo = _split(a, SPLIT_DTYPE)
        # Small terms first, so the large one lands on an accumulator that already holds them.
        acc = tl.dot(a_lo, b_hi, acc)
        acc = tl.dot(a_hi, b_lo, acc)
        acc = tl.dot(a_hi, b_hi, acc)
    else:
        acc = tl.dot(a, b_hi, acc, input_precision=PRECISION)
    return acc


@triton.jit
def dot(a, b, acc, PRECISION: tl.constexpr, SPLIT_DTYPE: tl.constexpr):
    """acc + a @ b for two float32 tiles, at the requested precision."""
    if PRECISION == "bf16x3":
        b_hi, b_lo = _split(b, SPLIT_DTYPE)
        acc = dot_presplit(a, b_hi, b_lo, acc, PRECISION, SPLIT_DTYPE)
    else:
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def load_rows(x_ptr, stride_x, shift_ptr, rows, row_mask, cols, n_cols):
    """Rows of x minus the shift, as float32; zero outside the matrix."""
    col_mask = cols < n_cols
    mask = row_mask[:, None] & col_mask[None, :]
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=mask, other=0)
    shift = tl.load(shift_ptr + cols, mask=col_mask, other=0.0)
    return tl.where(mask, x.to(tl.float32) - shift[None, :], 0.0)


@triton.jit
def weighted_log_prob(x_ptr, stride_x, shift_ptr, lin_hi_ptr, lin_lo_ptr, quad_hi_ptr, quad_lo_ptr, const_ptr,
                      rows, row_mask, comps, n_comps, n_cols,
                      DIAGONAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, SPLIT_DTYPE: tl.constexpr):
    """(BLOCK_N, BLOCK_K) tile of log pi_k + log N(x_n | k); -inf for padded components.

    The weights are (D, K) matrices, split by the launcher (see ``kernels.estep``); for
    spherical models ``quad_hi_ptr`` is the (K,) vector. Also returns |x_n - shift|^2.
    """
    comp_mask = comps < n_comps
    ll = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    sq_norm = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, n_cols, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        x = load_rows(x_ptr, stride_x, shift_ptr, rows, row_mask, cols, n_cols)
        w_mask = (cols[:, None] < n_cols) & comp_mask[None, :]
        w_offs = cols[:, None] * n_comps + comps[None, :]
        # Each D tile sums into a fresh accumulator, then joins the running total:
        # round-off grows with the size of the partial sums, and with D ~ 1000 a
        # single running sum costs a decimal digit.
        part = dot_presplit(x, tl.load(lin_hi_ptr + w_offs, mask=w_mask, other=0.0),
                            tl.load(lin_lo_ptr + w_offs, mask=w_mask, other=0.0),
                            tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32), PRECISION, SPLIT_DTYPE)
        if DIAGONAL:
            part = dot_presplit(x * x, tl.load(quad_hi_ptr + w_offs, mask=w_mask, other=0.0),
                                tl.load(quad_lo_ptr + w_offs, mask=w_mask, other=0.0),
                                part, PRECISION, SPLIT_DTYPE)
        ll += part
        sq_norm += tl.sum(x * x, axis=1)
    if not DIAGONAL:
        # Spherical: the |x|^2 term is rank one, so it stays exact float32.
        quad = tl.load(quad_hi_ptr + comps, mask=comp_mask, other=0.0)
        ll += sq_norm[:, None] * quad[None, :]
    const = tl.load(const_ptr + comps, mask=comp_mask, other=float("-inf"))
    return ll + const[None, :], sq_norm
