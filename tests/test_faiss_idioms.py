"""FAISS idioms on GMMIndexIVF and the free search functions: what a FAISS user writes works, or fails clearly."""
import faiss
import numpy as np
import pytest

import flashgmm_ivf
from flashgmm_ivf.ivf import (
    SearchStats,
    search_adaptive,
    search_nprobe,
    search_preassigned,
    search_pruned,
)
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
        _, I = search(*args, stats=stats)
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
    _, I = index.search(base[:3], 3, nprobe=NLIST)
    np.testing.assert_array_equal(I[:, 0], np.arange(top - 2, top + 1))


def test_huge_queries_are_refused(index):
    with pytest.raises(ValueError, match="overflow float32"):
        index.search(np.full((1, D_DIM), 1e19, np.float32), 5, nprobe=8)


def test_search_parameters_ivf(index, data):
    queries = data[2]
    _, I = index.search(queries, K, params=faiss.SearchParametersIVF(nprobe=8))
    _, I8 = index.search(queries, K, nprobe=8)
    np.testing.assert_array_equal(I, I8)
    assert index.last_stats.nlists == 8 * len(queries)
    with pytest.raises(ValueError, match="not both"):
        index.search(queries, K, nprobe=4, params=faiss.SearchParametersIVF(nprobe=8))


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_range_search_is_deduplicated_and_exact_at_full_probe(data, metric):
    _, base, queries = data
    index = build(data, "IVF16_GMM(coarse=flat,copies=2),Flat", metric=metric)
    assert index.copies_per_vector > 1.5
    if metric == "l2":
        d = ((queries[:, None, :].astype(np.float64) - base[None].astype(np.float64)) ** 2).sum(-1)
        radius = float(np.quantile(d, 0.01))
        want = d < radius
    else:
        qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
        bn = base / np.linalg.norm(base, axis=1, keepdims=True)
        d = qn.astype(np.float64) @ bn.T.astype(np.float64)
        radius = float(np.quantile(d, 0.99))
        want = d > radius
    lims, D, I = index.range_search(queries, radius, nprobe=NLIST)
    assert lims.shape == (len(queries) + 1,) and lims[0] == 0 and D.dtype == np.float32 and I.dtype == np.int64
    for q in range(len(queries)):
        ids, dis = I[lims[q]:lims[q + 1]], D[lims[q]:lims[q + 1]]
        assert len(set(ids)) == len(ids)
        near_edge = np.abs(d[q] - radius) < 1e-4 * max(1.0, abs(radius))
        assert set(ids) - set(np.flatnonzero(near_edge)) == set(np.flatnonzero(want[q] & ~near_edge))
        np.testing.assert_allclose(dis, d[q, ids], rtol=1e-4, atol=1e-4)
        assert (np.diff(dis) >= 0).all() if metric == "l2" else (np.diff(dis) <= 0).all()
    assert index.last_stats.nq == len(queries) and index.last_stats.ndis > len(base)  # copies scanned
    small = index.range_search(queries, radius, params=faiss.SearchParametersIVF(nprobe=1))[0]
    assert small[-1] <= lims[-1]


@pytest.mark.parametrize("how", ["array", "selector", "inner"])
def test_remove_ids_removes_every_copy(data, how):
    _, base, queries = data
    index = build(data, "IVF16_GMM(coarse=flat,copies=2),Flat")
    gone = np.arange(0, len(base), 3)
    entries = index.index.ntotal
    if how == "array":
        assert index.remove_ids(gone) == len(gone)
    elif how == "selector":
        assert index.remove_ids(faiss.IDSelectorRange(0, len(base) // 2)) == len(base) // 2
        gone = np.arange(len(base) // 2)
    else:  # the real FAISS index, used directly: the wrapper notices
        index.index.remove_ids(faiss.IDSelectorBatch(gone))
    assert index.ntotal == len(base) - len(gone)
    assert index.index.ntotal < entries - len(gone)  # copies went too
    kept = np.setdiff1d(np.arange(len(base)), gone)
    _, I = index.search(queries, K, nprobe=NLIST)
    np.testing.assert_array_equal(I, kept[exact_knn(base[kept], queries, K)])
    _, I = index.search(queries, K, recall=0.95)  # the depth table refits against the remaining vectors
    assert not np.isin(I, gone).any()
    assert index.calibration.ids.size and not np.isin(index.calibration.ids, gone).any()
    index.add(base[:5])
    assert index.ntotal == len(kept) + 5 and index.search(base[:1], 1, nprobe=NLIST)[1][0, 0] >= len(base)


def test_idmap_prefix_and_extract_index_ivf(data):
    train, base, queries = data
    index = flashgmm_ivf.index_factory(D_DIM, "IDMap,IVF16_GMM(coarse=flat),Flat")
    index.train(train)
    ids = np.arange(len(base)) * 10 + 7
    index.add_with_ids(base, ids)
    I = index.search(queries, K, nprobe=NLIST)[1]
    np.testing.assert_array_equal(I, ids[exact_knn(base, queries, K)])
    assert flashgmm_ivf.extract_index_ivf(index) is index.index
    plain = faiss.index_factory(D_DIM, "IDMap,IVF4,Flat")
    assert isinstance(flashgmm_ivf.extract_index_ivf(plain), faiss.IndexIVF)
    with pytest.raises(TypeError, match="GMMIndexIVF or a faiss.Index"):
        flashgmm_ivf.extract_index_ivf("IVF4,Flat")


def test_write_read_after_remove(data, tmp_path):
    _, _, queries = data
    index = build(data, "IVF16_GMM(coarse=flat,copies=2),Flat")
    index.remove_ids(np.arange(0, 100))
    flashgmm_ivf.write_index(index, tmp_path / "i.npz")
    loaded = flashgmm_ivf.read_index(tmp_path / "i.npz")
    assert loaded.ntotal == index.ntotal
    np.testing.assert_array_equal(loaded.search(queries, K, nprobe=4)[1], index.search(queries, K, nprobe=4)[1])
