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


@pytest.mark.parametrize("encoding, match", [("PQ4x0", "nbits"), ("PQ4x17", "nbits"), ("PQ3", "dividing d"),
                                             ("PQ0", "M >= 1"), ("SQ3", "SQ3")])
def test_bad_encodings_fail_at_construction(encoding, match):
    with pytest.raises(ValueError, match=match):
        flashgmm_ivf.index_factory(8, f"IVF8_GMM,{encoding}")


def test_encoder_training_errors_are_value_errors(data):
    train = data[0][:300, :8]
    index = flashgmm_ivf.index_factory(8, "IVF8_GMM(calibration_rows=100,coarse=flat),PQ4x8")
    with pytest.raises(ValueError, match=r"cannot train the 'PQ4x8' encoder on 200 rows.*256"):
        index.train(train)


def test_ids_near_the_int64_limit(data):
    train, base, _ = data
    index = flashgmm_ivf.index_factory(D_DIM, "IVF16_GMM(coarse=flat),Flat")
    index.train(train)
    top = np.iinfo(np.int64).max - 1  # the largest id (2**63 - 1 is refused: FAISS's -1 in unsigned form)
    index.add_with_ids(base[:3], np.arange(top - 2, top + 1))
    with pytest.raises(ValueError, match="past the largest id"):
        index.add(base[3:5])
    assert index.ntotal == 3
    for ids in (np.array([top + 1]), np.array([2**63], np.uint64), np.array([-1])):
        with pytest.raises(ValueError, match="ids must be"):
            index.add_with_ids(base[:1], ids)
    D, I = index.search(base[:3], 3, nprobe=NLIST)
    np.testing.assert_array_equal(I[:, 0], np.arange(top - 2, top + 1))


def test_huge_queries_are_refused(index):
    with pytest.raises(ValueError, match="overflow float32"):
        index.search(np.full((1, D_DIM), 1e19, np.float32), 5, nprobe=8)
