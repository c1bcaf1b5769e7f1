"""What one E-step over a block of rows returns."""
from __future__ import annotations

from typing import NamedTuple

import torch


class EStepResult(NamedTuple):
    """Log-normalisers and sufficient statistics of a block of rows.

    All statistics are of the shifted rows ``x - shift`` and summed in float64.

    Attributes
    ----------
    log_norm : Tensor of shape (n,)
        log Z_n = log sum_k pi_k N(x_n | mu_k, Sigma_k).
    nk : Tensor of shape (K,)
        N_k = sum_n r_nk.
    s1 : Tensor of shape (K, D)
        sum_n r_nk x_n.
    s2 : Tensor of shape (K, D) (diag), (K,) (spherical: sum_n r_nk |x_n|^2) or (K, D, D) (full)
        sum_n r_nk x_n**2, or the outer products for full covariances.
    """

    log_norm: torch.Tensor
    nk: torch.Tensor
    s1: torch.Tensor
    s2: torch.Tensor
