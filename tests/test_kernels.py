"""Triton E-step kernels against the float64 torch reference.

Without a GPU these run in Triton's interpreter (see conftest); the same tests run
compiled on a GPU. Shapes are chosen not to be multiples of any block size, and every
output is poisoned (NaN) before the kernels write it.
"""
import numpy as np
import pytest
import torch

from conftest import shared_set
from flashgmm_ivf import kernels
from flashgmm_ivf.kernels.estep import PARTIALS_BUDGET, default_split, fullest_waves_split

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (n rows, D features, K components, blocks (BLOCK_N, BLOCK_K, BLOCK_D))
SHAPES = [
    (1, 1, 1, (16, 16, 16)),
    (37, 5, 3, (16, 16, 16)),
    (203, 37, 19, (32, 16, 16)),
    (130, 129, 70, (64, 32, 64)),
    (45, 1030, 5, (16, 16, 128)),
]
# Measured relative errors of the statistics: ieee ~3e-6, bf16x3 ~2e-5 (real SIFT).
TOLERANCE = {"ieee": 1e-5, "bf16x3": 1e-4, "candidates": 2e-5}


def random_mixture(x, k, diagonal, gen):
    """A mixture around k rows of x, with variances on the data's scale, in natural form."""
    x64 = x.double()
    shift = x64.mean(0)
    means = x64[torch.randperm(x.shape[0], generator=gen)[:k] % x.shape[0]] - shift
    scale = x64.var(0, unbiased=False).mean().clamp_min(1e-3)
    shape = (k, x.shape[1]) if diagonal else (k,)
    variances = scale * (0.2 + torch.rand(shape, generator=gen, dtype=torch.float64))
    weights = torch.rand(k, generator=gen, dtype=torch.float64) + 0.1
    return kernels.natural_params(weights / weights.sum(), means, variances), shift


def make_rows(n, d, kind, gen):
    if kind == "raw":  # SIFT/MNIST-like: integers 0..255
        return torch.randint(0, 256, (n, d), generator=gen, dtype=torch.uint8)
    return torch.randn(n, d, generator=gen)


def configs(blocks):
    return kernels.LaunchConfig(*blocks), kernels.LaunchConfig(*blocks)


def relative_error(got, ref):
    return float((got.double().cpu() - ref.cpu()).norm() / ref.cpu().norm().clamp_min(1e-300))


@pytest.mark.parametrize("n,d,k,blocks", SHAPES)
@pytest.mark.parametrize("diagonal", [True, False], ids=["diag", "spherical"])
@pytest.mark.parametrize("kind", ["raw", "standardised"])
@pytest.mark.parametrize("precision", ["ieee", "bf16x3"])
def test_estep_matches_float64_reference(n, d, k, blocks, diagonal, kind, precision, poisoned_empty):
    gen = torch.Generator().manual_seed(n * 1000 + d + k)
    x = make_rows(n, d, kind, gen)
    params, shift = random_mixture(x, k, diagonal, gen)
    ref = kernels.reference.estep(x.double(), params, shift)
    got = kernels.estep(x.to(DEVICE), params.to(DEVICE), shift.to(DEVICE), precision=precision,
                        configs=configs(blocks), n_split=3)
    for name, g, r in zip(ref._fields, got, ref):
        assert g.shape == r.shape, name
        assert torch.isfinite(g).all(), f"{name} has unwritten (NaN) entries"
        assert relative_error(g, r) < TOLERANCE[precision], (name, relative_error(g, r))


@pytest.mark.parametrize("diagonal", [True, False], ids=["diag", "spherical"])
def test_single_bf16_product_is_loose_but_bounded(diagonal, poisoned_empty):
    """The opt-in one-product bf16 scheme: an honest ~1e-3, far from bf16x3's ~1e-5."""
    gen = torch.Generator().manual_seed(11)
    x = make_rows(203, 37, "raw", gen)
    params, shift = random_mixture(x, 19, diagonal, gen)
    ref = kernels.reference.estep(x.double(), params, shift)
    got = kernels.estep(x.to(DEVICE), params.to(DEVICE), shift.to(DEVICE), precision="bf16",
                        configs=configs((32, 16, 64)), n_split=3)
    errors = [relative_error(g, r) for g, r in zip(got[1:], ref[1:])]
    assert max(errors) < 3e-2 and min(errors) > TOLERANCE["bf16x3"], errors


@pytest.mark.parametrize("precision", ["ieee", "bf16x3", "candidates"])
def test_estep_on_real_sift_rows(precision, poisoned_empty):
    x = torch.from_numpy(shared_set("sift-photos-128-small")[:600])
    gen = torch.Generator().manual_seed(0)
    params, shift = random_mixture(x, 24, True, gen)
    ref = kernels.reference.estep(x.double(), params, shift)
    got = kernels.estep(x.to(DEVICE), params.to(DEVICE), shift.to(DEVICE), precision=precision)
    for name, g, r in zip(ref._fields, got, ref):
        assert relative_error(g, r) < TOLERANCE[precision], (name, relative_error(g, r))


