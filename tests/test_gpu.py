"""Compiled Triton kernels and the CUDA estimator path (run with ``pytest -m gpu`` on a GPU)."""
import warnings

import numpy as np
import pytest
import torch

from flashgmm_ivf import GaussianMixture, kernels
from flashgmm_ivf._chunks import ChunkSource
from flashgmm_ivf._graph import GraphedStep
from flashgmm_ivf._mstep import EMState
from flashgmm_ivf.kernels import candidate_resp
from test_kernels import make_rows, random_mixture, relative_error

pytestmark = pytest.mark.gpu
# Statistics' relative error per precision (measured: ieee ~1e-6, tf32x3 ~1e-6, bf16x3 ~2e-5, tf32 ~1e-3;
# the opt-in one-product bf16 ~6e-3 on SIFT-like rows, eval/results/bench_estep_spherical_h100.json).
TOLERANCE = {"ieee": 1e-5, "tf32x3": 1e-5, "bf16x3": 1e-4, "tf32": 2e-2, "bf16": 5e-2, "candidates": 1e-5}


@pytest.mark.parametrize("precision", sorted(TOLERANCE))
@pytest.mark.parametrize("diagonal", [True, False], ids=["diag", "spherical"])
@pytest.mark.parametrize("n,d,k", [(1, 1, 1), (1000, 37, 19), (5003, 129, 257), (777, 1030, 33)])
def test_compiled_estep_matches_float64(precision, diagonal, n, d, k, poisoned_empty):
    gen = torch.Generator().manual_seed(n + d + k)
    x = make_rows(n, d, "raw", gen)
    params, shift = random_mixture(x, k, diagonal, gen)
    ref = kernels.reference.estep(x.double(), params, shift)
    # What float32 arithmetic itself can reach here (at D ~ 1000 with flat posteriors it is
    # ~1e-5): float32-class precisions must stay within 1e-5 or within twice that floor.
    floor = kernels.reference.estep(x.double(), params, shift, dtype=torch.float32)
    got = kernels.estep(x.cuda(), params.to("cuda"), shift.cuda(), precision=precision)
    for name, g, r, f in zip(ref._fields, got, ref, floor):
        assert torch.isfinite(g).all(), name
        tolerance = TOLERANCE[precision]
        if precision in ("ieee", "tf32x3", "candidates"):
            tolerance = max(tolerance, 2 * relative_error(f, r))
        assert relative_error(g, r) < tolerance, (name, relative_error(g, r), relative_error(f, r))


def test_compiled_estep_is_deterministic():
    gen = torch.Generator().manual_seed(0)
    x = make_rows(20000, 64, "raw", gen).cuda()
    params, shift = random_mixture(x.cpu(), 300, True, gen)
    a = kernels.estep(x, params.to("cuda"), shift.cuda())
    b = kernels.estep(x, params.to("cuda"), shift.cuda())
    for g, h in zip(a, b):
        assert torch.equal(g, h)


