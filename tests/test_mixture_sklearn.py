"""GaussianMixture against scikit-learn's, started from the same parameters (CPU, float64)."""
import warnings

import numpy as np
import pytest
from sklearn.mixture import GaussianMixture as SklearnMixture

from conftest import shared_set
from flashgmm_ivf import GaussianMixture


def synthetic(n=3000, d=12, k=6, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=6, size=(k, d))
    labels = rng.integers(k, size=n)
    return centres[labels] + rng.normal(size=(n, d)) * rng.uniform(0.5, 2, size=(k, d))[labels]


def real_subset():
    return shared_set("sift-photos-128-small")[:4000]


def starting_point(x, k, covariance_type):
    """Parameters after two EM steps from k-means: a start both libraries can share."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = GaussianMixture(k, covariance_type=covariance_type, max_iter=2, random_state=0,
                            compute_dtype="float64").fit(x)
    return dict(weights_init=g.weights_, means_init=g.means_, precisions_init=g.precisions_)


@pytest.mark.parametrize("data", [synthetic, real_subset], ids=["synthetic", "sift-photos"])
@pytest.mark.parametrize("covariance_type", ["diag", "spherical", "full"])
def test_ten_iterations_match_sklearn(data, covariance_type):
    x = data()
    k = 6 if covariance_type != "full" else 4
    start = starting_point(x, k, covariance_type)
    common = dict(covariance_type=covariance_type, max_iter=10, tol=0.0, **start)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = GaussianMixture(k, compute_dtype="float64", device="cpu", **common).fit(x)
        # scikit-learn squares uint8 input in uint8 (it wraps), so it gets float64.
        ref = SklearnMixture(k, **common).fit(x64 := x.astype(np.float64))
    assert ours.n_iter_ == ref.n_iter_ == 10
    assert abs(ours.lower_bound_ - ref.lower_bound_) <= 1e-6 * abs(ref.lower_bound_)
    np.testing.assert_allclose(ours.means_, ref.means_, rtol=0, atol=1e-5)
    np.testing.assert_allclose(ours.weights_, ref.weights_, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(ours.covariances_, ref.covariances_, rtol=1e-6)
    np.testing.assert_allclose(ours.score_samples(x), ref.score_samples(x64), rtol=1e-9)
    np.testing.assert_array_equal(ours.predict(x), ref.predict(x64))
    np.testing.assert_allclose(ours.predict_proba(x), ref.predict_proba(x64), atol=1e-8)
    assert ours.bic(x) == pytest.approx(ref.bic(x64), rel=1e-9)
    assert ours.aic(x) == pytest.approx(ref.aic(x64), rel=1e-9)


@pytest.mark.parametrize("covariance_type", ["diag", "spherical"])
def test_float32_path_keeps_raw_scale_precision(covariance_type):
    """Raw SIFT (0..255): the float32 path tracks float64 from the same start."""
    x = real_subset()
    start = starting_point(x, 8, covariance_type)
    fits = {}
    for dtype in ("float32", "float64"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fits[dtype] = GaussianMixture(8, covariance_type=covariance_type, max_iter=10, tol=0.0,
                                          compute_dtype=dtype, device="cpu", **start).fit(x)
    a, b = fits["float32"], fits["float64"]
    assert abs(a.lower_bound_ - b.lower_bound_) <= 1e-7 * abs(b.lower_bound_)
    np.testing.assert_allclose(a.means_, b.means_, atol=1e-2)  # data spans 0..255


@pytest.mark.parametrize("covariance_type", ["diag", "spherical", "full"])
def test_lower_bound_never_decreases(covariance_type):
    x = real_subset()[:2000] if covariance_type != "full" else synthetic(1500)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = GaussianMixture(10, covariance_type=covariance_type, max_iter=30, tol=0.0, random_state=1,
                            compute_dtype="float64").fit(x)
    bounds = np.array(g.lower_bounds_)
    assert g.n_reseeded_ == 0
    assert len(bounds) == 30
    assert np.all(np.diff(bounds) >= -1e-9 * np.abs(bounds[1:]))