@pytest.mark.parametrize("diagonal", [True, False], ids=["diag", "spherical"])
def test_log_norm_best_component_is_the_argmax(diagonal, poisoned_empty):
    gen = torch.Generator().manual_seed(3)
    x = make_rows(150, 21, "standardised", gen)
    params, shift = random_mixture(x, 40, diagonal, gen)
    ll = kernels.reference.weighted_log_prob(x.double(), params, shift)
    log_z, best = kernels.log_norm(x.to(DEVICE), params.to(DEVICE), shift.to(DEVICE), precision="ieee",
                                   config=kernels.LaunchConfig(32, 16, 16))
    assert torch.equal(best.cpu().long(), ll.argmax(1))
    assert relative_error(log_z, torch.logsumexp(ll, 1)) < 1e-6


def test_zero_weight_components_take_no_mass():
    gen = torch.Generator().manual_seed(4)
    x = make_rows(70, 9, "standardised", gen)
    params, shift = random_mixture(x, 35, True, gen)
    const = params.const.clone()
    const[:16] = -torch.inf  # a whole K tile with zero weight
    params = params._replace(const=const)
    got = kernels.estep(x.to(DEVICE), params.to(DEVICE), shift.to(DEVICE), precision="ieee", configs=configs((16, 16, 16)))
    assert torch.isfinite(got.log_norm).all()
    assert float(got.nk[:16].abs().max()) == 0.0
    assert abs(float(got.nk.sum()) - 70) < 1e-4


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float16, torch.float32, torch.float64, torch.int32])
def test_estep_accepts_input_dtypes_and_strides(dtype):
    gen = torch.Generator().manual_seed(5)
    wide = torch.randint(0, 200, (60, 40), generator=gen).to(dtype)
    x = wide[:, ::2]  # non-contiguous view
    params, shift = random_mixture(x.float(), 7, True, gen)
    ref = kernels.reference.estep(x.double(), params, shift)
    got = kernels.estep(x.to(DEVICE), params.to(DEVICE), shift.to(DEVICE), precision="ieee")
    assert relative_error(got.s1, ref.s1) < 1e-5


def test_empty_block_and_bad_arguments():
    gen = torch.Generator().manual_seed(6)
    x = make_rows(10, 4, "standardised", gen)
    params, shift = random_mixture(x, 3, False, gen)
    empty = kernels.estep(x[:0].to(DEVICE), params.to(DEVICE), shift.to(DEVICE))
    assert empty.log_norm.shape == (0,) and float(empty.nk.abs().sum()) == 0
    with pytest.raises(ValueError, match="precision must be one of"):
        kernels.estep(x, params, shift, precision="fp8")
    with pytest.raises(ValueError, match="x has 5 features but the parameters have 4"):
        kernels.estep(torch.zeros(3, 5), params, shift)
    with pytest.raises(ValueError, match="must be 2-D"):
        kernels.estep(torch.zeros(3), params, shift)


