"""Radius pruning: the half-space bound holds, scale 1 is exact on a hard partition, copies dedupe, bad input.

Data: the real SIFT sample bundled with the package (4,000 base rows, 100 test queries),
k-means with 32 lists, flat and HNSW quantizers; the module runs in seconds.
"""
import itertools

import faiss
import numpy as np
import pytest

from conftest import ivf_with_lists, kmeans_partition

from flashgmm_ivf.cli import bundled_dataset
from flashgmm_ivf.ivf.pruning import halfspace_bounds, search_pruned
from flashgmm_ivf.ivf.search import SearchStats, ranked_lists, search_nprobe

NLIST = 32
K = 10


@pytest.fixture(scope="module")
def sift():
    base, test, _ = bundled_dataset()
    return base[:4000].astype(np.float32), test[:100].astype(np.float32)


class Partition:
    def __init__(self, base):
        self.centroids, self.primary = kmeans_partition(base, NLIST)


@pytest.fixture(scope="module")
def partition(sift):
    return Partition(sift[0])


@pytest.fixture(scope="module")
def hard_index(sift, partition):
    return ivf_with_lists(partition.centroids, sift[0], partition.primary[:, None])


def counted(search, *args, **kwargs):
    """A free search function's (D, I) and the SearchStats it filled through stats=."""
    stats = SearchStats()
    D, I = search(*args, stats=stats, **kwargs)
    return D, I, stats


def recall(I, I_ref):
    return float(np.mean([len(set(a) & set(b)) / I_ref.shape[1] for a, b in zip(I, I_ref)]))


def test_bound_never_exceeds_a_true_distance(sift, partition):
    """Every vector whose nearest mean is list j is at least b_j from the query (float64 brute force)."""
    base, test = sift
    index = ivf_with_lists(partition.centroids, base, partition.primary[:, None])
    coarse, lists, _ = ranked_lists(index, test, NLIST)
    bounds = halfspace_bounds(partition.centroids, coarse, lists)
    nearest = faiss.knn(base, partition.centroids, 1)[1][:, 0]
    dist = np.sqrt(((test[:, None, :].astype(np.float64) - base[None].astype(np.float64)) ** 2).sum(-1))
    for q in range(len(test)):
        closest = np.full(NLIST, np.inf)
        np.minimum.at(closest, nearest, dist[q])
        b = bounds[q]
        assert (b <= closest[lists[q]] * (1 + 1e-5) + 1e-3).all(), q
    assert (bounds[:, 0] == 0).all() and (bounds[:, 1:] > 0).mean() > 0.9


def test_bound_matches_float64_formula(partition):
    rng = np.random.default_rng(0)
    c = partition.centroids.astype(np.float64)
    q = c[3] + rng.normal(scale=5, size=c.shape[1])
    d2 = ((q - c) ** 2).sum(1)
    order = np.argsort(d2)[None, :6]
    b = halfspace_bounds(partition.centroids, d2[order].astype(np.float32), order)
    want = (d2[order[0]] - d2[order[0, 0]]) / (2 * np.linalg.norm(c[order[0]] - c[order[0, 0]], axis=1).clip(1e-300))
    want[0] = 0
    np.testing.assert_allclose(b[0], want, rtol=1e-5)


@pytest.mark.parametrize("nprobe", [1, 3, 8, NLIST])
def test_scale_one_is_exact_on_a_hard_partition(sift, hard_index, nprobe):
    """The bound is a real bound: pruned search returns what scanning all nprobe lists returns, for fewer codes."""
    _, test = sift
    D0, I0, full = counted(search_nprobe, hard_index, test, K, nprobe)
    D, I, stats = counted(search_pruned, hard_index, test, K, nprobe, 1.0)
    np.testing.assert_array_equal(I, I0)
    np.testing.assert_allclose(D, D0, rtol=1e-6)
    assert stats.ndis <= full.ndis and len(test) <= stats.nlists <= full.nlists == len(test) * nprobe
    if nprobe >= 8:
        assert stats.ndis < full.ndis  # the bound rules lists out on real data
    assert stats.ncoarse == len(test) * (NLIST + nprobe - 1)


