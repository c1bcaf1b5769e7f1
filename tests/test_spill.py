"""Spilling rules (top2, SOAR, RAIR, SPANN closure) on tiny constructed and synthetic data."""
import faiss
import numpy as np
import pytest

from flashgmm_ivf.ivf.spill import (RULES, keep_best, nearest_and_extra, nearest_other, spill, spill_soar, spill_spann,
                                    spill_top2)


def blobs(n=3000, k=32, d=8, seed=0):
    """Rows around k random centres, the centres, and each row's nearest centre."""
    rng = np.random.default_rng(seed)
    centroids = rng.normal(size=(k, d)).astype(np.float32) * 3
    x = (centroids[rng.integers(k, size=n)] + rng.normal(size=(n, d))).astype(np.float32)
    index = faiss.IndexFlatL2(d)
    index.add(centroids)
    return x, centroids, index.search(x, 1)[1][:, 0]


def test_soar_picks_the_orthogonal_list_where_top2_picks_the_parallel_one():
    # x sits 0.9 right of its centroid c1; cA is further right (parallel residual, d = 1.1),
    # cB straight above x (orthogonal residual, d = 1.15). top2 takes the nearer cA; SOAR
    # (lam = 1): cost(cA) = 1.21 + 1.21, cost(cB) = 1.3225 + 0, so cB.
    centroids = np.array([[0, 0], [2, 0], [0.9, 1.15]], np.float32)
    x = np.array([[0.9, 0]], np.float32)
    primary = np.array([0])
    assert spill_top2(x, centroids, primary, 2.0)[0].tolist() == [[0, 1]]
    assert spill_soar(x, centroids, primary, 2.0, lam=1.0)[0].tolist() == [[0, 2]]
    # lam = 0 is the plain nearest other list
    assert spill_soar(x, centroids, primary, 2.0, lam=0.0)[0].tolist() == [[0, 1]]


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("copies", [1.0, 1.3, 1.6, 2.0])
def test_budgets_are_met_exactly(rule, copies):
    x, centroids, primary = blobs()
    lists, threshold = spill(rule, x, centroids, primary, copies)
    n_copies = (lists >= 0).sum(1)
    assert n_copies.sum() == len(x) + round((copies - 1) * len(x))
    assert (lists[:, 0] == primary).all()
    # extra lists are distinct from the primary and from each other, and fill columns left to right
    for row in lists:
        kept = row[row >= 0]
        assert len(set(kept.tolist())) == len(kept)
        assert (row[: len(kept)] >= 0).all()
    assert np.isnan(threshold) == (copies == 1.0)


def test_spann_respects_eps_and_cap():
    x, centroids, primary = blobs(seed=1)
    lists, eps = spill_spann(x, centroids, primary, 1.6)
    d = np.sqrt(((x[:, None, :] - centroids[None]) ** 2).sum(-1))
    d1 = d[np.arange(len(x)), primary]
    inside = d <= (1 + eps) * d1[:, None] * (1 + 1e-5)
    for i, row in enumerate(lists):
        kept = row[row >= 0]
        # every kept list is inside the closure ...
        assert inside[i, kept].all()
        strictly = np.flatnonzero(d[i] < (1 + eps) * d1[i] * (1 - 1e-5))
        if len(kept) < 8:  # ... and every list strictly inside it is kept, ...
            assert set(strictly.tolist()) <= set(kept.tolist())
        else:  # ... unless the row is at the cap: then its 7 nearest other lists
            others = np.argsort(d[i])
            assert set(kept[1:].tolist()) == set(others[others != primary[i]][:7].tolist())
    assert (lists >= 0).sum(1).max() == 8
    # cap: 20 centroids at the same distance from every row; a budget of 8 gives all rows 8 lists
    angles = np.linspace(0, 2 * np.pi, 20, endpoint=False)
    ring = np.stack([np.cos(angles), np.sin(angles)], 1).astype(np.float32)
    x0 = np.zeros((5, 2), np.float32)
    lists, eps = spill_spann(x0, ring, np.zeros(5, np.int64), 8.0)
    assert lists.shape == (5, 8) and (lists >= 0).all()
    assert eps == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="copies"):
        spill_spann(x0, ring, np.zeros(5, np.int64), 9.0)


