"""Property-based fuzzing of the public API: every outcome is a usable result or a ValueError/TypeError.

The "ci" profile (default, tests/conftest.py) runs a few examples per property; a long search:
``pytest tests/test_fuzz.py --hypothesis-profile=long``.
"""
import io
import warnings
import zipfile

import numpy as np
import pytest
from conftest import rewrite_gmm_file
from hypothesis import assume, example, given
from hypothesis import strategies as st

import flashgmm_ivf
from flashgmm_ivf import GaussianMixture

COVARIANCE_TYPES = ("spherical", "diag", "full")


def quietly(f, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning and the like are allowed outcomes
        return f(*args, **kwargs)


@st.composite
def data_sets(draw):
    """Rows of varied shape, dtype, scale (1e-30 .. 1e15), offset and constant columns."""
    n, d = draw(st.integers(1, 40)), draw(st.integers(1, 5))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    scale = 10.0 ** draw(st.sampled_from([-30, -12, -3, 0, 3, 8, 15]))
    offset = draw(st.sampled_from([0.0, 1.0, -1e6, 1e12]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = offset + scale * rng.standard_normal((n, d))
    constant = draw(st.lists(st.booleans(), min_size=d, max_size=d))
    x[:, np.array(constant)] = x[0, np.array(constant)]
    if draw(st.booleans()):  # duplicate rows
        x[n // 2:] = x[: n - n // 2]
    return x.astype(dtype)


@given(x=data_sets(), k=st.integers(1, 4), covariance_type=st.sampled_from(COVARIANCE_TYPES))
def test_gmm_fit_is_finite_or_refused(x, k, covariance_type, tmp_path_factory):
    # Known bug, pinned by test_full_covariance_far_from_origin: not fuzzed further here.
    assume(not (covariance_type == "full" and np.abs(x).max() >= 1e9))
    g = GaussianMixture(k, covariance_type=covariance_type, max_iter=3, random_state=0, device="cpu")
    try:
        quietly(g.fit, x)
    except (ValueError, TypeError):
        return
    assert np.isfinite(g.lower_bound_) and np.isfinite(g.lower_bounds_).all()
    for name in ("weights_", "means_", "covariances_", "precisions_cholesky_"):
        assert np.isfinite(getattr(g, name)).all(), name
    labels, scores = g.predict(x), g.score_samples(x)
    assert labels.shape == (len(x),) and ((labels >= 0) & (labels < k)).all()
    assert scores.shape == (len(x),) and np.isfinite(scores).all()
    buffer = io.BytesIO()
    g.save(buffer)
    buffer.seek(0)
    h = GaussianMixture.load(buffer)
    np.testing.assert_array_equal(h.score_samples(x), scores)


@pytest.fixture(scope="module")
def saved_gmm(tmp_path_factory):
    rng = np.random.default_rng(0)
    g = quietly(GaussianMixture(3, max_iter=3, random_state=0, device="cpu").fit, rng.standard_normal((200, 4)))
    path = tmp_path_factory.mktemp("fuzz") / "g.npz"
    g.save(path)
    return g, path, path.read_bytes()


def assert_same_model(h, g):
    for name in ("weights_", "means_", "covariances_"):
        np.testing.assert_array_equal(getattr(h, name), getattr(g, name))
    assert h.get_params() == g.get_params() and h.n_iter_ == g.n_iter_


@given(data=st.data())
def test_corrupt_gmm_file_is_refused(saved_gmm, data, tmp_path_factory):
    g, path, blob = saved_gmm
    how = data.draw(st.sampled_from(["flip", "truncate"]))
    if how == "flip":
        content = bytearray(blob)
        for pos in data.draw(st.lists(st.integers(0, len(blob) - 1), min_size=1, max_size=4)):
            content[pos] ^= data.draw(st.integers(1, 255))
    else:
        content = blob[: data.draw(st.integers(0, len(blob) - 1))]
    bad = tmp_path_factory.mktemp("bad") / "bad.npz"
    bad.write_bytes(bytes(content))
    try:
        h = GaussianMixture.load(bad)
    except ValueError as err:
        assert "bad.npz" in str(err)
        return
    assert_same_model(h, g)  # only bytes the archive does not read (e.g. zip timestamps) were hit


@given(field=st.sampled_from(["params", "fitted", "format_version"]), value=st.integers(-3, 3),
       resign=st.booleans())
def test_edited_gmm_header_is_refused(saved_gmm, field, value, resign, tmp_path_factory):
    g, path, _ = saved_gmm
    changes = {"params": dict(g.get_params(), n_components=value), "format_version": value,
               "fitted": {"converged_": False, "n_iter_": value, "lower_bound_": 0.0, "lower_bounds_": [],
                          "n_reseeded_": 0, "n_features_in_": 4}}
    assume(not (field == "params" and value == 3) and not (field == "format_version" and value == 2))
    assume(not (field == "fitted" and resign and value >= 0))  # a valid header, re-signed: legitimately loads
    edited = rewrite_gmm_file(path, tmp_path_factory.mktemp("edit") / "edited.npz",
                              header={field: changes[field]}, resign=resign)
    with pytest.raises(ValueError, match="edited.npz"):
        GaussianMixture.load(edited)
    with zipfile.ZipFile(edited) as z:
        assert "checksum.npy" in z.namelist()


@given(n=st.integers(12, 120), d=st.integers(1, 6), k=st.integers(1, 10), seed=st.integers(0, 2**32 - 1),
       recall=st.sampled_from([0.5, 0.9, 0.99, 1.0]), scale=st.sampled_from([1e-3, 1.0, 255.0, 1e6]))
@example(n=11, d=1, k=3, seed=0, recall=0.5, scale=1e-3)  # the lists the table chose held 2 ids
def test_index_search_returns_full_rows(n, d, k, seed, recall, scale):
    rng = np.random.default_rng(seed)
    x = (scale * rng.random((n, d))).astype(np.float32)
    queries = (scale * rng.random((5, d))).astype(np.float32)
    index = flashgmm_ivf.index_factory(d, "IVF8_GMM,Flat", device="cpu")
    try:
        quietly(index.train, x)
    except ValueError:  # e.g. fewer training rows than the index needs: refused, never half-built
        return
    quietly(index.add, x)
    D, I = quietly(index.search, queries, k, recall=recall)
    assert D.shape == I.shape == (5, k)
    if index.ntotal >= k:
        assert (I >= 0).all() and np.isfinite(D).all()
        assert all(len(set(row)) == k for row in I.tolist())
    exact = ((queries[:, None, :].astype(np.float64) - x[None].astype(np.float64)) ** 2).sum(-1)
    assert (I < n).all() and ((I == -1) | (np.take_along_axis(exact, np.maximum(I, 0), 1) >= 0)).all()


def test_recall_search_on_a_tiny_index():
    x = np.random.default_rng(0).random((10, 3)).astype(np.float32)
    index = flashgmm_ivf.index_factory(3, "IVF8_GMM,Flat", device="cpu")
    quietly(index.train, x)
    index.add(x)
    D, I = quietly(index.search, x[:2], 1, recall=0.9)
    assert (I >= 0).all()


@pytest.mark.xfail(strict=True, reason="bug: covariance_type='full' fitted on rows far from the origin (here one row "
                                       "at 1e12) loses the mean's precision: lower_bound_ is -inf and the row's own "
                                       "score is about -8e12")
def test_full_covariance_far_from_origin():
    g = quietly(GaussianMixture(1, covariance_type="full", max_iter=3, random_state=0, device="cpu").fit,
                np.array([[1e12]]))
    assert np.isfinite(g.lower_bound_) and g.score_samples(np.array([[1e12]]))[0] > 0
