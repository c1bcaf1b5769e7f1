"""Truncated E-step: equals the dense one with all candidates, monotone bound, estimator option."""
import functools
import math
import warnings

import faiss
import numpy as np
import pytest
import torch

from conftest import shared_set
from flashgmm_ivf import ConvergenceWarning, GaussianMixture, index_factory, mixture
from flashgmm_ivf.kernels import natural_params, reference, truncated
from flashgmm_ivf.mixture import AUTO_TRUNCATED_MIN

F64 = dict(compute_dtype="float64", tol=0.0, random_state=0, device="cpu")


def fit_quietly(gmm, x, method="fit"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return getattr(gmm, method)(x)


def random_mixture(k, d, diagonal, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weights = torch.rand(k, generator=gen, dtype=torch.float64) + 0.1
    means = torch.randn(k, d, generator=gen, dtype=torch.float64) * 2
    shape = (k, d) if diagonal else (k,)
    variances = torch.rand(shape, generator=gen, dtype=torch.float64) + 0.3
    return natural_params(weights / weights.sum(), means, variances)


def full_graph(k):
    """Every other component as a neighbour."""
    return torch.stack([torch.cat([torch.arange(c), torch.arange(c + 1, k)]) for c in range(k)])


@pytest.fixture(scope="module")
def sift():
    return shared_set("sift-photos-128-small")[:2000]


# ---------------------------------------------------------------- the block function
@pytest.mark.parametrize("diagonal", [True, False], ids=["diag", "spherical"])
def test_all_candidates_equal_the_dense_estep(diagonal):
    k, d, n = 7, 3, 101                                 # odd shapes, several sub-blocks
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64) * 3 + 10
    params, shift = random_mixture(k, d, diagonal), torch.full((d,), 10.0, dtype=torch.float64)
    dense = reference.estep(x, params, shift)
    every = torch.stack([torch.randperm(k, generator=gen) for _ in range(n)])
    no_graph = torch.empty(k, 0, dtype=torch.int64)
    # C' = K, reached from the kept sets alone or from two of them and the graph
    for cand, graph in [(every, no_graph), (every[:, :2], full_graph(k))]:
        got, new = truncated.estep(x, params, shift, cand, graph, chunk_size=30)
        if cand.shape[1] == k:
            for ours, ref in zip(got, dense):
                np.testing.assert_allclose(ours.numpy(), ref.numpy(), rtol=1e-6, atol=1e-9)
            assert torch.equal(new.sort(1).values, torch.arange(k).expand(n, k))  # each component once
        assert got.nk.sum().item() == pytest.approx(n)
    # two kept of seven: a lower bound, with the best two found through the graph
    np.testing.assert_allclose(new.numpy(), reference.weighted_log_prob(x, params, shift).topk(2).indices.numpy())


@pytest.mark.parametrize("diagonal", [True, False], ids=["diag", "spherical"])
def test_truncated_log_norm_is_a_lower_bound_that_the_search_raises(diagonal):
    k, d, n, c = 40, 5, 300, 3
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64) * 2
    params = random_mixture(k, d, diagonal, seed=3)
    cand = torch.stack([torch.randperm(k, generator=gen)[:c] for _ in range(n)])
    graph = torch.randint(k, (k, 4), generator=gen)
    kept_only, _ = truncated.estep(x, params, None, cand, torch.empty(k, 0).long())
    searched, new = truncated.estep(x, params, None, cand, graph)
    exact = reference.estep(x, params, None).log_norm
    assert (kept_only.log_norm <= searched.log_norm + 1e-12).all()
    assert (searched.log_norm <= exact + 1e-12).all()
    again, _ = truncated.estep(x, params, None, new, torch.empty(k, 0).long())
    np.testing.assert_allclose(again.log_norm.numpy(), searched.log_norm.numpy(), rtol=1e-12)
    assert searched.nk.sum().item() == pytest.approx(n)


def test_mean_index_inverted_file_graph_and_search(monkeypatch):
    monkeypatch.setattr(truncated, "EXACT_SEARCH_MAX", 16)
    rng = np.random.default_rng(0)
    means = rng.normal(size=(300, 8)).astype(np.float32)
    index = truncated.MeanIndex(8, 300)
    assert isinstance(index.index, faiss.IndexIVFFlat)
    index.update(means)
    graph = index.graph(means, 5)
    assert graph.shape == (300, 5) and graph.min() >= 0 and graph.max() < 300
    exact = ((means[:, None] - means[None]) ** 2).sum(-1)
    np.fill_diagonal(exact, np.inf)
    # the nearest other mean is found for nearly all (inverted file: approximate)
    assert (graph[:, 0] == exact.argmin(1)).mean() > 0.9
    found = index.search(rng.normal(size=(50, 8)).astype(np.float32), 7)
    assert found.shape == (50, 7) and found.min() >= 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("n", "k", "count"), [(40, 128 * 300, 52), (9, 128 * 37, 5), (5, 4097, 8), (3, 200, 200)])
