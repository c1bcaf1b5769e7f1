"""The bf16x3 (and bf16) E-step as library matrix products (cuBLAS on a GPU), for rows wider than one feature tile.

Up to D = 128 a row fits one feature tile and the fused kernels (``kernels.log_norm``,
``kernels.stats``) load and split it once per tile of rows. Wider rows are re-read and
re-split for every tile of components: at D = 960 the fused bf16x3 E-step took 34 ms an
iteration on an H100 where float32 cuBLAS products took 12 (N = 100K, K = 1024;
``eval/results/bench_estep_gemm_h100.json``). Here the same bf16x3 products
(a b ~ a_lo b_hi + a_hi b_lo + a_hi b_hi over bfloat16 pieces, float32 accumulation) are
bfloat16 GEMMs with float32 output, over blocks of rows:

1. ``kernels.split_rows``: X = [x_lo | x_hi | x_hi], x = [x, x*x] (diag) or x (spherical)
   relative to the shift, and |x|^2;
2. one GEMM: P = X [w_hi | w_lo | w_hi]^T, the three products of the log-densities at once;
3. ``kernels.split_resp``: log Z, the responsibilities r as bfloat16 pieces, N_k (and for
   spherical models sum r |x|^2) from P plus each component's constant;
4. two GEMMs: r_hi^T [x_lo | x_hi] and r_lo^T x_hi, whose three (K, width) parts add up to
   sum r x and sum r x*x (diag).

Precision "bf16" makes one product of the rounded operands instead of three: X = [x_hi],
W = [w_hi], and r_hi^T x_hi. Statistics are summed over blocks in float64; no (rows, K) block
outlives its block. On the CPU the pieces are held in float32 (the
same values) and the kernels run in Triton's interpreter, so the tests run the arithmetic a GPU
runs. Oracle: ``kernels.reference`` in float64 (tests/test_gemm_estep.py).
"""
from __future__ import annotations

import torch

from .params import KernelWeights
from .result import EStepResult
from .split_resp import split_resp
from .split_rows import SEGMENTS, segment_width, split_rows

PRECISIONS = tuple(SEGMENTS)  # the schemes this E-step runs
# bfloat16 GEMMs with float32 output (``torch.mm(..., out_dtype=)``, the aten overload mm.dtype)
# came with recent torch releases; without them a GPU keeps the fused kernels.
AVAILABLE = hasattr(torch.ops.aten.mm, "dtype")
# Bytes of one block's buffers (the row pieces, the float32 products, the responsibilities'
# pieces); at most MAX_BLOCK_ROWS rows, which also bounds the float32 sums inside each product.
BLOCK_BYTES = 256 << 20
MAX_BLOCK_ROWS = 16384


