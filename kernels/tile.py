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
def dot(a, b, acc, PRECISION: tl.constexpr, SPLIT_DTYPE: tl.constexpr):
    """acc + a @ b for float32 tiles, at the requested precision.

    SPLIT_DTYPE is the type the bf16x3 pieces reach the tensor cores in:
    bfloat16 on a GPU (lossless, they are bfloat16 values), float32 under the
    interpreter.
    """
    if PRECISION == "bf16x3":
        a_hi = _round_bf16(a)
        b_hi = _round_bf16(b)
        a_lo = _round_bf16(a - a_hi).to(SPLIT_DTYPE)
        b_lo = _round_bf16(b - b_hi).to(SPLIT_DTYPE)
        a_hi = a_hi.to(SPLIT_DTYPE)
        b_hi = b_hi.to(SPLIT_DTYPE)
        # Small terms first, so the large one lands on an accumulator that already holds them.
        acc = tl.dot(a_lo, b_hi, acc)
        acc = tl.dot(a_hi, b_lo, acc)
        acc = tl.dot(a_hi, b_hi, acc)
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
def weighted_log_prob(x_ptr, stride_x, shift_ptr, quad_ptr, lin_ptr, const_ptr,
                      rows, row_mask, comps, n_comps, n_cols,
                      DIAGONAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, SPLIT_DTYPE: tl.constexpr):
    """(BLOCK_N, BLOCK_K) tile of log pi_k + log N(x_n | k); -inf for padded components.

    Also returns |x_n - shift|^2 per row (spherical statistics need it).
    """
    comp_mask = comps < n_comps
    ll = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    sq_norm = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, n_cols, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        x = load_rows(x_ptr, stride_x, shift_ptr, rows, row_mask, cols, n_cols)
        w_mask = (cols[:, None] < n_cols) & comp_mask[None, :]
        w_offs = comps[None, :] * n_cols + cols[:, None]
        lin = tl.load(lin_ptr + w_offs, mask=w_mask, other=0.0)
        # Each D tile sums into a fresh accumulator, then joins the running total:
        # round-off grows with the size of the partial sums, and with D ~ 1000 a
        # single running sum costs a decimal digit.
        part = dot(x, lin, tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32), PRECISION, SPLIT_DTYPE)
        if DIAGONAL:
            quad = tl.load(quad_ptr + w_offs, mask=w_mask, other=0.0)
            part = dot(x * x, quad, part, PRECISION, SPLIT_DTYPE)
        ll += part
        sq_norm += tl.sum(x * x, axis=1)
    if not DIAGONAL:
        # Spherical: the |x|^2 term is rank one, so it stays exact float32.
        quad = tl.load(quad_ptr + comps, mask=comp_mask, other=0.0)
        ll += sq_norm[:, None] * quad[None, :]
    const = tl.load(const_ptr + comps, mask=comp_mask, other=float("-inf"))
    return ll + const[None, :], sq_norm
