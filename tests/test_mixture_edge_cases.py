"""GaussianMixture on extreme, degenerate and unusual input: a model, or a clear error; never NaN."""
import warnings

import numpy as np
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning, NotFittedError

from flashgmm_ivf import GaussianMixture
from flashgmm_ivf._init import sample_size
from flashgmm_ivf._mstep import m_step
from flashgmm_ivf.mixture import _lowest
from flashgmm_ivf.cli import main
from flashgmm_ivf.kernels import EStepResult

FAST = dict(max_iter=10, random_state=0, device="cpu")


def fit(gmm, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return gmm.fit(x)


def blobs(n=60, d=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)) + 6 * rng.integers(2, size=(n, 1))


@pytest.mark.parametrize("scale", [1e19, 1e20, 1e30])
def test_values_beyond_the_limit_are_refused_at_fit(scale):
    x = np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32) * scale
    with pytest.raises(ValueError, match=r"\|x\| <= 1e\+15.*rescale X"):
        GaussianMixture(4, **FAST).fit(x)


def test_cli_fit_refuses_huge_values(tmp_path, capsys):
    path = tmp_path / "huge.npy"
    np.save(path, np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32) * 1e19)
    with pytest.raises(SystemExit) as ended:
        main(["fit", "--data", str(path), "-k", "4", "--device", "cpu"])
    assert ended.value.code == 1 and "rescale X" in capsys.readouterr().err


@pytest.mark.parametrize("compute_dtype,scale", [("float32", 1e-6), ("float32", 1e12), ("float64", 1e-30),
                                                  ("float64", 1e12)])
def test_extreme_but_accepted_scales_give_the_scaled_model(scale, compute_dtype):
    """EM is equivariant under scaling (reg_covar, a variance, scaled along): a model fitted on
    x * s predicts as the one on x."""
    x = blobs()
    a = fit(GaussianMixture(2, compute_dtype=compute_dtype, **FAST), x)
    b = fit(GaussianMixture(2, compute_dtype=compute_dtype, reg_covar=1e-6 * scale**2, **FAST), x * scale)
    order_a, order_b = np.argsort(a.means_[:, 0]), np.argsort(b.means_[:, 0])  # the same components, any order
    np.testing.assert_array_equal(np.argsort(order_a)[a.predict(x)], np.argsort(order_b)[b.predict(x * scale)])
    np.testing.assert_allclose(b.means_[order_b] / scale, a.means_[order_a], rtol=1e-4, atol=1e-4)
    ll = b.score_samples(x * scale)
    np.testing.assert_allclose(ll + x.shape[1] * np.log(scale), a.score_samples(x), rtol=1e-4, atol=1e-3)


def test_kmeans_init_survives_values_near_the_limit():
    x = np.random.default_rng(1).normal(size=(40, 8)) * 2e14
    g = fit(GaussianMixture(4, compute_dtype="float64", **FAST), x)
    assert np.isfinite(g.means_).all() and np.isfinite(g.score_samples(x)).all()


@pytest.mark.parametrize("covariance_type", ["diag", "spherical", "full"])
def test_zero_reg_covar_on_constant_data_is_an_error_not_nan(covariance_type):
    with pytest.raises(ValueError, match="ill-defined empirical covariance"):
        fit(GaussianMixture(2, reg_covar=0.0, covariance_type=covariance_type, **FAST), np.ones((50, 8)))


@pytest.mark.parametrize("compute_dtype", ["float32", "float64"])
@pytest.mark.parametrize("covariance_type", ["diag", "spherical", "full"])
def test_far_queries_get_finite_float64_answers(covariance_type, compute_dtype):
    """Finite queries far outside the data overflow float32 log-densities: they are computed in
    float64 and agree with a float64 numpy reference."""
    x = blobs()
    g = fit(GaussianMixture(2, covariance_type=covariance_type, compute_dtype=compute_dtype, **FAST), x)
    q = np.vstack([np.full((1, 8), 1e20), np.full((1, 8), -3e18), x[:2]])
    ll = g.score_samples(q)
    proba = g.predict_proba(q)
    assert np.isfinite(ll).all() and np.isfinite(proba).all()
    ref = reference_log_prob(g, q)
    ref_ll = np.logaddexp.reduce(ref, axis=1)
    np.testing.assert_allclose(ll, ref_ll, rtol=1e-6)
    np.testing.assert_array_equal(g.predict(q), ref.argmax(1))
    np.testing.assert_allclose(proba.sum(1), 1)


def test_queries_too_far_even_for_float64_are_refused():
    g = fit(GaussianMixture(2, **FAST), blobs())
    q = np.vstack([np.zeros((2, 8)), np.full((1, 8), 1e200)])
    with pytest.raises(ValueError, match="X row 2 lies too far"):
        g.score_samples(q)


