"""Property-based fuzzing of the public API: every outcome is a usable result or a ValueError/TypeError.

The "ci" profile (default, tests/conftest.py) runs a few examples per property; a long search:
``pytest tests/test_fuzz.py --hypothesis-profile=long``. The fork-server fuzzer
(``python -m flashgmm_ivf.eval.fuzz``, each case in its own process) runs here on a few dozen cases,
and every bug it found has a regression test below.
"""
import io
import json
import subprocess
import sys
import warnings
import zipfile

import faiss
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


@pytest.mark.parametrize("spec, metric", [("IVF1_GMM,Flat", "l2"), ("IVF1_GMM(probe=radius),Flat", "cosine"),
                                          ("IVF1_GMM(coarse=hnsw2,calibration_rows=1),Flat", "l2")])
def test_recall_search_of_a_one_list_index_is_exact(spec, metric):
    # The depth table's difficulty feature needed two coarse distances: one list raised a
    # ValueError about an internal array's shape.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 4)).astype(np.float32)
    index = flashgmm_ivf.index_factory(4, spec, metric, device="cpu")
    quietly(index.train, x)
    index.add(x)
    _, I = quietly(index.search, x[:5], 3, recall=0.9)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True) if metric == "cosine" else x
    exact = ((xn[:5, None, :].astype(np.float64) - xn[None].astype(np.float64)) ** 2).sum(-1)
    np.testing.assert_array_equal(np.sort(I, 1), np.sort(np.argsort(exact, 1)[:, :3], 1))


def test_float32_full_covariances_are_symmetric_and_round_trip():
    # The kernels sum S2's entries (i, j) and (j, i) in different orders: the covariances came out
    # asymmetric by ~1e-7 relative and the saved file was refused on load as not symmetric.
    x = np.random.default_rng(0).integers(0, 256, (13, 8)).astype(np.uint8)
    g = quietly(GaussianMixture(1, covariance_type="full", max_iter=2, random_state=0, device="cpu").fit, x)
    np.testing.assert_array_equal(g.covariances_, g.covariances_.transpose(0, 2, 1))
    buffer = io.BytesIO()
    g.save(buffer)
    buffer.seek(0)
    np.testing.assert_array_equal(GaussianMixture.load(buffer).score_samples(x), g.score_samples(x))


def test_a_model_of_rows_at_the_largest_accepted_values_round_trips():
    # Means of rows with |x| <= 1e15 came out at 1.000000009e15 in float32, and the saved file
    # was refused on load (means beyond 1e15).
    x = np.random.default_rng(0).uniform(0.999e15, 1e15, size=(50, 3))
    g = quietly(GaussianMixture(2, covariance_type="spherical", max_iter=3, random_state=0, device="cpu").fit, x)
    buffer = io.BytesIO()
    g.save(buffer)
    buffer.seek(0)
    np.testing.assert_array_equal(GaussianMixture.load(buffer).means_, g.means_)
    with pytest.raises(ValueError, match="means of component 1 exceed 2e\\+15"):
        GaussianMixture.from_parameters([0.5, 0.5], [[0.0], [3e15]], [1.0, 1.0], covariance_type="spherical")


def test_index_training_refuses_values_its_mixture_cannot_hold(tmp_path):
    # An inner-product index trained on values of 1e16 (norms below FAISS's float32 limit) stored
    # a mixture whose file read_index then refused: the index was written but could not be read.
    x = np.random.default_rng(0).uniform(-1, 1, size=(400, 3)).astype(np.float32)
    index = flashgmm_ivf.index_factory(3, "IVF4_GMM,Flat", "ip", device="cpu")
    with pytest.raises(ValueError, match="up to \\|x\\| = 1e\\+16.*rescale"):
        quietly(index.train, x * np.float32(1e16))
    quietly(index.train, x * np.float32(1e14))
    index.add(x * np.float32(1e14))
    flashgmm_ivf.write_index(index, str(tmp_path / "i.npz"))
    assert flashgmm_ivf.read_index(str(tmp_path / "i.npz")).ntotal == 400


def test_full_covariance_index_of_constant_rows_far_out():
    # k-means centroids of rows at 1e15 sit off the rows by float32 round-off (~1e8): list
    # covariances taken about the centroids were rank one and refused as ill-defined.
    x = np.full((200, 8), 1e15, np.float32)
    x[:, 0] = np.arange(200)
    index = flashgmm_ivf.index_factory(8, "IVF4_GMM(full),Flat", device="cpu")
    quietly(index.train, x)
    index.add(x)
    _, I = quietly(index.search, x[:3], 1, recall=0.9)
    np.testing.assert_array_equal(I[:, 0], [0, 1, 2])