def test_smallest_columns_equal_topk(dtype, n, k, count):
    scores = torch.randn(n, k, generator=torch.Generator().manual_seed(k)).to(dtype)
    scores[0, :count + 3] = scores[0, 0]      # ties across the cut
    got = truncated._smallest_columns(scores, count)
    want = scores.topk(count, 1, largest=False).indices
    assert got.shape == (n, count) and int(got.min()) >= 0 and int(got.max()) < k
    assert torch.equal(scores.gather(1, got).sort(1).values, scores.gather(1, want).sort(1).values)
    assert all(len(set(row)) == count for row in got.tolist())


@pytest.mark.parametrize("shortlist", [False, True], ids=["float32", "float16-shortlist"])
def test_torch_search_matches_exact_faiss(shortlist):
    rng = np.random.default_rng(1)
    means = (rng.normal(size=(300, 8)) * 50 + 100).astype(np.float32)   # raw-scale offsets
    queries = (rng.normal(size=(500, 8)) * 50 + 100).astype(np.float32)
    exact = faiss.IndexFlatL2(8)
    exact.add(means)
    found = truncated.nearest_means(torch.from_numpy(queries), torch.from_numpy(means), 5, shortlist).numpy()
    assert (found == exact.search(queries, 5)[1]).mean() > 0.99
    index = truncated.MeanIndex(8, 300)
    index.update(means)
    graph = truncated.exact_graph(torch.from_numpy(means), 6, shortlist)
    assert graph.shape == (300, 6) and not (graph == torch.arange(300)[:, None]).any()
    assert (graph.numpy() == index.graph(means, 6)).mean() > 0.99
    assert truncated.exact_graph(torch.from_numpy(means), 0).shape == (300, 0)


@pytest.mark.parametrize("exact_max", [4096, 16], ids=["exact", "large-K order"])
def test_fit_with_torch_search(sift, monkeypatch, exact_max):
    # The GPU's search (exact torch products, rows ordered by best candidate), run on the CPU.
    monkeypatch.setattr(truncated, "EXACT_SEARCH_MAX", exact_max)
    kw = dict(estep="truncated", n_candidates=4, n_neighbors=6, max_iter=6, **F64)
    faiss_fit = fit_quietly(GaussianMixture(64, **kw), sift)
    monkeypatch.setattr(mixture, "TruncatedEStep", functools.partial(truncated.TruncatedEStep, search="torch"))
    torch_fit = fit_quietly(GaussianMixture(64, chunk_size=700, **kw), sift)
    bounds = np.array(torch_fit.lower_bounds_)
    assert np.all(np.diff(bounds) >= -1e-9 * np.abs(bounds[1:])) and torch_fit.n_reseeded_ == 0
    # Both searches are exact up to 4096 components; beyond, FAISS's inverted file is not.
    np.testing.assert_allclose(bounds, faiss_fit.lower_bounds_, rtol=1e-9 if exact_max == 4096 else 1e-3)


# ---------------------------------------------------------------- the estimator
@pytest.mark.parametrize("covariance_type", ["diag", "spherical"])
def test_estimator_with_all_candidates_equals_dense(sift, covariance_type):
    x = sift[:1500]
    common = dict(covariance_type=covariance_type, max_iter=6, **F64)
    dense = fit_quietly(GaussianMixture(9, estep="dense", **common), x)
    trunc = fit_quietly(GaussianMixture(9, estep="truncated", n_candidates=9, n_neighbors=8, **common), x)
    np.testing.assert_allclose(trunc.lower_bounds_, dense.lower_bounds_, rtol=1e-6)
    np.testing.assert_allclose(trunc.means_, dense.means_, atol=1e-6)
    np.testing.assert_allclose(trunc.covariances_, dense.covariances_, rtol=1e-6)


@pytest.mark.parametrize("covariance_type", ["diag", "spherical"])
def test_truncated_bound_never_decreases(sift, covariance_type):
    g = fit_quietly(GaussianMixture(24, covariance_type=covariance_type, estep="truncated", n_candidates=3,
                                    n_neighbors=4, max_iter=15, **F64), sift)
    bounds = np.array(g.lower_bounds_)
    assert g.n_reseeded_ == 0 and len(bounds) == 15
    assert np.all(np.diff(bounds) >= -1e-9 * np.abs(bounds[1:]))
    # the truncated free energy is below the exact log-likelihood of the same parameters
    dense = fit_quietly(GaussianMixture(24, covariance_type=covariance_type, estep="dense", max_iter=1,
                                        weights_init=g.weights_, means_init=g.means_,
                                        precisions_init=g.precisions_, **F64), sift)
    assert dense.lower_bound_ >= fit_quietly(
        GaussianMixture(24, covariance_type=covariance_type, estep="truncated", n_candidates=3, n_neighbors=4,
                        max_iter=1, weights_init=g.weights_, means_init=g.means_, precisions_init=g.precisions_,
                        **F64), sift).lower_bound_


