"""FAISS idioms on GMMIndexIVF and the free search functions: what a FAISS user writes works, or fails clearly."""
import faiss
import numpy as np
import pytest

import flashgmm_ivf
from flashgmm_ivf.ivf import SearchStats, search_adaptive, search_nprobe, search_preassigned, search_pruned
from flashgmm_ivf.ivf.search import ranked_lists

D_DIM, NLIST, K = 16, 16, 10


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(NLIST, D_DIM)) * 4
    x = (centers[rng.integers(NLIST, size=6000)] + rng.normal(size=(6000, D_DIM))).astype(np.float32)
    return x[:3000], x[3000:5800], x[5800:]  # train, base, queries


def build(data, description="IVF16_GMM(coarse=flat),Flat", **kwargs):
    train, base, _ = data
    index = flashgmm_ivf.index_factory(D_DIM, description, **kwargs)
    index.train(train)
    index.add(base)
    return index


@pytest.fixture(scope="module")
def index(data):
    return build(data)


def exact_knn(base, queries, k):
    d = ((queries[:, None, :].astype(np.float64) - base[None].astype(np.float64)) ** 2).sum(-1)
    return np.argsort(d, axis=1, kind="stable")[:, :k]


def test_free_functions_return_faiss_shape_and_fill_stats(index, data):
    """(D, I) as FAISS; costs only through the optional stats= output, which they add to."""
    _, _, queries = data
    ivf = flashgmm_ivf.extract_index_ivf(index)
    coarse, lists, _ = ranked_lists(ivf, queries, 4)
    index.search(queries, K, recall=0.9)  # fits the depth table
    table = index.probe_table
    calls = [(search_nprobe, (ivf, queries, K, 4)), (search_preassigned, (ivf, queries, K, lists, coarse)),
             (search_adaptive, (ivf, queries, K, table, 0.9)), (search_pruned, (ivf, queries, K, 4, 1.0))]
    for search, args in calls:
        out = search(*args)
        assert len(out) == 2 and out[0].shape == out[1].shape == (len(queries), K), search.__name__
        assert out[0].dtype == np.float32 and out[1].dtype == np.int64
        stats = SearchStats()
        D, I = search(*args, stats=stats)
        np.testing.assert_array_equal(I, out[1])
        assert stats.nq == len(queries) and stats.ndis > 0 and stats.nlists >= len(queries), search.__name__
        search(*args, stats=stats)  # a second call adds to the same counters, as FAISS's IndexIVFStats
        assert stats.nq == 2 * len(queries)
    np.testing.assert_array_equal(search_nprobe(ivf, queries, K, 4)[1], index.search(queries, K, nprobe=4)[1])