@pytest.mark.parametrize("precision", ["auto", "bf16x3"])
@pytest.mark.parametrize("covariance_type", ["diag", "spherical"])
def test_cuda_fit_tracks_cpu_float64(covariance_type, precision):
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(20000, 48)) * 20 + 100).clip(0, 255).round().astype(np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = GaussianMixture(16, covariance_type=covariance_type, max_iter=2, random_state=0,
                                device="cpu", compute_dtype="float64").fit(x)
        init = dict(weights_init=start.weights_, means_init=start.means_, precisions_init=start.precisions_,
                    covariance_type=covariance_type, max_iter=10, tol=0.0)
        cpu = GaussianMixture(16, device="cpu", compute_dtype="float64", **init).fit(x)
        gpu = GaussianMixture(16, device="cuda", precision=precision, **init).fit(x)
    assert abs(gpu.lower_bound_ - cpu.lower_bound_) <= 1e-6 * abs(cpu.lower_bound_)
    np.testing.assert_allclose(gpu.means_, cpu.means_, atol=1e-2)
    # Two fits a float32 round-off apart may label a near-tie row differently (one row in 2,000
    # with 'candidates'), but only a near-tie: under the float64 model, both labels' log-posteriors
    # lie within 1e-3 nats of each other.
    ours, exact = gpu.predict(x[:2000]), cpu.predict(x[:2000])
    differ = np.flatnonzero(ours != exact)
    assert len(differ) <= 2, differ
    if len(differ):
        log_resp = np.log(cpu.predict_proba(x[:2000][differ]))
        rows = np.arange(len(differ))
        assert np.all(log_resp[rows, exact[differ]] - log_resp[rows, ours[differ]] < 1e-3), differ


def _raw_rows_cuda(n, d, seed):
    rng = np.random.default_rng(seed)
    return torch.as_tensor((rng.normal(size=(n, d)) * 20 + 100).clip(0, 255).round().astype(np.float32)).cuda()


@pytest.mark.parametrize("covariance_type", ["diag", "spherical"])
def test_graphed_fit_equals_eager_fit(covariance_type, monkeypatch):
    x = _raw_rows_cuda(30000, 40, 1)
    params = dict(covariance_type=covariance_type, max_iter=6, tol=0.0, random_state=0, n_init=2)
    captures = []
    capture = GraphedStep._capture
    monkeypatch.setattr(GraphedStep, "_capture", lambda self, inputs: captures.append(1) or capture(self, inputs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graphed = GaussianMixture(24, **params).fit(x)
        # One capture, and one more once the rows are grouped (``_group_rows``): they serve both
        # initialisations.
        assert captures == [1, 1]
        monkeypatch.setattr(GaussianMixture, "_graphable", lambda *args: False)
        eager = GaussianMixture(24, **params).fit(x)
    assert captures == [1, 1]
    np.testing.assert_allclose(graphed.lower_bounds_, eager.lower_bounds_, rtol=1e-12)
    np.testing.assert_allclose(graphed.means_, eager.means_, rtol=1e-10)
    np.testing.assert_allclose(graphed.covariances_, eager.covariances_, rtol=1e-10)


def test_queued_iteration_is_dropped_where_em_stops(monkeypatch):
    """A replayed iteration queues the next one before reading its numbers (``_em_iteration``): where EM
    converges the queued one is dropped, so the fit is the eager one, iteration for iteration."""
    x = _raw_rows_cuda(30000, 40, 3)
    params = dict(covariance_type="diag", max_iter=50, tol=1e-2, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graphed = GaussianMixture(24, **params).fit(x)
        monkeypatch.setattr(GaussianMixture, "_graphable", lambda *args: False)
        eager = GaussianMixture(24, **params).fit(x)
    assert graphed.converged_ and eager.converged_
    assert graphed.n_iter_ == eager.n_iter_ < params["max_iter"]
    np.testing.assert_allclose(graphed.lower_bounds_, eager.lower_bounds_, rtol=1e-12)
    np.testing.assert_allclose(graphed.means_, eager.means_, rtol=1e-10)
    np.testing.assert_allclose(graphed.covariances_, eager.covariances_, rtol=1e-10)


@pytest.mark.parametrize("covariance_type", ["diag", "spherical"])
def test_grouped_rows_fit_the_model_of_the_given_order(covariance_type, monkeypatch):
    """After the first 'candidates' E-step the fit reorders its own copy of the rows by best
    component and captures its iteration again (its exact pass then walks the grouped rows'
    shared components): the model is the one of the rows in their given order (to the rounding
    of sums), and the caller's tensor is left as it was."""
    from flashgmm_ivf import mixture as mixture_module
    x = _raw_rows_cuda(30000, 40, 4)  # byte-valued floats: the fit holds a byte copy of its own
    given = x.clone()
    orders, graphs, walks = [], [], set()
    permute = ChunkSource.permute_rows_
    monkeypatch.setattr(ChunkSource, "permute_rows_",
                        lambda self, offset, order: orders.append(order.clone()) or permute(self, offset, order))
    real_graph = mixture_module.GraphedStep
    monkeypatch.setattr(mixture_module, "GraphedStep", lambda fn: graphs.append(real_graph(fn)) or graphs[-1])
    real_walk = candidate_resp.walk
    monkeypatch.setattr(candidate_resp, "walk", lambda *a: walks.add(a[2]) or real_walk(*a))
    params = dict(covariance_type=covariance_type, max_iter=8, tol=0.0, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        grouped = GaussianMixture(24, **params).fit(x)
        assert torch.equal(x, given)
        assert len(orders) == 1 and not torch.equal(orders[0], torch.arange(len(x), device="cuda"))
        assert len(graphs) == 2 and walks == {False, True}
        monkeypatch.setattr(GaussianMixture, "_group_rows", lambda self, source: None)
        plain = GaussianMixture(24, **params).fit(x)
    assert len(orders) == 1
    np.testing.assert_allclose(grouped.lower_bounds_, plain.lower_bounds_, rtol=1e-10)
    np.testing.assert_allclose(grouped.means_, plain.means_, rtol=1e-8)
    np.testing.assert_allclose(grouped.covariances_, plain.covariances_, rtol=1e-7)
    np.testing.assert_array_equal(grouped.predict(x), plain.predict(x))


def test_graphed_iteration_reseeds_like_eager(monkeypatch):
    """A replayed iteration re-seeds an emptied component as the eager one does (masks, no host read)."""
    x = _raw_rows_cuda(20000, 16, 2)
    gmm = GaussianMixture(8, covariance_type="diag", random_state=0)
    gmm._check_parameters()
    gmm._hints = {}  # as fit starts it: the 'candidates' E-step's per-block hints
    source = ChunkSource(x, gmm.chunk_size)
    n, device = source.validate(), torch.device("cuda")
    source = source.as_checked()
    state = gmm._initialize(source, np.random.default_rng(0), device)
    means = state.means.clone()
    means[3] += 1e4  # nothing near it: N_3 = 0 after the E-step
    far = EMState(state.weights, means, state.cov, state.prec_chol, state.shift)
    assert gmm._graphable(source, device)
    graphed = gmm._em_iteration(source, device, n, reseed=True)
    graphed(state)  # eager run and capture
    got_state, got_ll, got_reseeded = graphed(far)  # replay
    monkeypatch.setattr(GaussianMixture, "_graphable", lambda *args: False)
    want_state, want_ll, want_reseeded = gmm._em_iteration(source, device, n, reseed=True)(far)
    assert int(got_reseeded) == int(want_reseeded) == 1
    assert float(got_ll) == pytest.approx(float(want_ll), rel=1e-12)
    for got, want in zip(got_state, want_state):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    # The re-seeded mean is a data row (the worst-explained one), not the far-away start.
    seeded = got_state.means[3] + got_state.shift
    assert torch.isclose(x.double(), seeded).all(1).any()


def test_uncapturable_step_warns_and_runs_eagerly():
    def step(t):
        return (t + float(t.sum()),)  # float() reads the GPU back: not capturable

    run = GraphedStep(step)
    x = torch.ones(4, device="cuda")
    with pytest.warns(RuntimeWarning, match="CUDA graph"):
        first = run(x)
    second = run(2 * x)
    assert first[0].tolist() == [5.0] * 4 and second[0].tolist() == [10.0] * 4
    # The device is usable after the failed capture: a capturable step still captures and replays.
    again = GraphedStep(lambda t: (t * 3,))
    again(x)
    assert again(2 * x)[0].tolist() == [6.0] * 4


@pytest.mark.parametrize("cache_data", ["auto", False])
def test_fit_of_a_cuda_tensor_captures_without_warnings(cache_data):
    """cache_data=False leaves a CUDA tensor unchecked (every pass tests it for NaN, a host
    read): that fit runs eagerly rather than attempting a capture that would fail."""
    x = _raw_rows_cuda(5000, 8, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got = GaussianMixture(4, max_iter=4, tol=0.0, random_state=0, cache_data=cache_data).fit(x)
    assert got.n_iter_ == 4 and np.isfinite(got.lower_bounds_).all()
