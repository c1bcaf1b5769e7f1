"""Torch E-step: the CPU path and the oracle for the Triton kernels.

It computes exactly what ``kernels.estep`` computes, a block of rows at a time, so
that only a (rows, K) block of log-densities ever exists, never (N, K). Each block
costs one or two matrix products and a few in-place passes over that block:

* the rows are laid out once as a design matrix Z: [x, x**2, 1] (diag), [x, |x|**2, 1]
  (spherical) or [x, 1, vec(x x^T)] (full, whose log-densities come from x alone);
* log pi_k + log N(x_n | k) = (Z @ W^T)[n, k] with W = [lin, quad, const] laid out once
  per call (diag, spherical), or the squared norms of x @ P_k - mu_k @ P_k (full);
* R^T @ Z gives N_k, S1 and S2 together (the column of ones sums R). Where the block's
  posteriors are peaked (few terms within ``SPARSE_CUTOFF`` of their row's largest), only
  those terms are exponentiated and summed, as a sparse product; otherwise the log-sum-exp
  runs in place on the block and the product is dense, the normaliser 1/Z_n scaling
  whichever of Z and the block is narrower.

Products and the block run in ``dtype``; the (K, P) partial sums are widened to float64
once per block of rows, so the statistics keep float64 sums across blocks.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .params import CholeskyParams, NaturalParams, split_offset
from .result import EStepResult

_LOG_2PI = math.log(2 * math.pi)
# Rows per block: the (rows, K) block of log-densities stays near this size. Measured on one
# EPYC core (1 MB L2, 32 MB L3) on SIFT and GloVe rows, K = 1024: 8-16 MB blocks are the
# fastest, 2 MB ones 10-15% slower; and every block costs a few thread-pool barriers, which a
# busy machine makes expensive (two threads, load 9: 4 MB blocks 2.6x slower than 64 MB).
BLOCK_BYTES = 16 << 20
# Full covariances hold (rows, K, D) and (rows, D, D) temporaries instead.
FULL_BLOCK_BYTES = 64 << 20
MIN_BLOCK_ROWS = 64
# Terms below this fraction of their row's largest are left out where that leaves a block
# sparse enough (see _block_stats); the dense product's cost equals the sparse one's near 4%
# of the pairs (measured on one EPYC core, K = 1024, D = 128).
SPARSE_CUTOFF = 1e-12
LOG_SPARSE_CUTOFF = math.log(SPARSE_CUTOFF)
SPARSE_MAX_DENSITY = 0.02
# float64 log-densities whose expanded form may have lost more than this relative precision are
# recomputed directly (see _recompute_cancelled), DIRECT_BLOCK (row, component) pairs at a time.
CANCELLED_RELATIVE = 1e-10
DIRECT_BLOCK = 1 << 14


def _centred(x: torch.Tensor, shift: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    if shift is not None and x.dtype == torch.float64 and dtype != torch.float64:
        # float64 rows are centred before rounding: rows far from the origin (1e12) would lose
        # every digit of their offset from the shift to the float32 rounding of x itself.
        return (x - shift.to(x.dtype)).to(dtype)
    x = x.to(dtype)
    return x - shift.to(dtype) if shift is not None else x


def _centre_into(out: torch.Tensor, x: torch.Tensor, shift: torch.Tensor | None) -> torch.Tensor:
    """``out`` = x - shift, rounded as ``_centred`` rounds (x to out's dtype first, float64 rows after)."""
    if shift is not None and x.dtype == torch.float64 and out.dtype != torch.float64:
        return out.copy_(x - shift.to(device=x.device, dtype=x.dtype))
    out.copy_(x)
    return out if shift is None else out.sub_(shift.to(device=out.device, dtype=out.dtype))


def _recompute_cancelled(ll: torch.Tensor, x: torch.Tensor, xc: torch.Tensor, params: NaturalParams) -> None:
    """float64 log-densities whose expanded form cancelled, recomputed in place from (x - mu)**2.

    The expanded form sum_d quad x_d**2 + lin x_d + const loses ~(D + 2) eps B nats, B <= |x|**2
    max_d P_kd + sum_d P_kd mu_kd**2 the size of its terms (P the precisions, all about the
    shift). Ordinary data keeps B within ~1e3 of the result; rows or means far out against a
    small variance (entries of 1e15 beside unit ones) make it lose whole nats. Entries whose
    bound exceeds ``CANCELLED_RELATIVE`` of their value are recomputed as
    base_k - sum_d P_kd (x_d - mu_kd)**2 / 2, exact to a few ulps: from the rows ``x`` and
    ``params.centres`` in the data's own coordinates when given (rows and means far from the
    shift lose eps |x - shift| to it), else from ``xc`` and the means about the shift.
    """
    if ll.dtype != torch.float64 or params.base is None or not ll.numel():
        return
    prec = -2 * params.quad
    means = params.lin / (prec if params.diagonal else prec[:, None])
    prec_max = prec.amax(1) if params.diagonal else prec
    means_term = (params.lin * means).sum(1)
    loss = (xc.shape[1] + 2) * torch.finfo(torch.float64).eps / CANCELLED_RELATIVE
    row_term, comp_term, const_term = (xc * xc).sum(1), prec_max * loss, means_term * loss - 1
    if ll.device.type == "cpu":  # numpy's outer product and comparison: ~4x torch's on one core
        bound = np.multiply.outer(row_term.numpy(), comp_term.numpy())
        bound += const_term.numpy()
        flagged = torch.from_numpy(np.flatnonzero(bound > np.abs(ll.numpy())))
    else:
        flagged = torch.flatten(torch.outer(row_term, comp_term).add_(const_term) > ll.abs()).nonzero().squeeze(1)
    for start in range(0, flagged.shape[0], DIRECT_BLOCK):
        part = flagged[start:start + DIRECT_BLOCK]
        rows, comps = part // ll.shape[1], part % ll.shape[1]
        if params.centres is None:
            diff = xc[rows] - means[comps]
        else:
            diff = x[rows].to(torch.float64) - params.centres[comps]
        diff.square_()
        maha = (diff * prec[comps]).sum(1) if params.diagonal else diff.sum(1) * prec[comps]
        ll[rows, comps] = params.base[comps] - 0.5 * maha


def design_weights(params: NaturalParams, dtype=None) -> torch.Tensor:
    """(K, P) rows [lin, quad, const], so that log pi_k N(x | k) = design(x) . row_k.

    P = 2 D + 1 (diag) or D + 2 (spherical, quad one number per component).
    """
    quad = params.quad if params.diagonal else params.quad[:, None]
    return torch.cat([params.lin, quad, params.const[:, None]], 1).to(dtype or params.lin.dtype)


def design(x: torch.Tensor, shift: torch.Tensor | None, diagonal: bool, dtype, out=None) -> torch.Tensor:
    """(n, P) rows [x, x**2, 1] (diag) or [x, |x|**2, 1] (spherical) of ``x - shift``.

    Written into ``out`` (shape (>= n, P)) when given, so that a loop over blocks reuses one buffer.
    """
    n, d = x.shape
    p = 2 * d + 1 if diagonal else d + 2
    z = torch.empty(n, p, dtype=dtype, device=x.device) if out is None else out[:n]
    xc = _centre_into(z[:, :d], x, shift)
    if diagonal:
        torch.mul(xc, xc, out=z[:, d:2 * d])
    else:
        z[:, d] = xc.square().sum(1)
    z[:, -1] = 1
    return z


def _full_layout(params: CholeskyParams, dtype):
    """Full covariances, laid out once per call: (D, K D) precision factors side by side,
    their (K D,) offsets mu_k @ P_k, and the (K,) constant log pi_k + log|P_k| - D/2 log 2 pi."""
    means, prec_chol, log_w = (t.to(dtype) for t in params)
    k, d = means.shape
    factors = prec_chol.permute(1, 0, 2).reshape(d, k * d)
    offsets = torch.einsum("kd,kde->ke", means, prec_chol).reshape(k * d)
    const = log_w + torch.log(torch.diagonal(prec_chol, dim1=1, dim2=2)).sum(1) - 0.5 * d * _LOG_2PI
    return factors, offsets, const


def _full_log_prob(xc, layout, out=None):
    factors, offsets, const = layout
    k = const.shape[0]
    y = torch.addmm(offsets, xc, factors, beta=-1)  # y[n, k, :] = x_n @ P_k - mu_k @ P_k
    y.square_()
    maha = torch.sum(y.view(xc.shape[0], k, -1), 2, out=out)
    return maha.mul_(-0.5).add_(const)


def weighted_log_prob(x, params, shift=None, *, dtype=torch.float64) -> torch.Tensor:
    """log pi_k + log N(x_n | mu_k, Sigma_k) for every row and component.

    Parameters
    ----------
    x : Tensor of shape (n, D), any real dtype
    params : NaturalParams or CholeskyParams, relative to ``shift``
    shift : Tensor of shape (D,) or None
    dtype : torch.float32 or torch.float64, the arithmetic precision

    Returns
    -------
    Tensor of shape (n, K)
    """
    if isinstance(params, CholeskyParams):
        return _full_log_prob(_centred(x, shift, dtype), _full_layout(params, dtype))
    z = design(x, shift, params.diagonal, dtype)
    ll = z @ design_weights(params, dtype).T
    _recompute_cancelled(ll, x, z[:, :x.shape[1]], params)
    return ll


def block_rows(n_components: int, n_features: int, full: bool, dtype) -> int:
    """Rows per block of :func:`estep`: a (rows, K) block of ``BLOCK_BYTES`` (diag, spherical),
    or (rows, K, D) and (rows, D, D) temporaries of ``FULL_BLOCK_BYTES`` (full)."""
    size = torch.finfo(dtype).bits // 8
    if full:
        per_row = n_components * n_features + n_features * (n_features + 1) + 1
        return max(1, FULL_BLOCK_BYTES // (size * per_row))
    return max(MIN_BLOCK_ROWS, BLOCK_BYTES // (size * n_components))


def _kept_pairs(ll: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """Flat indices, ascending, of the entries of ``ll`` (rows, K) at or above ``floor`` (rows, 1).

    At or above: a floor of top + log(cutoff) rounds to top itself where |top| dwarfs the
    cutoff (float32 log-densities of -7e13), and the row's largest entry must stay in.
    """
    if ll.device.type == "cpu":
        # numpy's comparison and flatnonzero: ~0.6 ns per entry against ~2 ns for torch's.
        return torch.from_numpy(np.flatnonzero(ll.numpy() >= floor.numpy()))
    return torch.flatten(ll >= floor).nonzero().squeeze(1)


def _block_stats(ll: torch.Tensor, z: torch.Tensor, part: torch.Tensor, log_norm: torch.Tensor) -> torch.Tensor:
    """Log-sum-exp of one block and its (K, P) statistics R^T @ z, R the responsibilities.

    ``ll`` (rows, K) holds the log-densities and is overwritten; ``z`` (rows, P) may be too;
    log Z of every row goes to ``log_norm`` (rows,).

    Where at most ``SPARSE_MAX_DENSITY`` of the block lies within ``SPARSE_CUTOFF`` of its
    row's largest term, only those (row, component) pairs are exponentiated and summed (a
    sparse product): the rest carry less than K * SPARSE_CUTOFF of their row's mass
    (Z and the statistics change by less than that, relatively). Elsewhere the block is
    exponentiated in place and multiplied densely.
    """
    rows, k = ll.shape
    top = ll.amax(1, keepdim=True)
    kept = _kept_pairs(ll, top + LOG_SPARSE_CUTOFF)
    if kept.numel() <= SPARSE_MAX_DENSITY * ll.numel():
        row, comp = kept // k, kept % k
        resp = ll.view(-1)[kept].sub_(top.view(-1)[row]).exp_()
        total = torch.zeros(rows, dtype=ll.dtype, device=ll.device).index_add_(0, row, resp)
        log_norm.copy_(top.view(-1) + total.log())
        resp /= total[row]
        resp_t = torch.sparse_coo_tensor(torch.stack([comp, row]), resp, (k, rows), check_invariants=False)
        return torch.sparse.mm(resp_t, z)
    # exp's arguments are clamped out of the subnormal range, and the clamped terms then set
    # to zero: subnormal arithmetic costs x86 cores ~10x per entry (exp on SIFT's spherical
    # posteriors: 16 ns against 1.5 ns; exp(-inf) is slow too), and such a term is below
    # finfo.tiny against a total >= 1.
    floor = math.log(torch.finfo(ll.dtype).tiny) + 1
    ll.sub_(top).clamp_min_(floor).exp_()
    torch.nn.functional.threshold_(ll, 2 * math.exp(floor), 0.0)
    total = ll.sum(1, keepdim=True)
    log_norm.copy_((top + total.log()).view(-1))
    # R = exp(ll - top) / total: the division goes to the narrower of the two operands.
    (z if z.shape[1] <= k else ll).div_(total)
    return torch.mm(ll.T, z, out=part)


def estep(x, params, shift=None, *, dtype=torch.float64, chunk_size=None) -> EStepResult:
    """Log-normalisers and sufficient statistics of ``x`` under a mixture.

    Parameters
    ----------
    x : Tensor of shape (n, D)
    params : NaturalParams (diag / spherical) or CholeskyParams (full)
    shift : Tensor of shape (D,) or None; statistics are of ``x - shift``
    dtype : arithmetic precision of the log-densities and products
    chunk_size : rows per block; by default ``BLOCK_BYTES`` of (rows, K) log-densities

    Returns
    -------
    EStepResult, all float64.
    """
    full = isinstance(params, CholeskyParams)
    n, d = x.shape
    offset = 0.0
    if full:
        layout = _full_layout(params, dtype)
        k = layout[2].shape[0]
        width = d * d + d + 1
    else:
        if dtype != torch.float64:
            # float32 keeps the volume term out (see split_offset); float64 has the digits, and
            # an offset set by a far component's constant (~1e13) would round every row to ~1e-3.
            params, offset = split_offset(params)
        weights = design_weights(params, dtype)
        k, width = weights.shape
    rows = min(n, chunk_size or block_rows(k, d, full, dtype))
    # Buffers reused by every block: fresh (rows, K) allocations each cost a round of page faults.
    buf = dict(dtype=dtype, device=x.device)
    z = torch.empty(rows, width, **buf)
    ll = torch.empty(rows, k, **buf)
    part = torch.empty(k, width, **buf)
    lz = torch.empty(rows, **buf)
    acc = torch.zeros(k, width, dtype=torch.float64, device=x.device)
    log_norm = torch.empty(n, dtype=torch.float64, device=x.device)
    for start in range(0, n, rows):
        m = min(rows, n - start)
        block = x[start:start + m]
        if full:
            zb = z[:m]
            xc = _centre_into(zb[:, :d], block, shift)
            zb[:, d] = 1
            torch.mul(xc[:, :, None], xc[:, None, :], out=zb[:, d + 1:].view(m, d, d))
            lb = _full_log_prob(xc, layout, out=ll[:m])
        else:
            zb = design(block, shift, params.diagonal, dtype, out=z)
            lb = torch.mm(zb, weights.T, out=ll[:m])
            _recompute_cancelled(lb, block, zb[:, :d], params)
        acc += _block_stats(lb, zb, part, lz[:m])
        log_norm[start:start + m] = lz[:m]
    if full:
        nk, s1, s2 = acc[:, d], acc[:, :d], acc[:, d + 1:].view(k, d, d)
    else:
        nk, s1, s2 = acc[:, -1], acc[:, :d], acc[:, d:2 * d] if params.diagonal else acc[:, d]
    return EStepResult(log_norm + offset, nk.clone(), s1.clone(), s2.clone())
