"""Triton truncated E-step (``truncated_select`` + ``truncated_stats``) against the torch path.

Without a GPU the kernels run in Triton's interpreter (see conftest); the same tests run
compiled on a GPU. Shapes are not multiples of any block, inputs are raw-scale (0..255),
and every output is poisoned (NaN / -7) before the kernels write it.
"""
import warnings

import numpy as np
import pytest
import torch
import triton
from flashgmm_ivf.kernels import truncated
from test_kernels import make_rows, random_mixture, relative_error

from flashgmm_ivf import GaussianMixture, kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (n rows, D features, K components, C' kept, G neighbours)
SHAPES = [
    (1, 1, 1, 1, 0),
    (37, 5, 3, 3, 2),          # C' = K
    (203, 37, 19, 4, 3),
    (61, 70, 50, 5, 7),        # several D tiles, search space 40 of 64 slots
    (45, 129, 11, 2, 10),      # G = K - 1: the whole mixture is searched
    (33, 40, 30, 8, 12),       # the defaults' C' and G: 104 of 128 slots, one row per program
]
# Measured: log Z and statistics agree with the float32 torch path to ~1e-6 relative.
TOLERANCE = 1e-5


def problem(n, d, k, c, g, diagonal, seed=0):
    """Raw-scale rows, a mixture around them (float32) and candidate sets with repeats."""
    gen = torch.Generator().manual_seed(seed + n + d + k)
    x = make_rows(n, d, "raw", gen)
    params, shift = random_mixture(x, k, diagonal, gen)
    candidates = torch.randint(k, (n, c), generator=gen)
    graph = torch.randint(k, (k, g), generator=gen)
    return x, params.to(dtype=torch.float32), shift, candidates, graph


def run(backend, x, params, shift, candidates, graph, dtype=torch.float32):
    device = DEVICE if backend == "triton" else "cpu"
    result, new = truncated.estep(x.to(device), params.to(device), shift.to(device), candidates.to(device),
                                  graph.to(device), dtype=dtype, backend=backend)
    return type(result)(*(t.cpu() for t in result)), new.cpu()


def assert_close(got, ref, tolerance=TOLERANCE):
    for name, g, r in zip(ref._fields, got, ref):
        assert torch.isfinite(g).all(), name
        assert relative_error(g, r) < tolerance, (name, relative_error(g, r))


@pytest.mark.parametrize("n,d,k,c,g", SHAPES)
@pytest.mark.parametrize("diagonal", [True, False], ids=["diag", "spherical"])
def test_kernels_match_the_torch_path(n, d, k, c, g, diagonal, poisoned_empty):
    x, params, shift, candidates, graph = problem(n, d, k, c, g, diagonal)
    ref, ref_new = run("torch", x, params, shift, candidates, graph)
    got, new = run("triton", x, params, shift, candidates, graph)
    assert_close(got, ref)
    assert new.dtype == torch.int64 and new.shape == (n, c)
    # Rows whose search space holds C' distinct components keep the same ones in the same
    # order; elsewhere the padding (responsibility 0) is arbitrary in torch.topk.
    _, fresh = truncated.search_space(candidates, graph)
    full = fresh.sum(1) >= c
    assert torch.equal(new[full], ref_new[full])
    assert got.nk.sum().item() == pytest.approx(n, rel=1e-6)


@pytest.mark.parametrize("diagonal", [True, False], ids=["diag", "spherical"])
def test_all_components_kept_equal_the_dense_estep(diagonal, poisoned_empty):
    n, d, k = 77, 19, 9
    x, params, shift, _, _ = problem(n, d, k, k, 0, diagonal, seed=5)
    gen = torch.Generator().manual_seed(6)
    every = torch.stack([torch.randperm(k, generator=gen) for _ in range(n)])
    dense = kernels.reference.estep(x.double(), params.to(dtype=torch.float64), shift)
    got, new = run("triton", x, params, shift, every, torch.empty(k, 0, dtype=torch.int64))
    assert_close(got, dense)
    assert torch.equal(new.sort(1).values, torch.arange(k).expand(n, k))


def test_repeated_entries_count_once(poisoned_empty):
    # A search space full of repeats: each component is kept once, as the torch path does.
    n, d, k, c = 50, 6, 8, 4
    x, params, shift, _, _ = problem(n, d, k, c, 0, True, seed=7)
    candidates = torch.tensor([[0, 0, 1, 1]]).repeat(n, 1)
    graph = torch.tensor([[2, 2, 3]] * k)
    ref, ref_new = run("torch", x, params, shift, candidates, graph)
    got, new = run("triton", x, params, shift, candidates, graph)
    assert_close(got, ref)
    assert torch.equal(new, ref_new)
    assert torch.equal(new.sort(1).values, torch.arange(4).expand(n, 4))


@pytest.mark.parametrize("diagonal", [True, False], ids=["diag", "spherical"])
def test_pair_stats_spread_long_segments_over_pieces(diagonal, poisoned_empty, monkeypatch):
    # One component owns most triples (skewed posteriors), another none, a third exactly one
    # piece's worth: its pieces' partial sums must add up to the float64 sums of every triple.
    from flashgmm_ivf.kernels import truncated_stats
    monkeypatch.setattr(truncated_stats, "PIECE", 16)
    n, d, k = 150, 70, 6
    gen = torch.Generator().manual_seed(11)
    x = make_rows(n, d, "raw", gen)
    shift = x.float().mean(0)
    comps = torch.cat([torch.zeros(173, dtype=torch.int32), torch.full((16,), 2, dtype=torch.int32),
                       torch.randint(3, k, (40,), generator=gen, dtype=torch.int32)])
    comps = comps[torch.randperm(len(comps), generator=gen)]
    rows = torch.randint(n, (len(comps),), generator=gen, dtype=torch.int32)
    resp = torch.rand(len(comps), generator=gen)
    got = truncated_stats.pair_stats(*(t.to(DEVICE) for t in (x, shift, rows, comps, resp)), k, diagonal)
    centred = (x.float() - shift).double()  # the kernel centres in float32, then widens
    r = resp.double()[:, None]
    idx = comps.long()
    nk = torch.zeros(k, dtype=torch.float64).index_add_(0, idx, resp.double())
    s1 = torch.zeros(k, d, dtype=torch.float64).index_add_(0, idx, r * centred[rows.long()])
    sq = r * centred[rows.long()] ** 2
    s2 = torch.zeros(k, d, dtype=torch.float64).index_add_(0, idx, sq)
    for name, g, ref in zip(("nk", "s1", "s2"), got, (nk, s1, s2 if diagonal else s2.sum(1))):
        assert torch.isfinite(g).all(), name
        np.testing.assert_allclose(g.cpu().numpy(), ref.numpy(), rtol=1e-12, atol=1e-9, err_msg=name)
    assert got[0][1].item() == 0.0 and not got[1][1].any()
    # Triples of component K stand for none, whatever their rows and responsibilities: 50 of them,
    # over three pieces, change nothing.
    skipped = torch.full((50,), k, dtype=torch.int32)
    spaced = [torch.cat([t, pad]) for t, pad in ((rows, rows[:50]), (comps, skipped), (resp, resp[:50] + 1))]
    again = truncated_stats.pair_stats(*(t.to(DEVICE) for t in (x, shift, *spaced)), k, diagonal)
    for name, g, a in zip(("nk", "s1", "s2"), got, again):
        assert torch.equal(g, a), name


def test_piece_layout_finds_every_segment_of_many_sorted_keys():
    """The layout's searches (several steps of FANOUT probes) give each component's segment start and
    piece count as a sorted search does: runs of every length, absent components, component K's run."""
    from flashgmm_ivf.kernels import truncated_stats
    gen = torch.Generator().manual_seed(5)
    k, piece = 300, 16
    lengths = torch.randint(0, 40, (k + 1,), generator=gen)
    lengths[::7] = 0  # absent components
    lengths[5] = 3 * piece  # exactly three pieces
    keys = torch.repeat_interleave(torch.arange(k + 1, dtype=torch.int16), lengths)
    assert truncated_stats._steps(len(keys)) >= 3
    start = torch.empty(k + 2, dtype=torch.int64, device=DEVICE)
    counts = torch.empty(k + 2, dtype=torch.int64, device=DEVICE)
    truncated_stats.piece_layout_kernel[(triton.cdiv(k + 2, 64),)](
        keys.to(DEVICE), len(keys), start, counts, k, truncated_stats._steps(len(keys)), PIECE=piece, BLOCK=64,
        FANOUT=truncated_stats.FANOUT)
    start, counts = start.cpu(), counts.cpu()
    want = torch.searchsorted(keys.long(), torch.arange(k + 2))
    assert torch.equal(start, want)
    pieces = ((lengths[:k] + piece - 1) // piece).clamp_min(1)
    none = torch.zeros(1, dtype=torch.int64)
    assert torch.equal(counts, torch.cat([none, pieces, none]))


def test_rows_in_any_order_and_uint8_equal_float32_input():
    x, params, shift, candidates, graph = problem(64, 10, 12, 3, 4, True, seed=8)
    got, new = run("triton", x, params, shift, candidates, graph)
    as_float, _ = run("triton", x.float(), params, shift, candidates, graph)
    for g, h in zip(got, as_float):
        assert torch.equal(g, h)
    flip = torch.arange(63, -1, -1)
    flipped, flipped_new = run("triton", x[flip], params, shift, candidates[flip], graph)
    assert torch.equal(flipped.log_norm, got.log_norm[flip]) and torch.equal(flipped_new, new[flip])
    np.testing.assert_allclose(flipped.s1.numpy(), got.s1.numpy(), rtol=1e-12)


def test_empty_block():
    x, params, shift, candidates, graph = problem(8, 3, 5, 2, 1, False)
    got, new = run("triton", x[:0], params, shift, candidates[:0], graph)
    assert got.log_norm.shape == (0,) and new.shape == (0, 2) and got.s2.shape == (5,)
    assert not got.nk.any() and not got.s1.any()


def test_backend_is_checked():
    x, params, shift, candidates, graph = problem(8, 3, 5, 2, 1, True)
    with pytest.raises(ValueError, match="backend must be"):
        truncated.estep(x, params, shift, candidates, graph, backend="numpy")


# ---------------------------------------------------------------- compiled only
@pytest.mark.gpu
def test_cuda_dispatches_to_triton_and_is_deterministic(monkeypatch):
    x, params, shift, candidates, graph = problem(30000, 128, 2048, 8, 12, True, seed=9)
    calls = []
    real = truncated.select
    monkeypatch.setattr(truncated, "select", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    a, new_a = truncated.estep(x.cuda(), params.to("cuda"), shift.cuda(), candidates, graph, dtype=torch.float32)
    b, new_b = truncated.estep(x.cuda(), params.to("cuda"), shift.cuda(), candidates, graph, dtype=torch.float32)
    assert len(calls) == 2
    for g, h in zip(a, b):
        assert torch.equal(g, h)
    assert torch.equal(new_a, new_b)
    ref, _ = run("torch", x, params, shift, candidates, graph, dtype=torch.float64)
    assert_close(a, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("covariance_type", ["diag", "spherical"])
def test_cuda_truncated_fit_tracks_cpu_float64(covariance_type):
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(20000, 48)) * 20 + 100).clip(0, 255).round().astype(np.uint8)
    kw = dict(covariance_type=covariance_type, estep="truncated", n_candidates=4, n_neighbors=6, tol=0.0,
              random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = GaussianMixture(64, max_iter=2, device="cpu", compute_dtype="float64", **kw).fit(x)
        init = dict(weights_init=start.weights_, means_init=start.means_, precisions_init=start.precisions_,
                    max_iter=8, **kw)
        cpu = GaussianMixture(64, device="cpu", compute_dtype="float64", **init).fit(x)
        gpu = GaussianMixture(64, device="cuda", **init).fit(x)
    np.testing.assert_allclose(gpu.lower_bounds_, cpu.lower_bounds_, rtol=1e-5)
    assert np.all(np.diff(gpu.lower_bounds_) >= -1e-6 * np.abs(gpu.lower_bounds_[1:]))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_refined_graph_keeps_an_exact_graph_and_improves_a_random_one(backend):
    gen = torch.Generator().manual_seed(3)
    means = make_rows(300, 9, "raw", gen).float()  # raw scale: the distances are taken about the centroid
    exact = truncated.exact_graph(means, 6, shortlist=False)
    device = DEVICE if backend == "triton" else "cpu"

    def refine(graph):
        out = truncated.refine_graph(means.to(device), graph.to(device), backend=backend).cpu()
        assert out.shape == (300, 6) and out.dtype == torch.int64
        assert not (out == torch.arange(300)[:, None]).any() and ((out >= 0) & (out < 300)).all()
        return out

    assert torch.equal(refine(exact).sort(1).values, exact.sort(1).values)
    # From a random graph every row's neighbours can only come closer: the old ones are
    # part of the search space.
    start = (torch.arange(300)[:, None] + torch.randint(1, 300, (300, 6), generator=gen)) % 300
    refined = refine(start)
    dist = lambda g: ((means[g] - means[:, None]) ** 2).sum(2).sort(1).values.double()
    assert (dist(refined) <= dist(start) * (1 + 1e-6)).all()
    hits = lambda g: sum(len(set(a) & set(b)) for a, b in zip(g.tolist(), exact.tolist()))
    assert hits(refine(refined)) > hits(refined) > hits(start)


def test_refine_graph_backend_is_checked():
    means = torch.randn(10, 3)
    with pytest.raises(ValueError, match="backend must be"):
        truncated.refine_graph(means, truncated.exact_graph(means, 2), backend="numpy")