@pytest.mark.parametrize("encoding", ["Flat", "SQ4"])
def test_radius_search_returns_k_ids_at_any_nprobe(encoding):
    # Radius pruning bounds the first min(k, 10) results: at k = ntotal it skipped lists the
    # rest of the row needed, and FAISS-style nprobe = nlist searches returned -1 ids.
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(200, 4)) + 8 * rng.integers(0, 4, (200, 1))).astype(np.float32)
    index = flashgmm_ivf.index_factory(4, f"IVF16_GMM(probe=radius),{encoding}", device="cpu")
    quietly(index.train, x)
    index.add(x)
    for nprobe in (4, 16):
        _, I = index.search(x[:5], 200, nprobe=nprobe)
        assert (I >= 0).all() if nprobe == 16 else (I[:, :10] >= 0).all()
        assert all(len(set(row[row >= 0])) == (row >= 0).sum() for row in I)


def test_float32_log_densities_far_below_zero_keep_their_rows(tmp_path):
    # At log-densities of -7e13 in float32, top + log(cutoff) rounds to top: the sparse
    # log-sum-exp kept no entry of the row (log Z = -inf, the row dropped from the statistics),
    # and the index's saved mixture, whose first bound was -inf, was refused by read_index.
    # variance_floor=0: scikit-learn's model, whose variance of 1e-6 puts the rows that far down.
    x = np.full((296, 8), 1e12, np.float32)
    g = quietly(GaussianMixture(4, covariance_type="full", max_iter=1, tol=0.0, reg_covar=1e-6, variance_floor=0.0,
                                means_init=np.full((4, 8), 1e12), random_state=0, device="cpu").fit, x)
    np.testing.assert_allclose(g.lower_bounds_, [-0.5 * 8 * 4096.0 ** 2 / 1e-6], rtol=1e-6)
    index = flashgmm_ivf.index_factory(8, "IVF4_GMM(full,partition=gmm),Flat", device="cpu")
    quietly(index.train, np.full((300, 8), 1e12, np.float32))
    index.add(x)
    flashgmm_ivf.write_index(index, str(tmp_path / "i.npz"))
    assert flashgmm_ivf.read_index(str(tmp_path / "i.npz")).ntotal == len(x)


def test_recall_search_of_an_index_trained_on_three_rows():
    # Fewer than 4 training rows hold none out as stand-in queries: the depth table was fitted
    # on zero queries and numpy's reshape raised. The search scans every list instead.
    x = np.random.default_rng(0).normal(size=(3, 3)).astype(np.float32)
    index = flashgmm_ivf.index_factory(3, "IVF1_GMM,Flat", device="cpu")
    quietly(index.train, x)
    index.add(np.repeat(x, 10, axis=0))
    _, I = quietly(index.search, x, 10, recall=0.9)
    assert (I >= 0).all() and all(len(set(row)) == 10 for row in I.tolist())


def test_full_covariance_far_from_origin():
    # float64 rows are centred before the float32 rounding: x = 1e12 rounded to float32 first sat
    # 4096 from its own mean (lower_bound_ -inf, a score of -8e12). The row sits at its mean: its
    # score is the density's peak, whatever variance the floor of the dtype leaves.
    for compute_dtype in ("float32", "float64"):
        g = quietly(GaussianMixture(1, covariance_type="full", max_iter=3, random_state=0, device="cpu",
                                    compute_dtype=compute_dtype).fit, np.array([[1e12]]))
        peak = -0.5 * np.log(2 * np.pi * g.covariances_[0, 0, 0])
        assert g.score_samples(np.array([[1e12]]))[0] == pytest.approx(peak, abs=1e-3)
        assert g.lower_bound_ == pytest.approx(peak, abs=1e-3)
    assert peak > 0  # float64: scikit-learn's reg_covar alone