def test_streaming_and_memmap_candidates_equal_in_memory(sift, monkeypatch):
    x = sift[:1700]
    kw = dict(estep="truncated", n_candidates=3, n_neighbors=4, max_iter=5, **F64)
    ref = fit_quietly(GaussianMixture(11, chunk_size=1000, **kw), x)
    streamed = fit_quietly(GaussianMixture(11, **kw), lambda: (x[i:i + 333] for i in range(0, len(x), 333)),
                           "fit_stream")
    monkeypatch.setattr(truncated, "IN_MEMORY_BYTES", 0)
    on_disk = GaussianMixture(11, chunk_size=777, **kw)
    seen = []
    real_block = truncated.TruncatedEStep.block
    monkeypatch.setattr(truncated.TruncatedEStep, "block",
                        lambda self, *a, **k: seen.append(type(self.candidates)) or real_block(self, *a, **k))
    fit_quietly(on_disk, x)
    assert set(seen) == {np.memmap}
    for g in (streamed, on_disk):
        np.testing.assert_allclose(g.lower_bounds_, ref.lower_bounds_, rtol=1e-10)
        np.testing.assert_allclose(g.means_, ref.means_, atol=1e-8)


def test_inverted_file_path_fits(sift, monkeypatch):
    monkeypatch.setattr(truncated, "EXACT_SEARCH_MAX", 16)
    g = fit_quietly(GaussianMixture(64, estep="truncated", n_candidates=4, n_neighbors=6, max_iter=6, **F64), sift)
    bounds = np.array(g.lower_bounds_)
    assert np.all(np.diff(bounds) >= -1e-9 * np.abs(bounds[1:])) and g.n_reseeded_ == 0


def test_empty_component_is_reseeded_as_the_dense_path_does(sift):
    x = sift[:1000].astype(np.float64)
    means = x[:3].copy()
    means[2] = 1e4  # far from every row: no responsibility
    kw = dict(means_init=means, max_iter=6, **F64)
    dense = fit_quietly(GaussianMixture(3, estep="dense", **kw), x)
    every = fit_quietly(GaussianMixture(3, estep="truncated", n_candidates=3, n_neighbors=2, **kw), x)
    assert dense.n_reseeded_ >= 1 and every.n_reseeded_ == dense.n_reseeded_
    np.testing.assert_allclose(every.lower_bounds_, dense.lower_bounds_, rtol=1e-9)
    np.testing.assert_allclose(every.weights_, dense.weights_, rtol=1e-9)
    few = fit_quietly(GaussianMixture(3, estep="truncated", n_candidates=2, n_neighbors=1, **kw), x)
    assert few.n_reseeded_ >= 1
    assert np.isfinite(few.means_).all() and np.isfinite(few.covariances_).all()
    # the re-seeded component keeps (at least) its seed row: it joined that row's candidates
    assert np.abs(few.means_).max() < 300 and few.weights_.min() > 0.9 / len(x)


def test_search_option_is_checked():
    with pytest.raises(ValueError, match="search must be"):
        truncated.TruncatedEStep(10, 6, 2, 3, 2, search="gpu")


def test_plant_puts_components_on_the_worst_rows():
    store = truncated.TruncatedEStep(10, 6, 2, 3, 2)
    store.candidates[:] = 0
    store.worst_rows = torch.tensor([7, 2, 5])
    store.plant(torch.tensor([4, 5]))
    assert store.candidates[7, -1] == 4 and store.candidates[2, -1] == 5 and store.candidates[5, -1] == 0


def test_collapsed_components_match_dense():
    # few distinct rows: components collapse onto single points (variance at the floor)
    rng = np.random.default_rng(0)
    x = np.repeat(rng.normal(size=(6, 4)) * 5, 40, axis=0)
    kw = dict(means_init=x[::40][:5], max_iter=4, reg_covar=1e-3, **F64)
    dense = fit_quietly(GaussianMixture(5, estep="dense", **kw), x)
    trunc = fit_quietly(GaussianMixture(5, estep="truncated", n_candidates=5, n_neighbors=4, **kw), x)
    np.testing.assert_allclose(trunc.lower_bounds_, dense.lower_bounds_, rtol=1e-6)
    assert trunc.n_reseeded_ == dense.n_reseeded_


