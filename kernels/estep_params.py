"""The E-step's float32 natural parameters from float64 EM parameters, in one launch.

``params.natural_params`` in float64, the means moved back to the data's coordinates and every
array cast to float32 are about 20 torch operations on (K, D) tensors, each a launch of a few
microseconds on a GPU: here one program per tile of components does them all, in float64.
``log`` is libdevice's, within an ulp of torch's, so results agree with the torch path to
float64 round-off before the cast.

Torch reference: ``params.natural_params`` (``GaussianMixture._kernel_params``, the CPU path).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .params import NaturalParams
from .tile import float64_arg, float64_bits


@triton.jit(do_not_specialize=["log_2pi_bits"])
def natural_params_kernel(weights_ptr, means_ptr, var_ptr, shift_ptr, quad_out, lin_out, const_out, base_out,
                          centres_out, n_comps, n_cols, log_2pi_bits, DIAGONAL: tl.constexpr, BLOCK_K: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    comps = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    comp_mask = comps < n_comps
    maha = tl.zeros([BLOCK_K], dtype=tl.float64)
    log_det = tl.zeros([BLOCK_K], dtype=tl.float64)
    if not DIAGONAL:
        var_s = tl.load(var_ptr + comps, mask=comp_mask, other=1.0)
        prec_s = 1.0 / var_s
        tl.store(quad_out + comps, (-0.5 * prec_s).to(tl.float32), mask=comp_mask)
    for d0 in range(0, n_cols, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_mask = cols < n_cols
        tile = comps[:, None].to(tl.int64) * n_cols + cols[None, :]
        mask = comp_mask[:, None] & col_mask[None, :]
        means = tl.load(means_ptr + tile, mask=mask, other=0.0)
        if DIAGONAL:
            var = tl.load(var_ptr + tile, mask=mask, other=1.0)
            prec = 1.0 / var
            tl.store(quad_out + tile, (-0.5 * prec).to(tl.float32), mask=mask)
            maha += tl.sum(means * means * prec, axis=1)
            log_det += tl.sum(tl.log(var), axis=1)
        else:
            prec = prec_s[:, None]
            maha += tl.sum(means * means, axis=1)
        tl.store(lin_out + tile, (means * prec).to(tl.float32), mask=mask)
        shift = tl.load(shift_ptr + cols, mask=col_mask, other=0.0)
        tl.store(centres_out + tile, (means + shift[None, :]).to(tl.float32), mask=mask)
    if not DIAGONAL:
        maha = maha * prec_s
        log_det = n_cols * tl.log(var_s)
    base = tl.log(tl.load(weights_ptr + comps, mask=comp_mask, other=1.0)) - 0.5 * log_det \
        - 0.5 * n_cols * float64_arg(log_2pi_bits)
    tl.store(base_out + comps, base.to(tl.float32), mask=comp_mask)
    tl.store(const_out + comps, (base - 0.5 * maha).to(tl.float32), mask=comp_mask)


def float32_natural_params(weights, means, variances, shift, *, block_k=16) -> NaturalParams:
    """Launch: ``natural_params(weights, means, variances)`` with ``centres = means + shift``, cast to
    float32.

    Parameters
    ----------
    weights : float64 Tensor of shape (K,)
    means : float64 Tensor of shape (K, D), relative to ``shift``
    variances : float64 Tensor of shape (K, D) (diag) or (K,) (spherical)
    shift : float64 Tensor of shape (D,)

    Returns
    -------
    NaturalParams, float32, with ``base`` and ``centres``
    """
    weights, means, variances, shift = (t.to(torch.float64).contiguous() for t in (weights, means, variances, shift))
    k, d = means.shape
    f32 = dict(dtype=torch.float32, device=means.device)
    quad, lin, centres = torch.empty(variances.shape, **f32), torch.empty(k, d, **f32), torch.empty(k, d, **f32)
    const, base = torch.empty(k, **f32), torch.empty(k, **f32)
    natural_params_kernel[(triton.cdiv(k, block_k),)](
        weights, means, variances, shift, quad, lin, const, base, centres, k, d, float64_bits(math.log(2 * math.pi)),
        DIAGONAL=variances.dim() == 2, BLOCK_K=block_k, BLOCK_D=min(64, triton.next_power_of_2(d)))
    return NaturalParams(quad, lin, const, base, centres)
