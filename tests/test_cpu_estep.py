"""The torch E-step (the CPU path) against a dense float64 numpy oracle.

The oracle evaluates (x - mu)^2 / var directly, with no expansion and no shift, so it
checks the design-matrix products, the in-place log-sum-exp, the sparse statistics and
the float32 arithmetic on raw-scale rows at once. Both ways of summing the statistics
(dense product, sparse pairs) are forced in turn.
"""
import warnings

import numpy as np
import pytest
import torch
from scipy.special import logsumexp

from conftest import shared_set
from flashgmm_ivf import GaussianMixture, kernels
from flashgmm_ivf.kernels import reference

# (covariance type, n rows, D, K, rows per block): n never a multiple of the block, K = 1 and
# D = 1 included; full covariances at smaller D (the oracle holds (n, K, D, D) products).
SHAPES = [(cov, *shape) for cov in ("diag", "spherical")
          for shape in [(1, 1, 1, 64), (37, 1, 5, 8), (203, 7, 1, 64), (1000, 37, 19, 96), (515, 130, 70, 128)]]
SHAPES += [("full", *shape) for shape in [(1, 1, 1, 64), (37, 1, 5, 8), (203, 7, 1, 64), (301, 23, 9, 40)]]


@pytest.fixture(params=["dense", "sparse"])
def statistics_path(request, monkeypatch):
    """Force the dense product (no block is sparse enough) or the sparse pairs (every block is)."""
    monkeypatch.setattr(reference, "SPARSE_MAX_DENSITY", 0.0 if request.param == "dense" else 1.0)
    return request.param


def mixture(x, k, covariance_type, rng):
    """Means at rows of x, variances on the data's scale, uneven weights (float64 numpy)."""
    n, d = x.shape
    means = x[rng.integers(n, size=k)].astype(np.float64) + rng.normal(size=(k, d))
    scale = max(float(x.var()), 1e-3)
    if covariance_type == "full":
        a = rng.normal(size=(k, d, d)) / np.sqrt(d)
        cov = scale * (0.1 * a @ a.transpose(0, 2, 1) + 0.3 * np.eye(d))
    else:
        cov = scale * rng.uniform(0.05, 0.5, size=(k, d) if covariance_type == "diag" else (k,))
    weights = rng.uniform(0.2, 1, size=k)
    return weights / weights.sum(), means, cov


def oracle(x, weights, means, cov, covariance_type, shift):
    """log Z, N_k, S1, S2 (statistics of x - shift) in dense float64, and the scale each is
    compared at: itself, except S1 (a sum of signed terms), compared at sum_n r_nk |x_n - shift|."""
    x = x.astype(np.float64)
    diff = x[:, None, :] - means[None]
    if covariance_type == "full":
        inv = np.linalg.inv(cov)
        maha = np.einsum("nkd,kde,nke->nk", diff, inv, diff)
        log_det = np.linalg.slogdet(cov)[1]
    else:
        var = cov if covariance_type == "diag" else np.repeat(cov[:, None], x.shape[1], 1)
        maha = (diff ** 2 / var[None]).sum(2)
        log_det = np.log(var).sum(1)
    ll = np.log(weights) - 0.5 * (x.shape[1] * np.log(2 * np.pi) + log_det + maha)
    log_z = logsumexp(ll, axis=1)
    resp = np.exp(ll - log_z[:, None])
    xc = x - shift
    s2 = {"diag": resp.T @ xc ** 2, "spherical": resp.T @ (xc ** 2).sum(1),
          "full": np.einsum("nk,nd,ne->kde", resp, xc, xc)}[covariance_type]
    return (log_z, resp.sum(0), resp.T @ xc, s2), (log_z, resp.sum(0), resp.T @ np.abs(xc), s2)


def params(weights, means, cov, covariance_type, shift):
    w, m, c = (torch.from_numpy(a) for a in (weights, means - shift, cov))
    if covariance_type == "full":
        prec_chol = torch.linalg.inv(torch.linalg.cholesky(c)).transpose(1, 2)
        return kernels.CholeskyParams(m, prec_chol, torch.log(w))
    return kernels.natural_params(w, m, c)


def relative_errors(got, ref, scale=None):
    return {name: float(np.linalg.norm(np.asarray(g) - r) / max(np.linalg.norm(s), 1e-300))
            for name, g, r, s in zip(got._fields, got, ref, scale or ref)}


