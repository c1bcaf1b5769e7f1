"""Exact log-densities of one given component per row, in float32 from centred differences.

    log pi_k + log N(x | k) = c_k - 1/2 sum_d prec_kd (x_d - mu_kd)^2   (spherical: prec_k sum_d ...)

Raw-scale rows (SIFT: 0..255) lose nothing to cancellation here, where the expanded form
x . lin + x^2 . quad + const of the tensor-core passes cancels. The exact-on-candidates E-step
takes these values for the component of each row's threshold and for every candidate
(``kernels.candidate_resp``).

Oracle: ``kernels.reference.weighted_log_prob`` in float64 (tests/test_exact_candidates.py).
"""
import torch
import triton
import triton.language as tl

from .truncated_select import load_rows

# Widest rows held in registers as one feature tile; wider rows are read tile by tile.
ONE_TILE_FEATURES = 128


@triton.jit
def _centred_sum(x, mean_ptr, prec_ptr, live, comp, cols, n_cols, DIAGONAL: tl.constexpr, SHARED: tl.constexpr):
    """sum over ``cols`` of prec (x - mu)^2 (diag) or (x - mu)^2 (spherical), mu and prec of ``comp[n]``,
    or of the one component ``comp`` for every row (``SHARED``: loaded once, not gathered per row)."""
    if SHARED:
        mask = (cols < n_cols)[None, :]
        offs = comp * n_cols + cols[None, :]
    else:
        mask = live[:, None] & (cols < n_cols)[None, :]
        offs = comp[:, None] * n_cols + cols[None, :]
    diff = x - tl.load(mean_ptr + offs, mask=mask, other=0.0)
    if DIAGONAL:
        return tl.sum(tl.load(prec_ptr + offs, mask=mask, other=0.0) * diff * diff, axis=1)
    return tl.sum(diff * diff, axis=1)


@triton.jit
def row_tile(x_ptr, stride_x, shift_ptr, rows, row_mask, n_cols, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
             ONE_TILE: tl.constexpr):
    """The centred rows when they fit one feature tile (kept in registers for every component
    asked of them), else zeros: ``exact_log_prob`` then reads the rows tile by tile."""
    if ONE_TILE:
        return load_rows(x_ptr, stride_x, shift_ptr, rows, row_mask, tl.arange(0, BLOCK_D), n_cols)
    return tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)


@triton.jit
def exact_log_prob(x_ptr, stride_x, shift_ptr, x_tile, mean_ptr, prec_ptr, const_ptr, rows, live, comp, n_cols,
                   DIAGONAL: tl.constexpr, ONE_TILE: tl.constexpr, BLOCK_D: tl.constexpr,
                   SHARED: tl.constexpr = False):
    """log pi_k + log N(x_n | k) of component ``comp[n]`` (int64) for every live row (-inf elsewhere),
    or of the one component ``comp`` (an int64 scalar, ``SHARED``); ``x_tile`` holds the centred rows
    when they fit one feature tile (``ONE_TILE``)."""
    if ONE_TILE:
        acc = _centred_sum(x_tile, mean_ptr, prec_ptr, live, comp, tl.arange(0, BLOCK_D), n_cols, DIAGONAL, SHARED)
    else:
        acc = tl.zeros([x_tile.shape[0]], dtype=tl.float32)
        for d0 in range(0, n_cols, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            x = load_rows(x_ptr, stride_x, shift_ptr, rows, live, cols, n_cols)
            acc += _centred_sum(x, mean_ptr, prec_ptr, live, comp, cols, n_cols, DIAGONAL, SHARED)
    if SHARED:
        if not DIAGONAL:
            acc *= tl.load(prec_ptr + comp)
        const = tl.load(const_ptr + comp)
    else:
        if not DIAGONAL:
            acc *= tl.load(prec_ptr + comp, mask=live, other=0.0)
        const = tl.load(const_ptr + comp, mask=live, other=0.0)
    return tl.where(live, const - 0.5 * acc, float("-inf"))


@triton.jit
def exact_log_prob_kernel(x_ptr, stride_x, shift_ptr, mean_ptr, prec_ptr, const_ptr, comp_ptr, out_ptr, n_rows,
                          n_cols, less, DIAGONAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                          ONE_TILE: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    x_tile = row_tile(x_ptr, stride_x, shift_ptr, rows, row_mask, n_cols, BLOCK_N, BLOCK_D, ONE_TILE)
    comp = tl.load(comp_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    ll = exact_log_prob(x_ptr, stride_x, shift_ptr, x_tile, mean_ptr, prec_ptr, const_ptr, rows, row_mask, comp,
                        n_cols, DIAGONAL, ONE_TILE, BLOCK_D)
    tl.store(out_ptr + rows, ll - less, mask=row_mask)


def feature_tile(n_features: int, one_tile_features: int = ONE_TILE_FEATURES) -> tuple[int, bool]:
    """(BLOCK_D, ONE_TILE): the whole row in one tile up to ``one_tile_features``, else 64-wide tiles."""
    one_tile = n_features <= one_tile_features
    return (triton.next_power_of_2(n_features) if one_tile else 64), one_tile


def exact_log_probs(x, shift, means, precisions, consts, comp, *, less=0.0, block_n=16):
    """Launch: the exact log-density of component ``comp[n]`` for every row n, less ``less``.

    Parameters
    ----------
    x : Tensor of shape (n, D), unit column stride
    shift : float32 Tensor of shape (D,)
    means : float32 Tensor of shape (K, D), relative to the shift
    precisions : float32 Tensor of shape (K, D) (diag) or (K,) (spherical), 1 / variance
    consts : float32 Tensor of shape (K,), log pi_k - 1/2 log det(2 pi Sigma_k)
    comp : integer Tensor of shape (n,), values in [0, K)
    less : float, subtracted from every value (the E-step's margin, for its thresholds)

    Returns
    -------
    float32 Tensor of shape (n,)
    """
    n, d = x.shape
    out = torch.empty(n, dtype=torch.float32, device=x.device)
    block_d, one_tile = feature_tile(d)
    exact_log_prob_kernel[(triton.cdiv(n, block_n),)](
        x, x.stride(0), shift, means, precisions, consts, comp.contiguous(), out, n, d, float(less),
        DIAGONAL=precisions.dim() == 2, BLOCK_N=block_n, BLOCK_D=block_d, ONE_TILE=one_tile)
    return out
