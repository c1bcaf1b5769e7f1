"""Torch reference of the E-step: the CPU path and the oracle for the Triton kernels.

It computes exactly what ``kernels.estep`` computes, a chunk of rows at a time,
so that only a (chunk, K) block of log-densities ever exists, never (N, K).
"""
from __future__ import annotations

import math

import torch

from .params import CholeskyParams, split_offset
from .result import EStepResult

_LOG_2PI = math.log(2 * math.pi)


def _centred(x: torch.Tensor, shift: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    x = x.to(dtype)
    return x - shift.to(dtype) if shift is not None else x


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
    xc = _centred(x, shift, dtype)
    if isinstance(params, CholeskyParams):
        means, prec_chol, log_w = (t.to(dtype) for t in params)
        # y[n, k] = (x_n - mu_k) @ P_k, as x_n @ P_k - mu_k @ P_k
        y = torch.einsum("nd,kde->nke", xc, prec_chol) - torch.einsum("kd,kde->ke", means, prec_chol)
        log_det = torch.log(torch.diagonal(prec_chol, dim1=1, dim2=2)).sum(1)
        return log_w + log_det - 0.5 * xc.shape[1] * _LOG_2PI - 0.5 * (y * y).sum(2)
    quad, lin, const = (t.to(dtype) for t in params)
    if quad.dim() == 2:
        # One product over [x, x^2] instead of two: half the passes over the block.
        return torch.addmm(const, torch.cat([xc, xc * xc], 1), torch.cat([lin, quad], 1).T)
    return torch.addmm(const, xc, lin.T) + (xc * xc).sum(1, keepdim=True) * quad


def _chunk_rows(n_components: int, n_features: int, full: bool) -> int:
    # Keep each (rows, K[, D]) temporary near 64 MB of float64.
    per_row = n_components * (n_features if full else 1) + n_features
    return max(1, (1 << 23) // per_row)


def estep(x, params, shift=None, *, dtype=torch.float64, chunk_size=None) -> EStepResult:
    """Log-normalisers and sufficient statistics of ``x`` under a mixture.

    Parameters
    ----------
    x : Tensor of shape (n, D)
    params : NaturalParams (diag / spherical) or CholeskyParams (full)
    shift : Tensor of shape (D,) or None; statistics are of ``x - shift``
    dtype : arithmetic precision of the log-densities and products
    chunk_size : rows per block; by default sized to ~64 MB temporaries

    Returns
    -------
    EStepResult, all float64.
    """
    full = isinstance(params, CholeskyParams)
    offset = 0.0
    if not full:
        params, offset = split_offset(params)
    n, d = x.shape
    k = params.log_weights.shape[0] if full else params.lin.shape[0]
    spherical = not full and params.quad.dim() == 1
    chunk = chunk_size or _chunk_rows(k, d, full)
    f64 = dict(dtype=torch.float64, device=x.device)
    log_norm = torch.empty(n, **f64)
    nk = torch.zeros(k, **f64)
    s1 = torch.zeros(k, d, **f64)
    s2 = torch.zeros((k,) if spherical else (k, d, d) if full else (k, d), **f64)
    for start in range(0, n, chunk):
        xc = _centred(x[start:start + chunk], shift, dtype)
        ll = weighted_log_prob(xc, params, None, dtype=dtype)
        lz = torch.logsumexp(ll, dim=1)
        resp = torch.exp(ll - lz[:, None])
        log_norm[start:start + chunk] = lz
        nk += resp.sum(0, dtype=torch.float64)
        if spherical:
            s1 += (resp.T @ xc).to(torch.float64)
            s2 += (resp.T @ (xc * xc).sum(1)).to(torch.float64)
        elif full:
            s1 += (resp.T @ xc).to(torch.float64)
            s2 += torch.einsum("nk,nd,ne->kde", resp, xc, xc).to(torch.float64)
        else:
            both = (resp.T @ torch.cat([xc, xc * xc], 1)).to(torch.float64)
            s1 += both[:, :d]
            s2 += both[:, d:]
    return EStepResult(log_norm + offset, nk, s1, s2)
