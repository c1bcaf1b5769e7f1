"""The bf16x3 E-step as library matrix products (cuBLAS on a GPU), for rows wider than one feature tile.

Up to D = 128 a row fits one feature tile and the fused kernels (``kernels.log_norm``,
``kernels.stats``) load and split it once per tile of rows. Wider rows are re-read and
re-split for every tile of components, and the products run on small tiles: at D = 960 the
fused bf16x3 E-step took 34.5 ms an iteration on an H100 where float32 cuBLAS products took
20.6 (N = 100K, K = 1024; ``eval/results/bench_estep_d960_h100.json``). Here the same bf16x3
products are three bfloat16 GEMMs with float32 accumulation and output per product, over
blocks of ``block_rows`` rows:

    L = X W^T + c           X = [x, x*x] (diag) or x (spherical), W = [lin, quad] or lin
    R = exp(L - log Z)      log Z = logsumexp over the components, float32
    [S1, S2] = R^T [x, x*x] (spherical: R^T [x, |x|^2])

each product a b = a_lo b_hi + a_hi b_lo + a_hi b_hi over the operands' bfloat16 pieces
(``a_hi`` = a rounded to bfloat16, ``a_lo`` = a - a_hi rounded), small terms first, as the
fused kernels add them. The (rows, K) block of responsibilities exists only within a block;
N_k and the statistics are summed over blocks in float64. Spherical models add
quad_k |x_n|^2 to L in float32, as the fused kernels do.

On the CPU the pieces are held in float32 (the same values) and multiplied in float32, so
the tests run the arithmetic a GPU runs. Oracle: ``kernels.reference`` in float64
(tests/test_gemm_estep.py).
"""
from __future__ import annotations

import torch

from .params import KernelWeights
from .result import EStepResult

# Bytes of one block's temporaries (float32 L and R, the operands' pieces): bounds memory
# and keeps the float32 sums inside each product to at most MAX_BLOCK_ROWS rows.
BLOCK_BYTES = 256 << 20
MAX_BLOCK_ROWS = 16384


def block_rows(n_comps: int, n_features: int, budget: int = BLOCK_BYTES) -> int:
    """Rows per block: float32 L (K) and its two pieces (2 K), float32 X (2 D + 1) and its pieces."""
    per_row = 4 * n_comps + 4 * n_comps + 4 * (2 * n_features + 1) + 4 * (2 * n_features + 1)
    return max(256, min(MAX_BLOCK_ROWS, budget // per_row))


def _pieces(a: torch.Tensor, piece: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo): a rounded to bfloat16, and the rounded remainder, as ``piece`` tensors."""
    hi = a.to(torch.bfloat16)
    lo = (a - hi.to(a.dtype)).to(torch.bfloat16)
    return hi.to(piece), lo.to(piece)


def _product(a_hi, a_lo, b_hi, b_lo) -> torch.Tensor:
    """a @ b from their pieces, float32: a_lo b_hi + a_hi b_lo + a_hi b_hi, accumulated in the GEMM."""
    if a_hi.dtype == torch.bfloat16:
        out = torch.mm(a_lo, b_hi, out_dtype=torch.float32)
        out = torch.addmm(out, a_hi, b_lo, out_dtype=torch.float32)
        return torch.addmm(out, a_hi, b_hi, out_dtype=torch.float32)
    out = torch.mm(a_lo, b_hi)
    out = torch.addmm(out, a_hi, b_lo)
    return torch.addmm(out, a_hi, b_hi)


def _operands(x, shift, diagonal):
    """float32 X of a block: [x, x*x] (diag) or [x, |x|^2] (spherical), x relative to the shift."""
    xs = x.to(torch.float32) - shift
    if diagonal:
        return torch.cat([xs, xs * xs], 1)
    return torch.cat([xs, (xs * xs).sum(1, keepdim=True)], 1)


def _log_prob(xcat, x_hi, x_lo, w_hi, w_lo, weights: KernelWeights, d):
    """L of a block, float32 (rows, K)."""
    if weights.diagonal:
        ll = _product(x_hi, x_lo, w_hi.T, w_lo.T)
    else:
        ll = _product(x_hi[:, :d], x_lo[:, :d], w_hi.T, w_lo.T)
        ll.addcmul_(xcat[:, d:], weights.quad_hi[None, :])
    return ll.add_(weights.const)


def _weight_pieces(weights: KernelWeights):
    """(W_hi, W_lo) of ``weights`` laid out for precision "bf16x3": (K, 2D) diag, (K, D) spherical."""
    if weights.diagonal:
        return torch.cat([weights.lin_hi, weights.quad_hi], 1), torch.cat([weights.lin_lo, weights.quad_lo], 1)
    return weights.lin_hi, weights.lin_lo


def estep(x, shift, weights: KernelWeights, *, rows=None) -> EStepResult:
    """E-step of a block of rows by bf16x3 library products.

    Parameters
    ----------
    x : Tensor of shape (n, D), any real dtype
    shift : float32 Tensor of shape (D,)
    weights : KernelWeights laid out for precision "bf16x3" (bfloat16 pieces on a GPU,
        float32 ones on the CPU), their largest constant split off
    rows : int, rows per block (default ``block_rows``)

    Returns
    -------
    EStepResult, float64 (log_norm without the split-off constant)
    """
    n, d = x.shape
    k = weights.n_comps
    f64 = dict(dtype=torch.float64, device=x.device)
    w_hi, w_lo = _weight_pieces(weights)
    piece = w_hi.dtype
    log_norm = torch.empty(n, **f64)
    nk = torch.zeros(k, **f64)
    stats = torch.zeros(k, 2 * d if weights.diagonal else d + 1, **f64)
    rows = rows or block_rows(k, d)
    for start in range(0, n, rows):
        xcat = _operands(x[start:start + rows], shift, weights.diagonal)
        x_hi, x_lo = _pieces(xcat, piece)
        ll = _log_prob(xcat, x_hi, x_lo, w_hi, w_lo, weights, d)
        lz = torch.logsumexp(ll, 1)
        log_norm[start:start + len(xcat)] = lz
        resp = ll.sub_(lz[:, None]).exp_()
        nk += resp.sum(0, dtype=torch.float64)
        r_hi, r_lo = _pieces(resp, piece)
        stats += _product(r_hi.T, r_lo.T, x_hi, x_lo)
    s2 = stats[:, d:] if weights.diagonal else stats[:, d]
    return EStepResult(log_norm, nk, stats[:, :d].contiguous(), s2.contiguous())


def log_norm(x, shift, weights: KernelWeights, *, rows=None) -> tuple[torch.Tensor, torch.Tensor]:
    """log Z_n (float32, without the split-off constant) and argmax_k L_nk (int32) of every row."""
    n, d = x.shape
    w_hi, w_lo = _weight_pieces(weights)
    lz = torch.empty(n, dtype=torch.float32, device=x.device)
    best = torch.empty(n, dtype=torch.int32, device=x.device)
    rows = rows or block_rows(weights.n_comps, d)
    for start in range(0, n, rows):
        xcat = _operands(x[start:start + rows], shift, weights.diagonal)
        ll = _log_prob(xcat, *_pieces(xcat, w_hi.dtype), w_hi, w_lo, weights, d)
        lz[start:start + len(xcat)] = torch.logsumexp(ll, 1)
        best[start:start + len(xcat)] = ll.argmax(1)
    return lz, best