def test_non_nearest_primary_as_from_a_gmm():
    # A GMM's primary component need not be the L2-nearest mean: candidates exclude it anyway.
    x, centroids, _ = blobs(n=500, seed=2)
    primary = np.random.default_rng(0).integers(len(centroids), size=len(x))
    cand, cand_d2, primary_d2 = nearest_other(x, centroids, primary, 5)
    assert not (cand == primary[:, None]).any()
    assert (np.diff(cand_d2, axis=1) >= 0).all()
    np.testing.assert_allclose(primary_d2, ((x - centroids[primary]) ** 2).sum(1), rtol=1e-5)
    for rule in sorted(RULES):
        lists, _ = spill(rule, x, centroids, primary, 2.0)
        assert not (lists[:, 1:] == primary[:, None]).any()
        if rule != "spann":  # single-extra rules at 2 copies: every row gets its second list
            assert (lists[:, 1] >= 0).all()


@pytest.mark.parametrize("rule, lam", [("soar", 1.0), ("rair", 0.5), ("soar", 0.0)])
def test_extra_list_matches_float64_costs_on_raw_scale_rows(rule, lam):
    """The rule's choice and excess equal the cost computed from its definition in float64, on rows
    of SIFT's scale (0..255, far from the origin)."""
    x, centroids, _ = blobs(n=4000, k=64, d=32, seed=3)
    x, centroids = x * 20 + 128, centroids * 20 + 128
    primary, cand, excess = nearest_and_extra(x, centroids, rule=rule, lam=lam)
    x64, c64 = x.astype(np.float64), centroids.astype(np.float64)
    r = x64 - c64[primary]
    r2 = (r * r).sum(1)
    others = np.stack([np.argsort(((x64[i] - c64) ** 2).sum(1))[1:17] for i in range(len(x))])
    diff = x64[:, None, :] - c64[others]
    dot = np.einsum("nmd,nd->nm", diff, r)
    cost = (diff**2).sum(-1) + lam * (dot**2 / r2[:, None] if rule == "soar" else dot)
    best = cost.argmin(1)
    reference = cost[np.arange(len(x)), best] - (1 + lam) * r2
    scale = r2.mean()
    # float32 search distances (|x|^2 + |c|^2 - 2 <x, c> far from the origin) bound the agreement
    np.testing.assert_allclose(excess, reference, atol=2e-4 * scale)
    # the choice differs only where two candidates' costs tie to float32 precision
    differ = cand != others[np.arange(len(x)), best]
    chosen = cost[np.arange(len(x)), np.argmax(others == cand[:, None], 1)]
    np.testing.assert_allclose(chosen[differ], cost[np.arange(len(x)), best][differ], atol=2e-4 * scale)
    assert differ.mean() < 0.01


def test_keep_best_takes_the_smallest_scores_as_row_prefixes():
    scores = np.array([[0.1, 0.5, np.inf], [0.2, 0.3, 0.9], [0.05, 0.5, 0.6]])
    keep, threshold = keep_best(scores, 4)
    assert keep.tolist() == [[True, False, False], [True, True, False], [True, False, False]]
    assert threshold == 0.3
    keep, threshold = keep_best(scores, 0)
    assert not keep.any() and np.isnan(threshold)


def test_bad_arguments():
    x, centroids, primary = blobs(n=50)
    with pytest.raises(ValueError, match="unknown spill rule"):
        spill("nope", x, centroids, primary, 1.5)
    with pytest.raises(ValueError, match="copies"):
        spill_top2(x, centroids, primary, 2.5)
    with pytest.raises(ValueError, match="lam"):
        spill_soar(x, centroids, primary, 1.5, lam=-1.0)
    with pytest.raises(ValueError, match="primary"):
        spill_top2(x, centroids, primary[:10], 1.5)