def test_full_covariance_with_a_round_off_pivot_is_refused():
    """Rank-7 covariances in 8 dimensions (eight rows of integers, no reg_covar): Cholesky
    factorisations often succeed on a last pivot of round-off (pivot^2 / variance ~1e-15, where
    a fit came back with a precision of ~1e8). Those are refused as ill-defined (one whose
    leading block is ill-conditioned can leave round-off of 1e-10 of the variance, which no
    threshold tells from real data); full-rank covariances with variances from 1 to 1e28 are not."""
    import torch

    from flashgmm_ivf._mstep import precisions_cholesky
    rng = np.random.default_rng(0)
    refused = 0
    for _ in range(40):
        a = torch.as_tensor(rng.integers(0, 256, (8, 7)), dtype=torch.float64)
        cov = (a @ a.T)[None]
        chol, info = torch.linalg.cholesky_ex(cov)
        if int(info[0]) == 0 and (torch.diagonal(chol[0]) ** 2 / torch.diagonal(cov[0])).min() < 2e-15:
            with pytest.raises(ValueError, match="ill-defined empirical covariance"):
                precisions_cholesky(cov, "full")
            refused += 1
    assert refused >= 5
    scale = torch.logspace(0, 14, 8, dtype=torch.float64)
    corr = torch.full((8, 8), 0.3, dtype=torch.float64).fill_diagonal_(1.0)
    prec_chol = precisions_cholesky((corr * scale[:, None] * scale[None, :])[None], "full")
    assert torch.isfinite(prec_chol).all()