def block_rows(n_comps: int, n_features: int, diagonal: bool = True, budget: int = BLOCK_BYTES) -> int:
    """Rows per block: 4 bytes a row piece (3 segments), 4 per product and 8 per responsibility pair."""
    per_row = 4 * 3 * segment_width(n_features, diagonal) + 12 * _padded(n_comps)
    return max(256, min(MAX_BLOCK_ROWS, budget // per_row))


def _padded(k: int) -> int:
    """Row stride of the responsibilities' pieces: K rounded up to 8 (16-byte rows for the tensor cores)."""
    return -(-k // 8) * 8


def _product(a, b) -> torch.Tensor:
    """a @ b in float32: bfloat16 operands through a GEMM with float32 output (float32 ones on the CPU)."""
    return torch.mm(a, b, out_dtype=torch.float32) if a.dtype == torch.bfloat16 else torch.mm(a, b)


def weight_pieces(weights: KernelWeights, precision: str = "bf16x3") -> torch.Tensor:
    """(K, segments x width) ``[w_hi | w_lo | w_hi]`` ("bf16x3") or ``[w_hi]`` ("bf16"), w = [lin, quad]
    (diag) or lin (spherical), zero-padded like the rows."""
    k, d = weights.lin_hi.shape
    width = segment_width(d, weights.diagonal)
    hi, lo = (weights.lin_hi, weights.quad_hi), (weights.lin_lo, weights.quad_lo)
    pieces = [hi, lo, hi][:SEGMENTS[precision]]
    out = torch.zeros(k, len(pieces) * width, dtype=weights.lin_hi.dtype, device=weights.lin_hi.device)
    for s, (lin, quad) in enumerate(pieces):
        out[:, s * width:s * width + d] = lin
        if weights.diagonal:
            out[:, s * width + d:s * width + 2 * d] = quad
    return out


class _Blocks:
    """Buffers of one call, reused by every block of rows (padding columns stay zero)."""

    def __init__(self, rows, weights: KernelWeights, precision, device, resp=True):
        k, d = weights.lin_hi.shape
        piece = weights.lin_hi.dtype
        self.precision = precision
        self.width = segment_width(d, weights.diagonal)
        self.x = torch.zeros(rows, SEGMENTS[precision] * self.width, dtype=piece, device=device)
        self.sq = torch.empty(rows, dtype=torch.float32, device=device)
        if resp:
            self.resp = torch.zeros(2 if precision == "bf16x3" else 1, rows, _padded(k), dtype=piece, device=device)
        self.w = weight_pieces(weights, precision)
        # Spherical models' (K,) quad vector; diagonal ones read none (any float32 tensor will do).
        self.quad = weights.quad_hi if not weights.diagonal else weights.const

    def products(self, x, shift, weights: KernelWeights) -> torch.Tensor:
        """(rows, K) float32 P of a block (its rows split into ``self.x``)."""
        m = x.shape[0]
        split_rows(x, shift, weights.diagonal, self.x, self.sq, precision=self.precision)
        return _product(self.x[:m], self.w.T)


def estep(x, shift, weights: KernelWeights, *, precision="bf16x3", rows=None) -> EStepResult:
    """E-step of a block of rows by library products.

    Parameters
    ----------
    x : Tensor of shape (n, D), unit column stride, any real dtype
    shift : float32 Tensor of shape (D,)
    weights : KernelWeights laid out for ``precision`` (bfloat16 pieces on a GPU, float32 ones on
        the CPU), their largest constant split off
    precision : "bf16x3" or "bf16"
    rows : int, rows per block (default ``block_rows``)

    Returns
    -------
    EStepResult, float64 (log_norm without the split-off constant)
    """
    n, d = x.shape
    k = weights.n_comps
    f64 = dict(dtype=torch.float64, device=x.device)
    rows = min(max(n, 1), rows or block_rows(k, d, weights.diagonal))
    buf = _Blocks(rows, weights, precision, x.device)
    width = buf.width
    log_norm = torch.empty(n, **f64)
    nk = torch.zeros(k, **f64)
    stats = torch.zeros(k, width, **f64)
    s2_spherical = torch.zeros(k, **f64)
    for start in range(0, n, rows):
        block = x[start:start + rows]
        m = block.shape[0]
        prod = buf.products(block, shift, weights)
        r_hi = buf.resp[0, :m, :k]
        r_lo = buf.resp[1, :m, :k] if precision == "bf16x3" else None
        lz, nk_part, s2_part = split_resp(prod, weights.const, buf.quad, buf.sq, r_hi, r_lo,
                                          diagonal=weights.diagonal)
        log_norm[start:start + m] = lz
        nk += nk_part
        if s2_part is not None:
            s2_spherical += s2_part
        xs = buf.x[:m]
        if r_lo is None:
            stats += _product(r_hi.T, xs)
            continue
        pair = _product(r_hi.T, xs[:, :2 * width])  # [r_hi^T x_lo | r_hi^T x_hi]
        stats += (pair[:, :width] + _product(r_lo.T, xs[:, width:2 * width])).double() + pair[:, width:]
    s2 = stats[:, d:2 * d] if weights.diagonal else s2_spherical
    return EStepResult(log_norm, nk, stats[:, :d].contiguous(), s2.contiguous())


def log_norm(x, shift, weights: KernelWeights, *, precision="bf16x3", rows=None) -> tuple[torch.Tensor, torch.Tensor]:
    """log Z_n (float32, without the split-off constant) and argmax_k (int32) of every row."""
    n, d = x.shape
    rows = min(max(n, 1), rows or block_rows(weights.n_comps, d, weights.diagonal))
    buf = _Blocks(rows, weights, precision, x.device, resp=False)
    lz = torch.empty(n, dtype=torch.float32, device=x.device)
    best = torch.empty(n, dtype=torch.int32, device=x.device)
    for start in range(0, n, rows):
        block = x[start:start + rows]
        m = block.shape[0]
        ll = buf.products(block, shift, weights).add_(weights.const)
        if not weights.diagonal:
            ll.addcmul_(buf.sq[:m, None], weights.quad_hi[None, :])
        lz[start:start + m] = torch.logsumexp(ll, 1)
        best[start:start + m] = ll.argmax(1)
    return lz, best


def split_rows_reference(x, shift, diagonal, precision="bf16x3") -> tuple[torch.Tensor, torch.Tensor]:
    """``kernels.split_rows`` in torch: ([x_lo | x_hi | x_hi] or [x_hi], float32; |x|^2)."""
    xs = x.to(torch.float32) - shift
    values = torch.cat([xs, xs * xs], 1) if diagonal else xs
    hi = values.to(torch.bfloat16).float()
    lo = (values - hi).to(torch.bfloat16).float()
    width = segment_width(x.shape[1], diagonal)
    pieces = (lo, hi, hi) if precision == "bf16x3" else (hi,)
    out = torch.zeros(x.shape[0], len(pieces) * width)
    for s, piece in enumerate(pieces):
        out[:, s * width:s * width + values.shape[1]] = piece
    return out, (xs * xs).sum(1)


def split_resp_reference(prod, const, quad, sq, diagonal):
    """``kernels.split_resp`` in torch: (log Z, r_hi, r_lo, N_k, sum r |x|^2 or None)."""
    ll = prod + const if diagonal else prod + const + sq[:, None] * quad
    lz = torch.logsumexp(ll, 1)
    r = torch.exp(ll - lz[:, None])
    hi = r.to(torch.bfloat16).float()
    lo = (r - hi).to(torch.bfloat16).float()
    return lz, hi, lo, r.double().sum(0), None if diagonal else (r.double() * sq.double()[:, None]).sum(0)