def reference_log_prob(g, q):
    """log pi_k + log N(q | k) in float64 numpy, computed directly from the fitted attributes."""
    d = q.shape[1]
    out = []
    for k in range(g.n_components):
        diff = q - g.means_[k]
        if g.covariance_type == "full":
            cov = g.covariances_[k]
            sol = np.linalg.solve(np.linalg.cholesky(cov), diff.T)
            quad, logdet = (sol * sol).sum(0), np.linalg.slogdet(cov)[1]
        else:
            var = np.broadcast_to(g.covariances_[k], (d,))
            quad, logdet = (diff * diff / var).sum(1), np.log(var).sum()
        out.append(np.log(g.weights_[k]) - 0.5 * (d * np.log(2 * np.pi) + logdet + quad))
    return np.stack(out, 1)


def test_zero_features_is_a_clear_error():
    assert sample_size(4, 0) >= 4
    with pytest.raises(ValueError, match=r"0 feature\(s\)"):
        GaussianMixture(1, **FAST).fit(np.zeros((10, 0)))


def test_n_init_is_bounded():
    with pytest.raises(ValueError, match=r"n_init must be an integer in \[1, 1000\]"):
        GaussianMixture(1, n_init=10**30, **FAST).fit(np.zeros((10, 2)))


def test_stream_whose_chunks_change_between_passes_is_refused():
    rng = np.random.default_rng(0)
    calls = []

    def chunks():
        calls.append(1)
        return [rng.normal(size=(50 if len(calls) < 3 else 60, 8))]

    with pytest.raises(ValueError, match="changed between passes.*50 rows"):
        GaussianMixture(2, **FAST).fit_stream(chunks)
    calls.clear()

    def shrinking():
        calls.append(1)
        return [rng.normal(size=(50 if len(calls) < 3 else 40, 8))]

    with pytest.raises(ValueError, match="changed between passes.*this one 40"):
        GaussianMixture(2, **FAST).fit_stream(shrinking)
    with pytest.raises(TypeError, match="fit_stream"):
        GaussianMixture(2, **FAST).fit(shrinking)


def test_nested_lists_and_negative_strides_are_accepted():
    x = blobs()
    g = fit(GaussianMixture(2, **FAST), x)
    np.testing.assert_array_equal(fit(GaussianMixture(2, **FAST), x.tolist()).means_, g.means_)
    np.testing.assert_array_equal(g.predict(x[:1].tolist()), g.predict(x[:1]))
    one_row = x[:1][::-1]  # a single row with a negative row stride
    assert one_row.strides[0] < 0
    np.testing.assert_array_equal(g.predict(one_row), g.predict(x[:1]))
    np.testing.assert_array_equal(g.predict(x[::-1]), g.predict(x)[::-1])
    with pytest.raises(ValueError, match="not a rectangular array"):
        g.predict([[1.0] * 8, [1.0] * 7])
    with pytest.raises(TypeError, match="sparse"):
        import scipy.sparse
        g.predict(scipy.sparse.csr_matrix(x))


def test_unfitted_use_raises_sklearns_not_fitted_error():
    for method in ("predict", "predict_proba", "score_samples", "score"):
        with pytest.raises(NotFittedError):
            getattr(GaussianMixture(2), method)(blobs())


def test_max_iter_zero_keeps_the_initialisation_and_warns():
    x = blobs()
    means = x[:2].copy()
    with pytest.warns(ConvergenceWarning):
        g = GaussianMixture(2, max_iter=0, means_init=means, **{k: v for k, v in FAST.items() if k != "max_iter"})
        g.fit(x)
    assert g.n_iter_ == 0 and not g.converged_
    np.testing.assert_allclose(g.means_, means, rtol=1e-14)
    np.testing.assert_array_equal(g.fit_predict(x), g.predict(x))


def test_full_precisions_init_must_be_symmetric_positive_definite():
    x = blobs(d=3)
    eye = np.stack([np.eye(3)] * 2)
    asym = eye.copy()
    asym[1, 0, 1] = 0.5
    singular = eye.copy()
    singular[0, 2, 2] = 0.0
    for bad, first in ((asym, 1), (singular, 0)):
        with pytest.raises(ValueError, match=f"should be symmetric, positive-definite; 1 component.*first is {first}"):
            GaussianMixture(2, covariance_type="full", precisions_init=bad, **FAST).fit(x)


def test_fitted_attributes_are_float64_whatever_the_input_dtype():
    g = fit(GaussianMixture(2, **FAST), blobs().astype(np.float32))
    assert g.means_.dtype == g.covariances_.dtype == g.weights_.dtype == np.float64