@pytest.mark.parametrize("covariance_type,n,d,k,rows", SHAPES)
@pytest.mark.parametrize("kind", ["raw", "standardised"])
def test_estep_matches_dense_float64_oracle(covariance_type, n, d, k, rows, kind, statistics_path):
    rng = np.random.default_rng([n, d, k])
    x = rng.integers(0, 256, size=(n, d)).astype(np.uint8) if kind == "raw" else rng.normal(size=(n, d))
    weights, means, cov = mixture(x, k, covariance_type, rng)
    # The estimator's shift: the weighted mean of the means, float32-representable.
    shift = np.float32(weights @ means).astype(np.float64)
    ref, scale = oracle(x, weights, means, cov, covariance_type, shift)
    p = params(weights, means, cov, covariance_type, shift)
    shift_t = torch.from_numpy(shift)
    got64 = reference.estep(torch.from_numpy(x), p, shift_t, dtype=torch.float64, chunk_size=rows)
    for name, err in relative_errors(got64, ref, scale).items():
        assert err < 1e-9, (name, err)
    got32 = reference.estep(torch.from_numpy(x), p.to(dtype=torch.float32), shift_t, dtype=torch.float32,
                            chunk_size=rows)
    assert all(t.dtype == torch.float64 for t in got32)
    for name, err in relative_errors(got32, ref, scale).items():
        assert err < 1e-5, (name, err)


def test_sparse_and_dense_statistics_agree_on_raw_sift_rows(monkeypatch):
    """Real SIFT rows (0..255) under a peaked mixture: the blocks take the sparse path by
    themselves, and it agrees with the dense product and with the float64 oracle."""
    x = shared_set("sift-photos-128-small")[:1500]
    rng = np.random.default_rng(5)
    k = 100
    means = x[rng.choice(len(x), k, replace=False)].astype(np.float64)
    cov = np.tile(x.astype(np.float64).var(0) / 8 + 1.0, (k, 1))
    weights = np.full(k, 1.0 / k)
    shift = np.float32(weights @ means).astype(np.float64)
    ref, scale = oracle(x, weights, means, cov, "diag", shift)
    p = params(weights, means, cov, "diag", shift).to(dtype=torch.float32)
    shift_t = torch.from_numpy(shift)
    sparse_calls = []
    real_mm = torch.sparse.mm
    monkeypatch.setattr(torch.sparse, "mm", lambda *a: sparse_calls.append(1) or real_mm(*a))
    auto = reference.estep(torch.from_numpy(x), p, shift_t, dtype=torch.float32)
    assert sparse_calls, "peaked posteriors should make the blocks sparse"
    monkeypatch.setattr(reference, "SPARSE_MAX_DENSITY", 0.0)
    dense = reference.estep(torch.from_numpy(x), p, shift_t, dtype=torch.float32)
    for got in (auto, dense):
        errors = relative_errors(got, ref, scale)
        assert max(errors.values()) < 1e-5, errors
    assert max(relative_errors(auto, [t.numpy() for t in dense], scale).values()) < 1e-6


def test_zero_weight_component_takes_no_mass(statistics_path):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 4))
    weights, means, cov = mixture(x, 6, "diag", rng)
    weights[2] = 0.0
    p = params(weights, means, cov, "diag", np.zeros(4))
    got = reference.estep(torch.from_numpy(x), p, None, dtype=torch.float32, chunk_size=64)
    assert got.nk[2] == 0 and torch.isfinite(got.log_norm).all()
    assert float(got.nk.sum()) == pytest.approx(300, rel=1e-6)


@pytest.mark.parametrize("covariance_type", ["diag", "spherical"])
def test_float32_lower_bound_is_monotone_on_raw_sift(covariance_type):
    """The estimator's float32 CPU path on raw SIFT rows: the EM lower bound never drops by
    more than float32 round-off of a mean log-likelihood (no re-seeds in this fit)."""
    x = shared_set("sift-photos-128-small")[:6000]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = GaussianMixture(48, covariance_type=covariance_type, max_iter=25, tol=0.0, random_state=0,
                            device="cpu").fit(x)
    bounds = np.array(g.lower_bounds_)
    assert g.n_reseeded_ == 0
    assert np.all(np.diff(bounds) >= -1e-6 * np.abs(bounds[1:])), np.diff(bounds).min()