@pytest.mark.parametrize("covariance", ["diag", "spherical", "full"])
def test_reference_estep_equals_dense_numpy(covariance):
    """The chunked torch reference against a direct float64 numpy E-step on the full N x K matrix."""
    rng = np.random.default_rng(7)
    n, d, k = 97, 6, 5
    x = rng.normal(size=(n, d)) * 30 + 100
    means = x[rng.choice(n, k, replace=False)]
    weights = rng.dirichlet(np.ones(k))
    if covariance == "full":
        a = rng.normal(size=(k, d, d))
        covs = a @ a.transpose(0, 2, 1) * 50 + np.eye(d) * 100
    else:
        covs = rng.uniform(50, 500, size=(k, d) if covariance == "diag" else (k,))
    full_covs = covs if covariance == "full" else np.stack(
        [np.diag(c) if covariance == "diag" else np.eye(d) * c for c in covs])
    dens = np.stack([
        np.log(w) - 0.5 * (d * np.log(2 * np.pi) + np.linalg.slogdet(c)[1]
                           + np.einsum("nd,de,ne->n", x - m, np.linalg.inv(c), x - m))
        for w, m, c in zip(weights, means, full_covs)], axis=1)
    log_z = np.logaddexp.reduce(dens, axis=1)
    resp = np.exp(dens - log_z[:, None])
    shift = torch.from_numpy(x.mean(0))
    if covariance == "full":
        chol = np.linalg.cholesky(covs)
        prec_chol = np.linalg.inv(chol).transpose(0, 2, 1)
        params = kernels.CholeskyParams(torch.from_numpy(means) - shift, torch.from_numpy(prec_chol),
                                        torch.log(torch.from_numpy(weights)))
    else:
        params = kernels.natural_params(torch.from_numpy(weights), torch.from_numpy(means) - shift,
                                        torch.from_numpy(covs))
    got = kernels.reference.estep(torch.from_numpy(x), params, shift, chunk_size=10)
    xc = x - x.mean(0)
    np.testing.assert_allclose(got.log_norm.numpy(), log_z, rtol=1e-10)
    np.testing.assert_allclose(got.nk.numpy(), resp.sum(0), rtol=1e-9)
    np.testing.assert_allclose(got.s1.numpy(), resp.T @ xc, rtol=1e-8, atol=1e-8)
    s2 = {"diag": resp.T @ xc**2, "spherical": resp.T @ (xc**2).sum(1),
          "full": np.einsum("nk,nd,ne->kde", resp, xc, xc)}[covariance]
    np.testing.assert_allclose(got.s2.numpy(), s2, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("diagonal", [True, False], ids=["diag", "spherical"])
def test_one_feature_tile_and_several_agree(diagonal, poisoned_empty):
    """Rows loaded once (D <= BLOCK_D) and re-read per feature tile give the same statistics."""
    gen = torch.Generator().manual_seed(8)
    x = make_rows(90, 45, "raw", gen)
    params, shift = random_mixture(x, 37, diagonal, gen)
    ref = kernels.reference.estep(x.double(), params, shift)
    for block_d in (64, 16):
        config = kernels.LaunchConfig(32, 16, block_d)
        got = kernels.estep(x.to(DEVICE), params.to(DEVICE), shift.to(DEVICE), precision="bf16x3",
                            configs=(config, config), n_split=2)
        for name, g, r in zip(ref._fields, got, ref):
            assert relative_error(g, r) < TOLERANCE["bf16x3"], (block_d, name)


@pytest.mark.parametrize("rows_first", [False, True])
@pytest.mark.parametrize("diagonal", [True, False], ids=["diag", "spherical"])
@pytest.mark.parametrize("precision", ["ieee", "bf16x3"])
def test_responsibilities_sum_to_one(rows_first, diagonal, precision, poisoned_empty):
    """Pass 2 recomputes pass 1's log-densities with the same rounding, whichever way pass 1
    holds its tiles: every row's responsibilities sum to one, so sum_k N_k = n to float32
    round-off (a different D tiling missed by 1.5e-4 on an H100)."""
    gen = torch.Generator().manual_seed(10)
    n = 300
    x = make_rows(n, 61, "raw", gen)
    params, shift = random_mixture(x, 45, diagonal, gen)
    for block_d in (64, 16):
        first = kernels.LaunchConfig(32, 16, block_d, rows_first=rows_first)
        got = kernels.estep(x.to(DEVICE), params.to(DEVICE), shift.to(DEVICE), precision=precision,
                            configs=(first, kernels.LaunchConfig(16, 32, block_d)), n_split=2)
        assert abs(float(got.nk.sum()) - n) / n < 1e-6, (block_d, float(got.nk.sum()) - n)


def test_passes_must_tile_features_alike():
    gen = torch.Generator().manual_seed(9)
    x = make_rows(20, 40, "raw", gen)
    params, shift = random_mixture(x, 3, True, gen)
    with pytest.raises(ValueError, match="same block_d, got 16 and 32"):
        kernels.estep(x, params, shift, configs=(kernels.LaunchConfig(16, 16, 16), kernels.LaunchConfig(16, 16, 32)))


@pytest.mark.parametrize("programs,sms,cap,expected", [
    (8, 132, 66, 66),    # H100, K=1024 in 128-wide tiles: 528 programs, 4 (or 2) whole waves
    (8, 132, 35, 33),    # the memory cap forbids 66; 35 would leave a wave part-filled
    (32, 132, 17, 16),   # K=4096: 512 programs fill 97% of their waves, 544 only 69%
    (128, 132, 4, 4),
    (5, 7, 0, 1),        # a cap below one split still runs one
])
def test_row_splits_fill_their_waves(programs, sms, cap, expected):
    assert fullest_waves_split(programs, sms, cap) == expected


def test_default_split_keeps_partials_within_budget():
    config = kernels.LaunchConfig(64, 128, 128)
    for k, d, diagonal in [(1024, 128, True), (16384, 960, True), (16384, 960, False), (7, 3, False)]:
        splits = default_split(k, d, diagonal, config, torch.device("cpu"))
        partial_floats = k + k * d + (k * d if diagonal else k)
        assert splits >= 1
        assert splits == 1 or 4 * partial_floats * splits <= PARTIALS_BUDGET, (k, d, splits)