@pytest.mark.parametrize("params,error,message", [
    (dict(estep="sparse"), ValueError, "estep must be one of"),
    (dict(n_candidates=0), ValueError, r"n_candidates must be an integer in \[1, inf\]"),
    (dict(n_neighbors=0), ValueError, r"n_neighbors must be an integer in \[1, inf\]"),
    (dict(n_candidates=2.5), TypeError, "n_candidates must be an integer"),
    (dict(estep="truncated", covariance_type="full"), ValueError, "not 'full'"),
])
def test_option_validation(sift, params, error, message):
    with pytest.raises(error, match=message):
        GaussianMixture(2, **params).fit(sift[:50])


def test_auto_picks_truncated_for_large_k_only():
    assert GaussianMixture(AUTO_TRUNCATED_MIN)._truncates()
    assert not GaussianMixture(AUTO_TRUNCATED_MIN - 1)._truncates()
    assert not GaussianMixture(AUTO_TRUNCATED_MIN, covariance_type="full")._truncates()
    assert GaussianMixture(8, estep="truncated")._truncates()
    assert GaussianMixture(8, n_candidates=20, n_neighbors=30).get_params()["n_neighbors"] == 30


def test_block_needs_the_row_offset():
    store = truncated.TruncatedEStep(5, 3, 2, 2, 1)
    store.begin_pass(torch.zeros(3, 2, dtype=torch.float64) + torch.arange(3.0)[:, None])
    with pytest.raises(ValueError, match="global row offset"):
        store.block(None, torch.zeros(5, 2), random_mixture(3, 2, True), None)


def test_index_factory_keyword_form_trains_a_truncated_gmm(sift):
    index = index_factory(128, "IVF16_GMM(diag,partition=gmm,iter=3),Flat", estep="truncated", n_candidates=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        index.train(sift[:1000].astype(np.float32))
    assert index.gmm.estep == "truncated" and index.gmm.means_.shape == (16, 128)


def test_factory_string_selects_the_truncated_estep():
    index = index_factory(8, "IVF16_GMM(diag,truncated,n_candidates=4),Flat")
    assert index.gmm_params == {"estep": "truncated", "n_candidates": 4}  # the GaussianMixture's, made at train
    with pytest.raises(ValueError, match="a bare option is a covariance type"):
        index_factory(8, "IVF16_GMM(diag,sparse),Flat")


@pytest.mark.parametrize("search", ["faiss", "torch"])
def test_graph_refined_between_rebuilds_and_reseeded_rows_searched_afresh(search, monkeypatch):
    gen = torch.Generator().manual_seed(5)
    means = torch.randn(200, 6, generator=gen, dtype=torch.float64) * 10 + 100
    store = truncated.TruncatedEStep(50, 200, 6, 3, 5, search=search)
    store.begin_pass(means)
    exact = lambda m: truncated.exact_graph(m.float(), 5, shortlist=False).sort(1).values
    assert torch.equal(store.graph.sort(1).values, exact(means))
    # Component 7 is re-seeded far away, next to 123, and the others drift a little.
    moved = means + torch.randn(200, 6, generator=gen, dtype=torch.float64) * 0.5
    moved[7] = moved[123] + 0.01
    store.worst_rows = torch.tensor([4])
    store.plant(torch.tensor([7]))
    assert store.candidates[4, -1] == 7
    refined = []
    monkeypatch.setattr(truncated, "refine_graph", lambda *a, _f=truncated.refine_graph: refined.append(1) or _f(*a))
    store.begin_pass(moved)
    graph = store.graph.sort(1).values
    assert refined and torch.equal(graph[7], exact(moved)[7]) and 123 in graph[7]
    kept = sum(len(set(a) & set(b)) for a, b in zip(graph.tolist(), exact(moved).tolist()))
    assert kept > 0.9 * graph.numel()
    for _ in range(truncated.REBUILD_EVERY - 1):
        store.begin_pass(moved)
    assert len(refined) == truncated.REBUILD_EVERY - 1  # the last pass rebuilt from scratch
    assert torch.equal(store.graph.sort(1).values, exact(moved))


def test_host_top_k_matches_torch_topk_with_ties_and_empty_slots():
    gen = torch.Generator().manual_seed(2)
    ll = torch.randn(500, 40, generator=gen) * 30 - 500
    ll[torch.rand(500, 40, generator=gen) < 0.4] = -math.inf
    ll[:20, 3:] = -math.inf           # fewer finite entries than k
    ll[20:40] = 1.0                   # every entry tied
    ll[40:60, :12] = ll[40:60, :1]    # ties at the k-th largest value
    values, where = truncated._top(ll, 8)
    assert torch.equal(values, torch.topk(ll, 8, dim=1).values)
    assert torch.equal(ll.gather(1, where), values)
    assert all(len(set(row)) == 8 for row in where.tolist())