@pytest.mark.parametrize("roundoff", [0.09, -0.09])
def test_full_variances_below_the_float32_floor_are_raised_to_it(roundoff):
    """A feature constant within component 0 comes out of float32 sums as round-off of either
    sign: raised to the floor (1e-4 x the mean squared deviation, here 1e4 -> 1), as diag's
    variances are; component 1, well above it, keeps scikit-learn's covariance exactly."""
    nk = torch.tensor([1000.0, 1000.0], dtype=torch.float64)
    means = torch.tensor([[-50.0, -100.0], [50.0, 100.0]], dtype=torch.float64)
    cov = torch.tensor([[[25.0, 0.04], [0.04, roundoff]], [[25.0, 1.0], [1.0, 25.0]]], dtype=torch.float64)
    s2 = nk[:, None, None] * (cov + means[:, :, None] * means[:, None, :])
    stats = EStepResult(torch.zeros(2, dtype=torch.float64), nk, nk[:, None] * means, s2)
    _, _, got = m_step(stats, "full", 0.0, relative_floor=1e-4)
    floor = 1e-4 * (s2.sum(0).diagonal() / nk.sum())
    assert got[0, 1, 1] == pytest.approx(float(floor[1]), rel=1e-9) and float(floor[1]) > 1.0
    assert got[0, 0, 0] == pytest.approx(25.0) and torch.linalg.eigvalsh(got[0]).min() > 0.9
    torch.testing.assert_close(got[1], cov[1], rtol=1e-12, atol=1e-9)
    # float64 E-steps (no relative floor) keep scikit-learn's covariance, round-off and all.
    assert m_step(stats, "full", 0.0)[2][0, 1, 1] == pytest.approx(roundoff, abs=1e-9)


def test_full_float32_fits_raw_scale_data_with_a_feature_constant_in_a_component():
    """float32 sums of x x^T about the shift cancel for a component constant on a feature far from
    it; the float32 variance floor keeps every covariance positive definite (float64: scikit-learn's)."""
    rng = np.random.default_rng(0)
    x = np.vstack([np.c_[rng.normal(50, 5, 1000), np.zeros(1000)],
                   np.c_[rng.normal(150, 5, 1000), rng.normal(200, 5, 1000)]])
    got = fit(GaussianMixture(2, covariance_type="full", **FAST), x)
    assert np.isfinite(got.score(x)) and np.linalg.eigvalsh(got.covariances_).min() > 0.1
    exact = fit(GaussianMixture(2, covariance_type="full", compute_dtype="float64", **FAST), x)
    assert np.linalg.eigvalsh(exact.covariances_).min() < 1e-5  # reg_covar alone, as scikit-learn


def test_a_new_fit_may_change_the_number_of_features_a_warm_start_may_not():
    gmm = fit(GaussianMixture(2, **FAST), blobs(d=3))
    assert fit(gmm, blobs(d=2)).means_.shape == (2, 2)
    gmm.set_params(warm_start=True)
    with pytest.raises(ValueError, match="X has 3 features, but the model was fitted with 2"):
        fit(gmm, blobs(d=3))


def test_components_near_the_number_of_rows_stop_being_reseeded_and_em_converges():
    """With K = N components keep emptying; after n_components re-seeds EM leaves them be and
    converges, as scikit-learn does."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 5))
    start = dict(means_init=x[rng.permutation(40)], weights_init=np.full(40, 1 / 40),
                 precisions_init=np.tile(1 / x.var(0), (40, 1)))
    gmm = fit(GaussianMixture(40, compute_dtype="float64", max_iter=100, reg_covar=1e-3, device="cpu", **start), x)
    assert gmm.converged_ and gmm.n_iter_ < 100
    assert 40 <= gmm.n_reseeded_ < 80 and np.isfinite(gmm.score(x))


@pytest.mark.parametrize("covariance_type", ["full", "diag", "spherical"])
def test_random_responsibilities_start_near_the_data_mean_and_fit(covariance_type):
    """init_params='random' (scikit-learn's): an M-step from uniform random responsibilities, so
    every starting mean is a random average of all rows, close to their mean."""
    x = blobs(n=300, d=4)
    start = fit(GaussianMixture(3, covariance_type=covariance_type, init_params="random", compute_dtype="float64",
                                max_iter=0, random_state=0, device="cpu"), x)
    assert np.abs(start.means_ - x.mean(0)).max() < 0.5 * x.std(0).min()
    assert np.allclose(start.weights_, 1 / 3, atol=0.05)
    got = fit(GaussianMixture(3, covariance_type=covariance_type, init_params="random", compute_dtype="float64",
                              max_iter=200, random_state=0, device="cpu"), x)
    assert got.converged_ and np.isfinite(got.score(x))


@pytest.mark.parametrize("n,m,group", [(1, 32, 512), (32, 32, 512), (16384, 32, 512), (16385, 32, 512),
                                       (50_000, 32, 512), (777_777, 32, 512), (5000, 7, 16), (5000, 40, 16)])
@pytest.mark.parametrize("values", ["distinct", "ties", "outliers"])
def test_worst_rows_are_the_smallest_log_likelihoods(n, m, group, values):
    """The re-seed's worst rows (``_lowest``: grouped minima, then each chosen group's smallest, or
    one select where m exceeds a group) are m smallest values, as torch.topk's, ties and values far
    below the rest included."""
    gen = torch.Generator().manual_seed(n)
    v = torch.randn(n, generator=gen)
    if values == "ties":
        v = torch.randint(0, 5, (n,), generator=gen).float()
    elif values == "outliers":
        v[torch.randperm(n, generator=gen)[:40]] = -1e30
    m = min(m, n)
    at = _lowest(v, m, group)
    assert len(set(at.tolist())) == m
    assert torch.equal(v[at].sort().values, torch.topk(v, m, largest=False).values.sort().values)
