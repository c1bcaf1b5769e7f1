"""GaussianMixture behaviour: input checks, data sources, persistence, re-seeding, CLI."""
import json
import warnings
import zipfile

import h5py
import numpy as np
import pytest
import torch
from conftest import rewrite_gmm_file

from sklearn.exceptions import NotFittedError

from flashgmm_ivf import ConvergenceWarning, GaussianMixture
from flashgmm_ivf.cli import bundled_dataset, main

FAST = dict(max_iter=5, tol=0.0, random_state=0)


@pytest.fixture(scope="module")
def data():
    base, test, _ = bundled_dataset()
    return base[:3000], test[:300]


def fit_quietly(gmm, x, method="fit"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return getattr(gmm, method)(x)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_rows_are_counted_and_located(data, bad):
    x = data[0][:500].astype(np.float32)
    x[[17, 123, 124], [3, 0, 9]] = bad
    with pytest.raises(ValueError, match=r"3 row\(s\) with NaN or infinity; the first is row 17"):
        GaussianMixture(4).fit(x)
    g = fit_quietly(GaussianMixture(4, **FAST), data[0][:500])
    with pytest.raises(ValueError, match=r"3 row\(s\) with NaN or infinity; the first is row 17"):
        g.predict(x)


def test_non_finite_rows_counted_across_chunks(data):
    x = data[0][:500].astype(np.float64)
    x[[250, 260, 499], 5] = np.nan
    with pytest.raises(ValueError, match=r"3 row\(s\) .* first is row 250"):
        GaussianMixture(4, chunk_size=100).fit(x)


def test_shape_and_size_errors(data):
    x = data[0][:100]
    with pytest.raises(ValueError, match="0 samples"):
        GaussianMixture(2).fit(x[:0])
    with pytest.raises(ValueError, match="must be 2-D"):
        GaussianMixture(2).fit(x[0])
    with pytest.raises(ValueError, match="must be 2-D"):
        GaussianMixture(2).fit(x[None])
    with pytest.raises(ValueError, match=r"n_components=101 must be <= n_samples=100"):
        GaussianMixture(101).fit(x)
    g = fit_quietly(GaussianMixture(2, **FAST), x)
    with pytest.raises(ValueError, match="has 127 features, but GaussianMixture is expecting 128 features"):
        g.predict(x[:, :127])
    with pytest.raises(NotFittedError, match="not fitted"):
        GaussianMixture(2).predict(x)
    with pytest.raises(TypeError, match="unsupported dtype"):
        GaussianMixture(2).fit(np.array([["a", "b"]] * 5))


@pytest.mark.parametrize("name,value,message", [
    ("n_components", 0, r"n_components must be an integer in \[1, inf\]"),
    ("covariance_type", "tied", "covariance_type must be one of"),
    ("init_params", "kmeans++", "init_params must be one of"),
    ("reg_covar", -1.0, "reg_covar must be a finite number >= 0"),
    ("device", "tpu", "device must be one of"),
    ("precision", "fp16", "precision must be one of"),
    ("compute_dtype", "float16", "compute_dtype must be one of"),
])
def test_bad_parameters(data, name, value, message):
    with pytest.raises(ValueError, match=message):
        GaussianMixture(**{"n_components": 2, name: value}).fit(data[0][:50])


def test_bad_initial_parameters(data):
    x = data[0][:50]
    with pytest.raises(ValueError, match=r"The parameter 'means' should have the shape of \(2, 128\), but got \(3, 128\) \(means_init\)"):
        GaussianMixture(2, means_init=np.zeros((3, 128))).fit(x)
    with pytest.raises(ValueError, match="should be normalized"):
        GaussianMixture(2, weights_init=[0.2, 0.2]).fit(x)
    with pytest.raises(ValueError, match="'diag precision' should be positive; first bad component 1"):
        GaussianMixture(2, precisions_init=np.array([[1.0] * 128, [0.0] * 128])).fit(x)


def test_one_shot_generator_is_refused(data):
    with pytest.raises(TypeError, match="one-shot iterator"):
        GaussianMixture(2).fit_stream(iter([data[0]]))


# ---------------------------------------------------------------- accepted input
@pytest.mark.parametrize("convert", [
    lambda x: x,                                   # uint8
    lambda x: x.astype(np.int64),
    lambda x: x.astype(np.float16),
    lambda x: x.astype(np.float32),
    lambda x: x.astype(np.float64),
    lambda x: np.asfortranarray(x.astype(np.float32)),
    lambda x: np.repeat(x, 2, axis=1)[:, ::2],      # non-contiguous view
    lambda x: torch.from_numpy(x.astype(np.float32)),
], ids=["uint8", "int64", "float16", "float32", "float64", "fortran", "strided", "torch"])
def test_input_types_give_the_same_model(data, convert):
    x = data[0][:1500]
    ref = fit_quietly(GaussianMixture(5, **FAST), x)
    got = fit_quietly(GaussianMixture(5, **FAST), convert(x))
    np.testing.assert_allclose(got.means_, ref.means_, rtol=1e-5, atol=1e-3)
    assert got.lower_bound_ == pytest.approx(ref.lower_bound_, rel=1e-6)


def test_streaming_sources_equal_in_memory_fit(data, tmp_path):
    x = data[0]
    ref = fit_quietly(GaussianMixture(6, chunk_size=1000, **FAST), x)
    path = tmp_path / "x.npy"
    np.save(path, x)
    memmap = np.load(path, mmap_mode="r")
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f["x"] = x
    with h5py.File(tmp_path / "x.h5", "r") as f:
        from_h5 = fit_quietly(GaussianMixture(6, chunk_size=700, **FAST), f["x"])
    from_memmap = fit_quietly(GaussianMixture(6, chunk_size=333, **FAST), memmap)
    from_callable = fit_quietly(GaussianMixture(6, **FAST),
                                lambda: (x[i:i + 400] for i in range(0, len(x), 400)), "fit_stream")
    from_list = fit_quietly(GaussianMixture(6, **FAST), [x[:1234], x[1234:]], "fit_stream")
    for g in (from_h5, from_memmap, from_callable, from_list):
        np.testing.assert_allclose(g.means_, ref.means_, rtol=1e-5, atol=1e-3)
        assert g.lower_bound_ == pytest.approx(ref.lower_bound_, rel=1e-6)


# ---------------------------------------------------------------- estimator behaviour
def test_methods_are_consistent(data):
    x, test = data
    g = fit_quietly(GaussianMixture(8, **FAST), x)
    proba = g.predict_proba(test)
    assert proba.shape == (300, 8)
    np.testing.assert_allclose(proba.sum(1), 1, atol=1e-6)
    np.testing.assert_array_equal(g.predict(test), proba.argmax(1))
    assert g.score(test) == pytest.approx(g.score_samples(test).mean())
    assert g.bic(test) > g.aic(test)
    samples, labels = g.sample(500)
    assert samples.shape == (500, 128) and np.bincount(labels, minlength=8).sum() == 500
    assert g.converged_ is False and g.n_iter_ == 5 and len(g.lower_bounds_) == 5


def test_n_init_keeps_the_best_and_warm_start_continues(data):
    x = data[0]
    singles = [fit_quietly(GaussianMixture(6, max_iter=3, tol=0, random_state=seed), x).lower_bound_
               for seed in range(3)]
    best = fit_quietly(GaussianMixture(6, max_iter=3, tol=0, n_init=3, random_state=0), x)
    assert best.lower_bound_ >= max(singles) - 1e-9 or best.lower_bound_ >= singles[0]
    warm = fit_quietly(GaussianMixture(6, max_iter=3, tol=0, random_state=0, warm_start=True,
                                       compute_dtype="float64"), x)
    first = warm.lower_bound_
    fit_quietly(warm, x)
    assert warm.lower_bound_ >= first - 1e-9


def test_converges_and_stops_early(data):
    g = GaussianMixture(4, tol=1e-2, max_iter=200, random_state=0).fit(data[0])
    assert g.converged_ and g.n_iter_ < 200


def test_empty_component_is_reseeded(data):
    x = data[0][:1000].astype(np.float64)
    means = x[:3].copy()
    means[2] = 1e4  # far from every row: it gets no responsibility
    g = fit_quietly(GaussianMixture(3, means_init=means, max_iter=4, tol=0), x)
    assert g.n_reseeded_ >= 1
    assert np.isfinite(g.means_).all() and np.isfinite(g.covariances_).all()
    assert np.abs(g.means_).max() < 300 and g.weights_.min() > 0


def test_verbose_shows_progress(data, capsys):
    fit_quietly(GaussianMixture(3, verbose=2, **FAST), data[0][:500])
    err = capsys.readouterr().err
    assert "EM" in err and "E-step" in err


# ---------------------------------------------------------------- persistence
@pytest.mark.parametrize("covariance_type", ["diag", "spherical", "full"])
def test_save_load_round_trip(data, tmp_path, covariance_type):
    x, test = data
    g = fit_quietly(GaussianMixture(4, covariance_type=covariance_type, **FAST), x[:, :16])
    g.save(tmp_path / "g.npz")
    h = GaussianMixture.load(tmp_path / "g.npz")
    for name in ("weights_", "means_", "covariances_", "precisions_cholesky_"):
        np.testing.assert_array_equal(getattr(h, name), getattr(g, name))
    assert (h.n_iter_, h.converged_, h.lower_bound_) == (g.n_iter_, g.converged_, g.lower_bound_)
    np.testing.assert_array_equal(h.score_samples(test[:, :16]), g.score_samples(test[:, :16]))
    assert h.get_params() == g.get_params()


def test_load_rejects_bad_files(data, tmp_path):
    g = fit_quietly(GaussianMixture(3, **FAST), data[0][:300])
    path = tmp_path / "g.npz"
    g.save(path)
    raw = path.read_bytes()
    (tmp_path / "truncated.npz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="truncated.npz: not a readable .*corrupt or truncated"):
        GaussianMixture.load(tmp_path / "truncated.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(ValueError, match="not a readable"):
        GaussianMixture.load(tmp_path / "text.npz")

    def rewrite(name, **changes):
        return rewrite_gmm_file(path, tmp_path / name, **changes)

    with pytest.raises(ValueError, match="v99.npz: contents do not match the SHA-256 checksum"):
        GaussianMixture.load(rewrite("v99.npz", header={"format_version": 99}, resign=False))
    edited = dict(g.get_params(), n_components=2)
    with pytest.raises(ValueError, match="do not match the SHA-256 checksum"):
        GaussianMixture.load(rewrite("params.npz", header={"params": edited}, resign=False))
    with pytest.raises(ValueError, match="do not match the SHA-256 checksum"):
        GaussianMixture.load(rewrite("w.npz", weights=g.weights_[::-1].copy(), resign=False))
    with pytest.raises(ValueError, match="format_version 99 is not supported"):
        GaussianMixture.load(rewrite("v99s.npz", header={"format_version": 99}))
    with pytest.raises(ValueError, match="format is 'other'"):
        GaussianMixture.load(rewrite("other.npz", header={"format": "other"}))
    with pytest.raises(ValueError, match=r"array 'means' is float64\(3, 5\)"):
        GaussianMixture.load(rewrite("shape.npz", means=np.zeros((3, 5))))
    with pytest.raises(ValueError, match="'covariances' holds NaN"):
        GaussianMixture.load(rewrite("nan.npz", covariances=np.full_like(g.covariances_, np.nan)))
    with pytest.raises(ValueError, match=r"variances <= 0 \(first: component 0\)"):
        GaussianMixture.load(rewrite("var.npz", covariances=np.where(np.arange(3)[:, None] == 0, -1.0,
                                                                       g.covariances_)))
    with pytest.raises(ValueError, match="weights do not form a distribution"):
        GaussianMixture.load(rewrite("sum.npz", weights=np.full(3, 0.5)))
    with pytest.raises(ValueError, match="means of component 1 exceed 2e"):
        GaussianMixture.load(rewrite("big.npz", means=g.means_ * np.array([[1.0], [1e300], [1.0]])))
    for field, value in (("n_iter_", -1), ("n_iter_", 2.5), ("converged_", 1), ("lower_bound_", None)):
        with pytest.raises(ValueError, match=rf"\['{field}'\] have the wrong type"):
            fitted = json.loads(np.load(path)["header"].tobytes().decode())["fitted"] | {field: value}
            GaussianMixture.load(rewrite("fitted.npz", header={"fitted": fitted}))
    with pytest.raises(ValueError, match="n_components"):
        GaussianMixture.load(rewrite("param.npz", header={"params": dict(g.get_params(), n_components=0)}))
    gf = fit_quietly(GaussianMixture(2, covariance_type="full", **FAST), data[0][:300, :4])
    gf.save(tmp_path / "full.npz")
    cov = gf.covariances_.copy()
    cov[1] = -np.eye(4)
    with pytest.raises(ValueError, match="covariance of component 1 is not positive definite"):
        GaussianMixture.load(rewrite_gmm_file(tmp_path / "full.npz", tmp_path / "pd.npz", covariances=cov))
    np.save(tmp_path / "plain.npy", np.zeros(3))
    with pytest.raises(ValueError, match="plain.npy: not a readable"):
        GaussianMixture.load(tmp_path / "plain.npy")
    with zipfile.ZipFile(path) as z:
        assert all(not name.endswith(".pkl") for name in z.namelist())


# ---------------------------------------------------------------- command line
def test_cli_fit_prints_a_summary(capsys, tmp_path):
    assert main(["fit", "-k", "8", "--max-iter", "5", "-v", "0", "--save", str(tmp_path / "m.npz")]) == 0
    out = capsys.readouterr().out
    assert "10000 x 128 (uint8)" in out and "held-out log-lik / sample" in out
    assert GaussianMixture.load(tmp_path / "m.npz").n_components == 8


def test_float32_variance_floor_keeps_log_densities_exact_on_raw_data():
    """Raw integer rows clamped at 0 make components collapse on some features (every row
    equal there); at reg_covar=1e-6 float32 log-densities of such a model are off by tens of
    nats. The float32 fit floors variances relative to the data's scale, so its float32 and
    float64 scores of held-out rows agree to round-off."""
    gen = torch.Generator().manual_seed(0)
    centres = torch.rand(8, 16, generator=gen) * 40          # near 0: many rows clamp there
    label = torch.randint(8, (12000,), generator=gen)
    x = (centres[label] + torch.randn(12000, 16, generator=gen) * 20).round().clamp(0, 255).to(torch.uint8).numpy()
    gmm = GaussianMixture(48, covariance_type="diag", max_iter=10, tol=0, device="cpu", random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gmm.fit(x[:10000])
    float32 = gmm.score_samples(x[10000:])
    float64 = gmm.set_params(compute_dtype="float64").score_samples(x[10000:])
    assert np.abs(float32 - float64).max() < 0.05
    assert gmm.covariances_.min() > 1e-3, "no component hit the floor: the test does not exercise it"
    # The same fit without the floor (scikit-learn's model) collapses below it: how far (1e-6 to
    # 1e-4 of the data's variance ~400) depends on the CPU's float32 rounding along the EM path.
    gmm.set_params(compute_dtype="float32", variance_floor=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gmm.fit(x[:10000])
    assert gmm.covariances_.min() < 1e-3
    for bad in ("none", -1.0, float("nan")):
        with pytest.raises(ValueError, match="variance_floor"):
            GaussianMixture(2, variance_floor=bad).fit(x[:100])


def test_log_prob_blocks_stay_small_for_large_k(monkeypatch):
    """iter_weighted_log_prob splits chunk_size blocks by memory; predict and score reduce as
    they go: neither holds a (chunk_size, K) matrix."""
    import flashgmm_ivf.mixture as mixture
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 5)).astype(np.float32)
    gmm = GaussianMixture(40, max_iter=2, device="cpu", random_state=0, chunk_size=512)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gmm.fit(x)
    full = np.concatenate([b.numpy() for _, b in gmm.iter_weighted_log_prob(x)])
    monkeypatch.setattr(mixture, "LOG_PROB_BLOCK_BYTES", 8 * 40 * 70)  # 70 rows a block
    blocks = list(gmm.iter_weighted_log_prob(x))
    assert [len(b) for _, b in blocks] == [70] * 7 + [22] + [70, 18]
    assert [o for o, _ in blocks][:2] == [0, 70] and blocks[-2][0] == 512
    np.testing.assert_array_equal(np.concatenate([b.numpy() for _, b in blocks]), full)
    np.testing.assert_array_equal(gmm.predict(x), full.argmax(1))