# ---------------------------------------------------------------------------------------------
# The fork-server fuzzer (flashgmm_ivf.eval.fuzz), and one regression test per bug it found.
def test_fuzz_harness_quick_run(tmp_path):
    """The long profile's harness on a few dozen cases: it runs, and finds nothing."""
    out = tmp_path / "fuzz.json"
    done = subprocess.run([sys.executable, "-m", "flashgmm_ivf.eval.fuzz", "--inputs", "27", "--files", "10",
                           "--data-files", "8", "--jobs", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, check=False,
                          cwd=tmp_path)  # not the repository root, whose source folder would shadow the package
    assert out.exists(), done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert sum(g["cases"] for g in report["groups"].values()) == 45
    assert report["failures"] == [], done.stdout[-3000:]
    assert done.returncode == 0


def test_full_covariance_of_two_rows_far_out_in_float32():
    """Two rows at 1e12, two full components, float32 E-steps: each component's first
    covariance (one row) came out as 10 eps |x - shift|^2 ~ 1e9 instead of reg_covar (N_k + 10 eps
    in s2 / N_k - mu^2), and the first lower bound as -inf."""
    x = np.array([[1.70266264e12, -2.04740100e12, 2.40668901e11], [2.06245423e12, 9.29615905e11, 1.48174946e11]],
                 np.float32)
    g = quietly(GaussianMixture(2, covariance_type="full", max_iter=5, tol=0.0, init_params="k-means++",
                                random_state=126972799, compute_dtype="float32", device="cpu").fit, x)
    assert np.isfinite(g.lower_bounds_).all() and np.isfinite(g.score_samples(x)).all()


def test_fuzz_checks_full_covariances_on_their_correlations():
    """A fitted covariance (a fuzz case with features of variance 2 and 3e27 side by side) that is
    positive definite (its correlation matrix's eigenvalues are 0.9993-1.0007) but whose own
    eigenvalues carry round-off ~1e12, far above the smallest (LAPACK builds have given it as
    -4.5e7 and as 1.5): they cannot tell it from garbage. The checker reads the correlations, and
    still catches a covariance that is not positive definite."""
    from types import SimpleNamespace

    from flashgmm_ivf.eval.fuzz import Garbage, check_fitted
    cov = np.array([
        [2.2760136285632216e+27, 3.814048561924512e+19, -3.314491136086219e+19, 2.1622032601244296e+26,
         23450214157838.594, 4.356482265354089e+26, -20345160908685.254, 1.960502422887689e+26],
        [3.814048561924512e+19, 7.930859472964681e+23, 4.061864055171082e+19, 3.810596992202467e+19,
         655468.099609375, 1.0747629267048202e+18, 585361.9501953125, 3.488987186788198e+19],
        [-3.314491136086219e+19, 4.061864055171082e+19, 3.0002957752845614e+23, 5.616898457507935e+19,
         -977938.4797363281, 5.045455853939851e+18, -5954.2801513671875, 6.264895509924676e+18],
        [2.1622032601244296e+26, 3.810596992202467e+19, 5.616898457507935e+19, 1.6651621493839544e+27,
         -9070360359918.44, -3.725069965400622e+26, -16025922562126.537, -1.676353614526258e+26],
        [23450214157838.594, 655468.099609375, -977938.4797363281, -9070360359918.44, 1.9476583603281543,
         -9168743815271.332, -0.08830379641357208, -1777942348775.2722],
        [4.356482265354089e+26, 1.0747629267048202e+18, 5.045455853939851e+18, -3.725069965400622e+26,
         -9168743815271.332, 3.048203563209237e+27, 30790672065230.18, -3.377576547768157e+26],
        [-20345160908685.254, 585361.9501953125, -5954.2801513671875, -16025922562126.537, -0.08830379641357208,
         30790672065230.18, 2.096899925240209, -5466032385788.403],
        [1.960502422887689e+26, 3.488987186788198e+19, 6.264895509924676e+18, -1.676353614526258e+26,
         -1777942348775.2722, -3.377576547768157e+26, -5466032385788.403, 1.368086417806992e+27],
    ])
    eig = np.linalg.eigvalsh(cov)  # round-off of n eps |lambda|_max ~ 6e12 hides the smallest, ~1.5
    assert eig.min() < len(cov) * np.finfo(np.float64).eps * eig.max()
    chol = np.linalg.cholesky(cov)

    def fitted(c):
        return SimpleNamespace(weights_=np.ones(1), means_=np.zeros((1, 8)), covariances_=c[None],
                               precisions_cholesky_=np.linalg.inv(chol).T[None], covariance_type="full",
                               lower_bound_=0.0, lower_bounds_=[0.0], n_iter_=1)
    check_fitted(fitted(cov), 1, 8, 1)
    broken = cov.copy()
    broken[4, 6] = broken[6, 4] = 3.0  # |correlation| > 1 between the two small features
    with pytest.raises(Garbage, match="not positive definite"):
        check_fitted(fitted(broken), 1, 8, 1)


def reference_scores(g, x):
    from flashgmm_ivf.eval.fuzz import logsumexp, reference_log_prob
    ll, _, _ = reference_log_prob(g, x)
    return ll, logsumexp(ll)


def test_float64_responsibilities_with_entries_of_1e15():
    # ~10% of the entries at 1e14..1e15: the expanded form |x|^2 - 2 x.mu + |mu|^2 cancelled by
    # thousands of nats even in float64; such entries are recomputed from (x - mu)^2.
    rng = np.random.default_rng(1)
    x = rng.standard_normal((400, 8))
    spikes = rng.random(x.shape) < 0.1
    x[spikes] = rng.choice([-1, 1], spikes.sum()) * 10.0 ** rng.uniform(14, 15, spikes.sum())
    g = quietly(GaussianMixture(8, compute_dtype="float64", device="cpu", random_state=0, max_iter=20).fit, x)
    ll, ref = reference_scores(g, x)
    log_resp = ll - ref[:, None]
    kept = log_resp > -30
    with np.errstate(divide="ignore"):
        np.testing.assert_allclose(np.log(g.predict_proba(x))[kept], log_resp[kept], atol=1e-8)
    assert (ll[np.arange(len(x)), g.predict(x)] >= ll.max(1) - 1e-6).all()


def test_wide_integers_keep_their_digits():
    # int64 rows went to float32 (1e12 + 1 -> 999999995904): now float64.
    x = (10**12 + np.arange(20)[:, None] * np.array([[1, 2]])).astype(np.int64)
    g = quietly(GaussianMixture(1, compute_dtype="float64", device="cpu", max_iter=5).fit, x)
    np.testing.assert_allclose(g.score_samples(x), reference_scores(g, x)[1], rtol=1e-6)


def test_constant_rows_far_out_in_float64():
    # float64 EM kept a float32-rounded shift ~1e7 from rows at 1e15: variances lost their digits
    # and the lower bound went to -inf.
    g = quietly(GaussianMixture(2, compute_dtype="float64", device="cpu", init_params="random_from_data",
                                max_iter=5, random_state=1, tol=0).fit, np.full((40, 5), 1e15))
    assert np.isfinite(g.lower_bounds_).all()


def test_predict_proba_of_far_rows_sums_to_one():
    g = quietly(GaussianMixture(2, device="cpu", random_state=0).fit,
                np.concatenate([np.zeros((20, 2)), np.full((20, 2), 5.0)]) + np.random.default_rng(0).random((40, 2)))
    p = g.predict_proba(np.array([[1.1e20, 4.3e19], [-1e25, 3.0]]))
    np.testing.assert_allclose(p.sum(1), 1.0)


def test_search_with_a_k_beyond_memory_is_refused():
    x = np.random.default_rng(0).random((200, 4)).astype(np.float32)
    index = flashgmm_ivf.index_factory(4, "IVF4_GMM(coarse=flat),Flat", device="cpu")
    quietly(index.train, x)
    index.add(x)
    with pytest.raises(ValueError, match="k=1000000000000"):
        index.search(x[:3], 10**12)


def test_sqfp16_refuses_residuals_beyond_float16():
    # Stored as float16 infinity, such a vector was never found (-1 ids, inf distances).
    x = np.random.default_rng(0).random((200, 4)).astype(np.float32)
    index = flashgmm_ivf.index_factory(4, "IVF2_GMM,SQfp16", device="cpu")
    quietly(index.train, x)
    with pytest.raises(ValueError, match="float16"):
        index.add(np.full((1, 4), 1e6, np.float32))
    assert index.ntotal == 0


def resigned_index(src, dst, faiss_bytes=None, **header):
    from flashgmm_ivf.eval.fuzz import (
        npy_array,
        npy_bytes,
        resign,
        write_zip,
        zip_members,
    )

    from flashgmm_ivf.ivf import index_io
    members = zip_members(src.read_bytes())
    fields = json.loads(npy_array(members["header.npy"]).tobytes())
    fields.update(header)
    members["header.npy"] = npy_bytes(np.frombuffer(json.dumps(fields).encode(), np.uint8))
    if faiss_bytes is not None:
        members["faiss_index.npy"] = npy_bytes(np.frombuffer(faiss_bytes, np.uint8))
    resign(members, "header", "sha256", index_io.FILE_ARRAYS)
    dst.write_bytes(write_zip(members))
    return dst


@pytest.mark.parametrize("field, value, match", [("next_id", 3, "next_id"), ("ntotal", 7, "ntotal"),
                                                 ("max_dup", 10**9, "max_dup")])
def test_read_index_checks_counters_against_the_lists(tmp_path, field, value, match):
    # A re-signed header whose next_id is below a stored id loaded, and add then reused ids.
    x = np.random.default_rng(0).random((200, 4)).astype(np.float32)
    index = flashgmm_ivf.index_factory(4, "IVF4_GMM(coarse=flat),Flat", device="cpu")
    quietly(index.train, x)
    index.add(x[:50])
    flashgmm_ivf.write_index(index, tmp_path / "i.npz")
    edited = resigned_index(tmp_path / "i.npz", tmp_path / "edited.npz", **{field: value})
    with pytest.raises(ValueError, match=match):
        flashgmm_ivf.read_index(edited)


def test_an_index_with_copies_removed_down_to_one_entry_reads_back(tmp_path):
    # max_dup (the most copies a vector ever had) was checked against the entries left: after
    # remove_ids a written index was refused by read_index.
    x = np.random.default_rng(0).random((200, 4)).astype(np.float32)
    index = flashgmm_ivf.index_factory(4, "IVF4_GMM(coarse=flat,copies=1.5),Flat", device="cpu")
    quietly(index.train, x)
    index.add(x[:30])
    invlists = index.index.invlists
    entries = np.concatenate([faiss.rev_swig_ptr(invlists.get_ids(j), invlists.list_size(j)).copy()
                              for j in range(4)])
    copies = np.bincount(entries, minlength=30)
    assert copies.max() == 2 and (copies == 1).any()
    single = int(np.flatnonzero(copies == 1)[0])
    index.remove_ids(np.setdiff1d(np.arange(30), [single]))
    assert index.index.ntotal == 1
    flashgmm_ivf.write_index(index, tmp_path / "i.npz")
    again = flashgmm_ivf.read_index(tmp_path / "i.npz")
    assert again.ntotal == 1 and again.search(x[single:single + 1], 1, nprobe=4)[1][0, 0] == single


def test_read_index_refuses_faiss_bytes_whose_sizes_exhaust_memory(tmp_path):
    # A size field FAISS trusts made it throw std::bad_alloc: a MemoryError, not a ValueError.
    x = np.random.default_rng(0).random((200, 4)).astype(np.float32)
    index = flashgmm_ivf.index_factory(4, "IVF2_GMM(coarse=flat),Flat", device="cpu")
    quietly(index.train, x)
    index.add(x)
    flashgmm_ivf.write_index(index, tmp_path / "i.npz")
    good = bytes(faiss.serialize_index(index.index))
    for pos in range(min(len(good) - 8, 400)):  # the first field whose damage makes FAISS allocate 2^60 bytes
        damaged = good[:pos] + (1 << 60).to_bytes(8, "little") + good[pos + 8:]
        try:
            faiss.deserialize_index(np.frombuffer(damaged, np.uint8))
        except MemoryError:
            break
        except RuntimeError:
            continue
    else:
        pytest.skip("no 8-byte field of this FAISS build's IVF header makes it run out of memory")
    edited = resigned_index(tmp_path / "i.npz", tmp_path / "edited.npz", faiss_bytes=damaged)
    with pytest.raises(ValueError, match="ran out of memory"):
        flashgmm_ivf.read_index(edited)


def test_float32_model_scores_rows_beyond_1e19():
    # x**2 of the float32 design overflowed (score -inf) though the Mahalanobis terms were modest.
    x = np.random.default_rng(0).standard_normal((50, 1)) * 1e14
    g = quietly(GaussianMixture(1, device="cpu", covariance_type="spherical").fit, x)
    far = np.array([[-1.13e20]])
    np.testing.assert_allclose(g.score_samples(far), reference_scores(g, far)[1], rtol=1e-6)


def test_hnsw_coarse_step_at_full_depth_scans_every_list():
    # A walk over a sparse graph (M=2) found fewer than nlist lists at nprobe=nlist: -1 ids.
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (300, 16)).astype(np.float32)
    index = flashgmm_ivf.index_factory(16, "IVF16_GMM(coarse=hnsw2),Flat", device="cpu")
    quietly(index.train, x)
    index.add(x[:200])
    _, I = index.search(rng.standard_normal((5, 16)).astype(np.float32), 200, nprobe=16)
    assert (I >= 0).all() and all(len(set(row)) == 200 for row in I.tolist())