def test_rank_prunes_for_the_first_results(sift, hard_index):
    """Pruned against the 10th neighbour, 30 results come back; the first 10 are exact, for fewer codes."""
    _, test = sift
    _, I0, full = counted(search_nprobe, hard_index, test, 30, 16)
    _, I, stats = counted(search_pruned, hard_index, test, 30, 16, 1.0, rank=10)
    np.testing.assert_array_equal(I[:, :10], I0[:, :10])
    assert stats.ndis < counted(search_pruned, hard_index, test, 30, 16, 1.0)[2].ndis <= full.ndis
    assert (I >= 0).all()


def test_per_query_nprobe_caps_each_query(sift, hard_index):
    """A cap per query (e.g. from a ProbeTable): each query scans at most its own, exactly at scale 1."""
    _, test = sift
    caps = np.arange(len(test)) % 5 + 1
    _, I, stats = counted(search_pruned, hard_index, test, K, caps, 1.0)
    assert len(test) <= stats.nlists <= caps.sum()
    for cap in (1, 3, 5):
        rows = caps == cap
        np.testing.assert_array_equal(I[rows], search_nprobe(hard_index, test[rows], K, cap)[1])
    assert stats.ncoarse == len(test) * NLIST + (caps - 1).sum()


def test_smaller_scale_scans_fewer_lists(sift, hard_index):
    _, test = sift
    scanned = [counted(search_pruned, hard_index, test, K, NLIST, s)[2].nlists for s in (1.0, 0.5, 0.2, 0.05)]
    assert all(a >= b for a, b in itertools.pairwise(scanned)) and scanned[-1] < scanned[0]


def test_copies_come_back_once(sift, partition):
    """A spilled index holds ids in two lists; pruned search returns each id once, nearest first."""
    base, test = sift
    second = faiss.knn(base, partition.centroids, 2)[1][:, 1]
    index = ivf_with_lists(partition.centroids, base, np.stack([partition.primary, second], 1))
    D, I, _ = counted(search_pruned, index, test, K, 8, 0.5)
    assert (I >= 0).all()
    assert all(len(set(row)) == K for row in I)
    assert (np.diff(D, axis=1) >= 0).all()
    # Distances are the vectors' true distances.
    np.testing.assert_allclose(D, ((test[:, None] - base[I]) ** 2).sum(-1), rtol=1e-4)


def test_fewer_vectors_than_k_pads(sift, partition):
    base, test = sift
    index = ivf_with_lists(partition.centroids, base[:5], partition.primary[:5, None])
    D, I, _ = counted(search_pruned, index, test[:3], K, NLIST, 1.0)
    assert (I[:, :5] >= 0).all() and (I[:, 5:] == -1).all() and (D[:, 5:] == np.finfo(np.float32).max).all()


def test_hnsw_quantizer_counts_its_walk(sift, partition):
    base, test = sift
    graph = ivf_with_lists(partition.centroids, base, partition.primary[:, None], "hnsw")
    _, I, stats = counted(search_pruned, graph, test, K, 8, 1.0)
    _, _, walk = ranked_lists(graph, test, 8)
    assert stats.ncoarse == walk + len(test) * 7
    flat = ivf_with_lists(partition.centroids, base, partition.primary[:, None])
    assert recall(I, counted(search_pruned, flat, test, K, 8, 1.0)[1]) > 0.9


def test_bad_input(sift, partition, hard_index):
    base, test = sift
    for scale in (0, -1.0, float("nan"), True, "1"):
        with pytest.raises(ValueError, match="scale"):
            search_pruned(hard_index, test, K, 4, scale)
    for rank in (0, K + 1, 2.0):
        with pytest.raises(ValueError, match="rank"):
            search_pruned(hard_index, test, K, 4, 1.0, rank=rank)
    for nprobe in (0, NLIST + 1, np.full(len(test) - 1, 2), 2.0):
        with pytest.raises(ValueError, match="nprobe"):
            search_pruned(hard_index, test, K, nprobe, 1.0)
    ip = faiss.IndexIVFFlat(faiss.IndexFlatIP(base.shape[1]), base.shape[1], NLIST, faiss.METRIC_INNER_PRODUCT)
    with pytest.raises(ValueError, match="L2"):
        search_pruned(ip, test, K, 4, 1.0)
    coarse, lists, _ = ranked_lists(hard_index, test, 4)
    with pytest.raises(ValueError, match="shape|both"):
        halfspace_bounds(partition.centroids, coarse[:, :3], lists)
    lists = lists.copy()
    lists[7, 0] = -1
    with pytest.raises(ValueError, match="first row without: 7"):
        halfspace_bounds(partition.centroids, coarse, lists)
