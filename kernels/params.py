"""Parameter layouts the E-step kernels read.

Diagonal and spherical Gaussians are handed to the kernels in natural form, so
that the weighted log-density of a row is two matrix products and a constant:

    log pi_k + log N(x | mu_k, diag(v_k))
        = sum_d quad[k, d] * x_d**2 + sum_d lin[k, d] * x_d + const[k]

with quad = -1 / (2 v), lin = mu / v and const = log pi - sum(mu**2 / (2 v))
- sum(log v) / 2 - D log(2 pi) / 2.  For spherical models ``quad`` is one
number per component and multiplies |x|**2, which the kernels compute exactly
instead of through a matrix product.

Every coordinate here is relative to a ``shift`` (the data mean): raw-scale
data (SIFT, MNIST: values 0..255, norms ~500) would otherwise lose most of its
float32 digits to the cancellation in |x|^2 - 2 x.mu + |mu|^2.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch


class NaturalParams(NamedTuple):
    """Diagonal or spherical mixture in natural form (see module docstring).

    Attributes
    ----------
    quad : Tensor of shape (K, D) (diag) or (K,) (spherical)
    lin : Tensor of shape (K, D)
    const : Tensor of shape (K,); ``-inf`` marks a component that takes no mass.
    base : Tensor of shape (K,) or None
        log pi - sum(log v) / 2 - D log(2 pi) / 2: ``const`` without the means' term, from
        which float64 E-steps recompute log-densities as base - sum_d (x_d - mu_d)**2 / (2 v)
        where the expanded form cancels (``reference``).
    centres : Tensor of shape (K, D) or None
        The means in the data's own coordinates (not relative to the shift), for that direct
        form: a mean taken relative to a far shift has lost the digits that matter against a
        small variance.
    """

    quad: torch.Tensor
    lin: torch.Tensor
    const: torch.Tensor
    base: torch.Tensor | None = None
    centres: torch.Tensor | None = None

    @property
    def diagonal(self) -> bool:
        return self.quad.dim() == 2

    def to(self, device=None, dtype=None) -> "NaturalParams":
        return NaturalParams(*(None if t is None else t.to(device=device, dtype=dtype).contiguous() for t in self))


class CholeskyParams(NamedTuple):
    """Full-covariance mixture: ``prec_chol[k] @ prec_chol[k].T`` is the precision.

    Attributes
    ----------
    means : Tensor of shape (K, D), relative to the shift
    prec_chol : Tensor of shape (K, D, D), the upper-triangular P with P @ P.T = precision
        (scikit-learn's ``precisions_cholesky_``)
    log_weights : Tensor of shape (K,)
    """

    means: torch.Tensor
    prec_chol: torch.Tensor
    log_weights: torch.Tensor

    def to(self, device=None, dtype=None) -> "CholeskyParams":
        return CholeskyParams(*(t.to(device=device, dtype=dtype).contiguous() for t in self))


def natural_params(weights, means, variances) -> NaturalParams:
    """Natural form of a diagonal (variances (K, D)) or spherical (variances (K,)) mixture.

    Computed in the dtype of the inputs; pass float64 tensors and cast the result.
    """
    weights, means, variances = (torch.as_tensor(a) for a in (weights, means, variances))
    d = means.shape[1]
    precisions = 1.0 / variances
    with torch.no_grad():
        log_w = torch.log(weights)
        if variances.dim() == 2:
            quad = -0.5 * precisions
            lin = means * precisions
            maha = (means * means * precisions).sum(1)
            log_det = torch.log(variances).sum(1)
        else:
            quad = -0.5 * precisions
            lin = means * precisions[:, None]
            maha = (means * means).sum(1) * precisions
            log_det = d * torch.log(variances)
        base = log_w - 0.5 * log_det - 0.5 * d * math.log(2 * math.pi)
        const = base - 0.5 * maha
    return NaturalParams(quad, lin, const, base)


def split_offset(params: NaturalParams) -> tuple[NaturalParams, torch.Tensor]:
    """Move the largest finite constant out of ``params``: (params with const - c, c).

    log pi_k + log N(x | k) is dominated by the -D/2 log(2 pi var) volume term
    (thousands of nats for raw data in high D); carried through float32 it costs
    ~1e-4 nats of every log-density. Kernels work on the remainder and callers add
    ``c`` back to log Z in float64; responsibilities do not change.

    ``c`` is a 0-dim tensor on the parameters' device (0 if no constant is finite):
    reading it back as a number would stall the GPU once per block of rows.
    """
    const = params.const
    finite = torch.isfinite(const)
    offset = torch.where(finite, const, float("-inf")).amax()
    offset = torch.where(finite.any(), offset, torch.zeros_like(offset))
    base = None if params.base is None else params.base - offset
    return params._replace(const=const - offset, base=base), offset


class KernelWeights(NamedTuple):
    """What the Triton kernels read: (K, D) weight matrices, the left operand of the
    (K, N) log-density tiles, split as hi + lo bfloat16 values for ``bf16x3``,
    rounded to bfloat16 for ``bf16`` (``*_lo`` repeats ``*_hi``); for the other
    precisions ``*_lo`` is ``*_hi``, the float32 matrix.

    For spherical models ``quad_hi`` is the (K,) vector and ``quad_lo`` repeats it.
    """

    lin_hi: torch.Tensor
    lin_lo: torch.Tensor
    quad_hi: torch.Tensor
    quad_lo: torch.Tensor
    const: torch.Tensor

    @property
    def n_comps(self) -> int:
        return self.const.shape[0]

    @property
    def diagonal(self) -> bool:
        return self.quad_hi.dim() == 2


def kernel_weights(params: NaturalParams, precision: str, device) -> KernelWeights:
    """Lay out (and for ``bf16x3`` split) ``params`` once per E-step, not once per tile.

    The split pieces are bfloat16 on a GPU; under the interpreter, which cannot multiply
    bfloat16, they are the same values held in float32.
    """
    device = torch.device(device)
    piece = torch.bfloat16 if device.type == "cuda" else torch.float32

    def layout(w):
        w = w.to(device).contiguous()
        if precision not in ("bf16x3", "bf16") or w.dim() == 1:
            w = w.to(torch.float32)
            return w, w
        hi = w.to(torch.bfloat16)
        lo = (w - hi.to(w.dtype)).to(torch.bfloat16) if precision == "bf16x3" else hi
        return hi.to(piece), lo.to(piece)

    lin_hi, lin_lo = layout(params.lin)
    quad_hi, quad_lo = layout(params.quad)
    return KernelWeights(lin_hi, lin_lo, quad_hi, quad_lo, params.const.to(device, torch.float32).contiguous())