def test_cosine_rows_beyond_float32_squares():
    # faiss.normalize_L2 overflowed on rows of 1e19 (their squares exceed float32): the row
    # lost its direction and range_search of the next queries came back empty.
    x = np.random.default_rng(0).integers(1, 256, (300, 4)).astype(np.float32)
    index = flashgmm_ivf.index_factory(4, "IVF1_GMM,Flat", "cosine", device="cpu")
    quietly(index.train, x)
    index.add(x)
    q = np.array([[1e19] * 4, [255.0] * 4], np.float32)
    lims, D, I = index.range_search(q, 0.5, nprobe=1)
    assert lims[1] - lims[0] == lims[2] - lims[1] > 0
    np.testing.assert_allclose(index.search(q, 3)[0][0], index.search(q, 3)[0][1], rtol=1e-6)


def test_float64_lower_bound_with_a_far_component(tmp_path):
    # The fuzzer's case: rows at -1e6 and a few ~1e14 away, float64, reg_covar 1. The E-step's
    # offset (the largest component constant, ~1e13) rounded every log-likelihood to 1/256, and
    # the third iteration's to -inf.
    from flashgmm_ivf.eval.fuzz import run_case
    result = run_case("gmm", 7661, {"tmp": tmp_path})
    assert result["outcome"] == "ok", result


def test_variances_below_float32_are_scored_in_float64():
    # reg_covar=0 on rows of 1e-30: variances ~1e-61 overflow float32 precisions (NaN scores).
    x = np.random.default_rng(0).standard_normal((5, 2)).astype(np.float32) * np.float32(1e-30)
    g = quietly(GaussianMixture(2, covariance_type="spherical", reg_covar=0.0, max_iter=0, device="cpu",
                                random_state=0).fit, x)
    assert np.isfinite(g.score_samples(x)).all()


def test_damaged_npy_header_inside_a_file_is_a_value_error(saved_gmm, tmp_path):
    # An unbalanced bracket in a member's .npy header dict raised tokenize.TokenError.
    from flashgmm_ivf.eval.fuzz import write_zip, zip_members
    _, _, blob = saved_gmm
    members = zip_members(blob)
    raw = bytearray(members["weights.npy"])
    raw[raw.index(b"}")] = ord("(")
    members["weights.npy"] = bytes(raw)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(write_zip(members))
    with pytest.raises(ValueError, match="bad.npz"):
        GaussianMixture.load(bad)
