"""scikit-learn's estimator checks and its own GaussianMixture tests, run against our class.

``check_estimator`` runs on :class:`flashgmm_ivf.GaussianMixture` as it is. scikit-learn's
``sklearn/mixture/tests/test_gaussian_mixture.py`` is imported from the installed scikit-learn
and its tests are collected here with ``GaussianMixture`` swapped for ours, set to
scikit-learn's defaults (``covariance_type='full'``) and to its arithmetic (float64 on the
CPU). ``EXCLUDED`` lists the tests that cannot apply, each with its reason; covariance
type 'tied' (not implemented) is dropped from the loops and parametrisations.
"""
import inspect

import numpy as np
import pytest
from sklearn.utils.estimator_checks import parametrize_with_checks

from flashgmm_ivf import GaussianMixture

sk = pytest.importorskip("sklearn.mixture.tests.test_gaussian_mixture")

SUPPORTED_COVARIANCE_TYPES = ("full", "diag", "spherical")
PRIVATE_API = "tests scikit-learn's private functions, not the estimator"
EXCLUDED = {
    "test_suffstat_sk_full": PRIVATE_API,
    "test_suffstat_sk_tied": PRIVATE_API,
    "test_suffstat_sk_diag": PRIVATE_API,
    "test_gaussian_suffstat_sk_spherical": PRIVATE_API,
    "test_compute_log_det_cholesky": PRIVATE_API,
    "test_gaussian_mixture_log_probabilities": PRIVATE_API,
    "test_gaussian_mixture_estimate_log_prob_resp": "calls the private _estimate_log_prob_resp and _e_step",
    "test_gaussian_mixture_array_api_compliance": "array API inputs (torch/cupy namespaces) are not supported",
    "test_gaussian_mixture_raises_where_array_api_not_implemented": "array API inputs are not supported",
    "test_gaussian_mixture_all_init_does_not_estimate_gaussian_parameters":
        "mocks the private _estimate_gaussian_parameters",
    "test_gaussian_mixture_precisions_init": "sets parameters through the private _set_parameters",
    "test_gaussian_mixture_precisions_init_diag":
        "expects the initial means of scikit-learn's KMeans (ours come from FAISS k-means), so that a fit with "
        "precisions_init computed from them takes the same iterations as one without",
    "test_check_weights": "matches scikit-learn's range message, which swaps 'min value' and 'max value'",
    "test_bic_1d_1component": "compares against covariance_type='tied', not implemented",
}
UNSUPPORTED_PARAMS = ("tied",)


def _sklearn_defaults(cls, **defaults):
    """``cls`` with other ``__init__`` defaults, kept visible to get_params/clone."""
    sig = inspect.signature(cls.__init__)
    new_sig = sig.replace(parameters=[p.replace(default=defaults[p.name]) if p.name in defaults else p
                                      for p in sig.parameters.values()])

    def __init__(self, *args, **kwargs):
        bound = new_sig.bind(self, *args, **kwargs)
        bound.apply_defaults()
        cls.__init__(**bound.arguments)

    __init__.__signature__ = new_sig
    return type("GaussianMixture", (cls,), {"__init__": __init__})


SklearnDefaults = _sklearn_defaults(GaussianMixture, covariance_type="full", device="cpu", compute_dtype="float64")


@parametrize_with_checks([GaussianMixture(device="cpu")])
def test_check_estimator(estimator, check):
    check(estimator)


@pytest.fixture
def global_random_seed():
    return 42


@pytest.fixture
def global_dtype():
    return np.float64


@pytest.fixture(autouse=True)
def _ours_in_sklearns_tests(request, monkeypatch):
    if request.node.name.startswith("test_check_estimator"):
        return
    callspec = getattr(request.node, "callspec", None)
    unsupported = set(UNSUPPORTED_PARAMS) & set(callspec.params.values()) if callspec is not None else ()
    if unsupported:
        pytest.skip(f"{unsupported.pop()!r} (covariance_type 'tied', init_params 'random') is not implemented")
    monkeypatch.setattr(sk, "GaussianMixture", SklearnDefaults)
    monkeypatch.setattr(sk, "COVARIANCE_TYPE", SUPPORTED_COVARIANCE_TYPES)


for _name, _test in vars(sk).items():
    if _name.startswith("test_") and callable(_test):
        if _name in EXCLUDED:
            _test = pytest.mark.skip(reason=EXCLUDED[_name])(_test)
        globals()[_name] = _test
