"""M-step and parameter conversions, in float64 (K x D arrays are small).

Empty components: a component whose responsibility mass N_k falls below one
sample after an E-step is re-seeded (see ``GaussianMixture`` notes); the M-step
itself only keeps the arithmetic finite: an empty component's sums (zeros) are
divided by 10 * eps, where scikit-learn adds 10 * eps to every N_k.
"""
from __future__ import annotations

import torch

from .kernels import CholeskyParams, EStepResult, natural_params

COVARIANCE_TYPES = ("full", "diag", "spherical")
# Variance floor of float32 E-steps, relative to the data's second moment about the shift.
# The log-densities expand sum_d P_kd (x_d - mu_kd)^2 around that shift, so their round-off
# is ~u * sum_d m2_d / var_kd (u: unit round-off). A dimension a component has collapsed on
# (raw integer data: all its rows equal there, var_kd = reg_covar = 1e-6) makes that
# thousands of nats, and EM re-seeds components at random (measured on an H100 with
# raw-scale rows: 386 re-seeds in 20 iterations against float64's 41). Above this floor the
# error stays below ~u * 1e4 per dimension; float64 E-steps keep scikit-learn's reg_covar alone.
FLOAT32_RELATIVE_FLOOR = 1e-4


class EMState:
    """Parameters during EM: float64 tensors on the device, means relative to ``shift``."""

    __slots__ = ("weights", "means", "cov", "prec_chol", "shift")

    def __init__(self, weights, means, cov, prec_chol, shift):
        self.weights, self.means, self.cov, self.prec_chol, self.shift = weights, means, cov, prec_chol, shift

    def __iter__(self):
        return iter((self.weights, self.means, self.cov, self.prec_chol, self.shift))


def m_step(stats: EStepResult, covariance_type: str, reg_covar: float, relative_floor: float = 0.0):
    """Weights, means and covariances (all relative to the shift the statistics are of).

    Parameters
    ----------
    stats : EStepResult summed over the data set (float64)
    covariance_type : one of ``COVARIANCE_TYPES``
    reg_covar : float, added to every variance (scikit-learn's rule) and its floor
    relative_floor : float, variances (diag, spherical) are at least this times the data's
        mean squared distance to the shift, per feature, and full covariances that are not
        positive definite get it added to their diagonal (``FLOAT32_RELATIVE_FLOOR`` for float32
        E-steps, 0 for float64)

    Returns
    -------
    weights (K,), means (K, D), covariances (K,), (K, D) or (K, D, D)
    """
    # A component with mass divides by its N_k itself: N_k + 10 eps would leave a singleton's
    # variance s2 / N_k - mu^2 at ~10 eps |x - shift|^2 instead of 0 (1e10 for a row at 1e12).
    nk = torch.where(stats.nk > 0, stats.nk, 10 * torch.finfo(torch.float64).eps)
    means = stats.s1 / nk[:, None]
    if covariance_type == "full":
        cov = stats.s2 / nk[:, None, None] - means[:, :, None] * means[:, None, :]
        # A kernel sums entries (i, j) and (j, i) of S2 in different orders: average them, so that the
        # covariances are exactly symmetric (a saved model's file is checked for it).
        cov = 0.5 * (cov + cov.transpose(1, 2))
        cov += reg_covar * torch.eye(means.shape[1], dtype=cov.dtype, device=cov.device)
        if relative_floor:
            # float32 sums of x x^T about a far shift cancel: a feature constant within a component
            # comes out as round-off of either sign. Variances below the floor are raised to it, as
            # diag's are (a larger diagonal keeps a matrix positive definite); components still not
            # positive definite get the floor added to their whole diagonal.
            floor = relative_floor * torch.diagonal(stats.s2.sum(0)) / stats.nk.sum()
            cov = cov + torch.diag_embed(torch.clamp_min(floor - torch.diagonal(cov, dim1=1, dim2=2), 0.0))
            broken = checked_cholesky(cov)[1]
            cov = torch.where(broken[:, None, None], cov + torch.diag(floor), cov)
    elif covariance_type == "diag":
        cov = stats.s2 / nk[:, None] - means * means + reg_covar
    else:
        cov = (stats.s2 / nk - (means * means).sum(1)) / means.shape[1] + reg_covar
    if covariance_type != "full":
        # torch.full, not torch.tensor: no host-to-device copy inside a captured iteration.
        floor = torch.full((), reg_covar, dtype=cov.dtype, device=cov.device)
        if relative_floor:
            # Mean squared distance of the rows to the shift: per feature (diag) or per coordinate (spherical).
            m2 = stats.s2.sum(0) / stats.nk.sum()
            if covariance_type == "spherical":
                m2 = m2 / means.shape[1]
            floor = torch.clamp_min(relative_floor * m2, reg_covar)
        # float32 statistics can also round an almost-zero variance below reg_covar.
        cov = torch.maximum(cov, floor)
    return nk / nk.sum(), means, cov


def checked_cholesky(covariances: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, broken): the lower Cholesky factors of (K, D, D) covariances, and a (K,) bool of which
    are not positive definite as far as their precision can tell.

    A Cholesky factorisation that succeeds can still hold a pivot that is round-off: a feature
    that is (numerically) a linear combination of the earlier ones, in data with fewer distinct
    rows than features and no ``reg_covar``, mostly leaves pivot^2 / variance ~ eps where it
    should be 0, and a precision of ~1 / eps. The test is per feature, so variances of any
    spread pass. (Where the earlier features' block is ill-conditioned the round-off can reach
    1e-10 of the variance, as much as real data with ``reg_covar`` leaves: those pass.)
    """
    chol, info = torch.linalg.cholesky_ex(covariances)
    unexplained = torch.diagonal(chol, dim1=1, dim2=2) ** 2 / torch.diagonal(covariances, dim1=1, dim2=2)
    # Cholesky's backward error: pivots are exact to ~D eps of their feature's variance.
    tol = 4 * covariances.shape[-1] * torch.finfo(covariances.dtype).eps
    return chol, (info > 0) | ~(unexplained > tol).all(1)


def precisions_cholesky(covariances: torch.Tensor, covariance_type: str) -> torch.Tensor:
    """scikit-learn's ``precisions_cholesky_``: 1/sqrt(var), or upper P with P P^T = inv(cov)."""
    if covariance_type != "full":
        return 1.0 / torch.sqrt(covariances)
    chol, broken = checked_cholesky(covariances)
    if bool(broken.any()):
        bad = int(torch.nonzero(broken)[0, 0])
        raise ValueError("Fitting the mixture model failed because some components have ill-defined empirical "
                         "covariance (for instance caused by singleton or collapsed samples). Try to decrease the "
                         f"number of components, increase reg_covar, or scale the input data. (component {bad} "
                         "is not positive definite)")
    eye = torch.eye(covariances.shape[-1], dtype=covariances.dtype, device=covariances.device)
    inv = torch.linalg.solve_triangular(chol, eye.expand_as(chol), upper=False)
    return inv.transpose(1, 2)


def kernel_params(weights, means, covariances, prec_chol, covariance_type):
    """Parameters in the form the E-step kernels read (float64; cast by the caller)."""
    if covariance_type == "full":
        return CholeskyParams(means, prec_chol, torch.log(weights))
    return natural_params(weights, means, covariances)


def n_parameters(n_components: int, n_features: int, covariance_type: str) -> int:
    cov = {"full": n_features * (n_features + 1) // 2, "diag": n_features, "spherical": 1}[covariance_type]
    return n_components * (cov + n_features) + n_components - 1


