"""GMMIndexIVF: exactness at full depth, dedup, recall targets, residual-correct PQ/SQ, options, files, bad input.

Real data from ../shared/data (skipped with a reason when absent), subsampled and with
few EM iterations so the module runs in well under a minute on 2 CPU cores.
"""
import itertools
import json
import math
import warnings
import zipfile
from pathlib import Path

import faiss
import faiss.contrib.ivf_tools
import numpy as np
import pytest

from flashgmm_ivf import GaussianMixture
from flashgmm_ivf.ivf import Calibration, GMMIndexIVF, dedup_results, index_factory, read_index, write_index
from flashgmm_ivf.ivf import exact as exact_module
from flashgmm_ivf.ivf.partition import assign_lists, fit_kmeans, mean_variance, spill_scores, spill_threshold
from flashgmm_ivf.ivf.quantizer import add_assigned
from flashgmm_ivf.ivf.soft_assign import TopComponents

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
K = 10


def load(name, n_base, n_query):
    folder = DATA / name
    if not (folder / "base.npy").exists():
        pytest.skip(f"shared data set {folder} is absent (see ../shared/data/fetch)")
    meta = json.loads((folder / "meta.json").read_text())
    base = np.load(folder / "base.npy", allow_pickle=False)[:n_base].astype(np.float32)
    query = np.load(folder / "test.npy", allow_pickle=False)[:n_query].astype(np.float32)
    learn = np.load(folder / "learn.npy", allow_pickle=False)[:n_query].astype(np.float32)
    return base, query, ("cosine" if meta["metric"] == "angular" else "l2"), learn


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning of the short EM runs
        yield


@pytest.fixture(scope="module")
def fashion():
    return load("fashion-mnist-784-small", 4000, 100)


@pytest.fixture(scope="module")
def sift():
    return load("sift-photos-128-small", 4000, 100)


@pytest.fixture(scope="module")
def glove():
    return load("glove-6B-50d-small", 8000, 200)


def build(description, data, **kwargs):
    base, metric = data[0], data[2]
    index = index_factory(base.shape[1], description, metric, device="cpu", **kwargs)
    index.train(base)
    index.add(base)
    return index


@pytest.fixture(scope="module")
def fashion_index(fashion):
    return build("IVF32_GMM,Flat", fashion)  # the default recipe


@pytest.fixture(scope="module")
def glove_index(glove):
    return build("IVF64_GMM(diag,partition=gmm,iter=3,copies=1.5),Flat", glove)


def exact(base, query, metric, k):
    """Exact top-k (FAISS flat index), and float64 distances of any ids to their queries."""
    if metric == "cosine":
        base, query = base / np.linalg.norm(base, axis=1, keepdims=True), query / np.linalg.norm(query, axis=1,
                                                                                                  keepdims=True)
        flat = faiss.IndexFlatIP(base.shape[1])
    else:
        flat = faiss.IndexFlatL2(base.shape[1])
    flat.add(np.ascontiguousarray(base, dtype=np.float32))
    D, I = flat.search(np.ascontiguousarray(query, dtype=np.float32), k)

    def true_distances(ids):
        b, q = base[ids].astype(np.float64), query[:, None, :].astype(np.float64)
        return (b * q).sum(2) if metric == "cosine" else ((b - q) ** 2).sum(2)
    return D, I, true_distances


def recall_of(I, I_ref):
    return float(np.mean([len(set(a) & set(b)) / I_ref.shape[1] for a, b in zip(I, I_ref)]))


def assert_no_duplicates(I):
    for row in I:
        found = row[row >= 0]
        assert len(found) == len(set(found.tolist())), f"duplicate id in row {row}"


# ---------------------------------------------------------------------- exactness and counting
@pytest.mark.parametrize("which", ["fashion", "glove"])
def test_full_probe_equals_exact_search(which, request):
    base, query, metric, _ = request.getfixturevalue(which)
    index = request.getfixturevalue(f"{which}_index")
    assert index.copies_per_vector > 1.35
    D, I = index.search(query, K, nprobe=index.nlist)
    D_ref, I_ref, true_distances = exact(base, query, metric, K)
    assert_no_duplicates(I)
    assert (I >= 0).all()
    # Each returned id carries its own true distance (cosine similarity for glove) ...
    np.testing.assert_allclose(D, true_distances(I), rtol=1e-4, atol=1e-4)
    # ... and the rows are the exact top k (ids may swap only inside float ties).
    np.testing.assert_allclose(D, D_ref, rtol=1e-4, atol=1e-4)
    assert (I == I_ref).mean() > 0.995
    stats = index.last_stats
    assert stats.nq == len(query) and stats.nlists == len(query) * index.nlist
    assert stats.ndis == len(query) * index.index.ntotal  # every copy scanned, copies counted


def test_stats_are_faiss_counters(fashion, fashion_index):
    _, query, _, _ = fashion
    fashion_index.search(query, K, nprobe=4)
    stats = fashion_index.last_stats
    # The counters FAISS left behind are exactly what the stats report (HNSW walk, codes).
    assert stats.ndis == faiss.cvar.indexIVF_stats.ndis > 0
    assert stats.ncoarse == faiss.cvar.hnsw_stats.ndis > 0
    assert stats.total == stats.ndis + stats.ncoarse and stats.per_query == stats.total / len(query)
    flat = build("IVF32_GMM(iter=2,coarse=flat,spill=none),Flat", fashion)
    flat.search(query, K, nprobe=4)
    assert flat.last_stats.ncoarse == len(query) * 32
    assert flat.last_stats.ndis == faiss.cvar.indexIVF_stats.ndis


def test_copies_are_deduplicated(glove_index, glove):
    _, query, _, _ = glove
    assert abs(glove_index.copies_per_vector - 1.5) < 0.05  # threshold set on the training rows
    for nprobe in (1, 4, 16):
        D, I = glove_index.search(query, 50, nprobe=nprobe)
        assert_no_duplicates(I)
        assert (np.diff(D, axis=1) <= 1e-6).all()  # cosine: best (largest) first
    # The raw FAISS index does hold repeated ids (what plain FAISS users see when
    # several lists of one vector are probed).
    unit = np.ascontiguousarray(query / np.linalg.norm(query, axis=1, keepdims=True))
    _, raw = glove_index.index.search(unit, 50, params=faiss.SearchParametersIVF(nprobe=16))
    assert any(len(set(r.tolist())) < len(r) for r in raw)


def test_padding_only_when_lists_hold_fewer(fashion):
    base, query, _, _ = fashion
    index = index_factory(base.shape[1], "IVF8_GMM(iter=2,copies=2.0),Flat", device="cpu")
    index.train(base)
    index.add(base[:30])
    D, I = index.search(query[:5], 40, nprobe=8)
    assert ((I >= 0).sum(1) == 30).all()  # all 30 vectors, each once, then padding
    assert (I[:, 30:] == -1).all() and (D[:, 30:] == np.finfo(np.float32).max).all()
    assert_no_duplicates(I)
    D, I = index.search(query[:5], 40, recall=1.0)  # the lists a query's depth reaches: padding after them
    found = (I >= 0).sum(1)
    assert (found >= 10).all() and all((I[i, found[i]:] == -1).all() for i in range(5))
    assert_no_duplicates(I)


def test_refetch_when_ids_repeat_across_adds(fashion):
    """An id added more often than its copies (here 3 adds, no spill) still gives k distinct ids."""
    base, query, _, _ = fashion
    index = index_factory(base.shape[1], "IVF8_GMM(iter=2,spill=none),Flat", device="cpu")
    index.train(base)
    for _ in range(3):
        index.add_with_ids(base[:500], np.arange(500))
    D, I = index.search(query[:10], 20, nprobe=8)
    assert (I >= 0).all()
    assert_no_duplicates(I)
    assert index.last_stats.n_refetch > 0
    D_ref, _, _ = exact(base[:500], query[:10], "l2", 20)
    np.testing.assert_allclose(D, D_ref, rtol=1e-4)


def test_one_list_rows_fetch_k_and_mixed_rows_keep_faiss_order(fashion, fashion_index):
    """Rows probing one list fetch only k slots; an id added twice to one list is still fetched again."""
    from flashgmm_ivf.ivf import SearchStats, ranked_lists, search_preassigned
    base, query, _, _ = fashion
    ivf = fashion_index.index
    dis, lists, _ = ranked_lists(ivf, query, 4)
    lists[::2, 1:] = -1  # every other row probes one list
    full_d, full_i = search_preassigned(ivf, query, 50, lists, dis, max_dup=2)  # k x max_dup slots for all
    D, I = search_preassigned(ivf, query, 50, lists, dis, max_dup=2, copies=fashion_index.copies_per_vector)
    np.testing.assert_array_equal(I, full_i)
    np.testing.assert_array_equal(D, full_d)

    index = index_factory(base.shape[1], "IVF4_GMM(iter=2,spill=none),Flat", device="cpu")
    index.train(base)
    for _ in range(2):
        index.add_with_ids(base[:400], np.arange(400))
    dis, lists, _ = ranked_lists(index.index, query[:10], 1)
    stats = SearchStats()
    D, I = search_preassigned(index.index, query[:10], 20, lists, dis, max_dup=2, stats=stats)
    assert (I >= 0).all() and stats.n_refetch == 10
    assert_no_duplicates(I)


def test_recall_search_with_k_above_the_lists_scans_few_more_lists(fashion, fashion_index):
    """k larger than what the chosen lists hold: more ranked lists, not a search of every list."""
    base, query, _, _ = fashion
    k = 3 * fashion_index.index.ntotal // fashion_index.nlist  # ~3 lists' worth of entries
    D, I = fashion_index.search(query, k, recall=0.5)
    stats = fashion_index.last_stats
    assert (I >= 0).all()
    assert_no_duplicates(I)
    assert stats.ndis < 0.5 * len(query) * fashion_index.index.ntotal
    assert stats.nlists >= 3 * len(query)
    # the same results as the lists it scanned give with the full over-fetch (k x copies)
    D_ref, I_ref = fashion_index.search(query, k, nprobe=fashion_index.nlist)
    assert recall_of(I, I_ref) > 0.5


def test_smaller_over_fetch_changes_no_result(fashion, fashion_index):
    """fetch_slots: fewer slots than k x copies, re-fetching rows short of k distinct ids, gives FAISS's order."""
    from flashgmm_ivf.ivf import search_nprobe
    base, query, _, _ = fashion
    ivf = fashion_index.index
    assert fashion_index._max_dup == 2 and fashion_index.copies_per_vector > 1.3
    for k, nprobe in ((10, 4), (100, 8), (100, 32)):
        full_d, full_i = search_nprobe(ivf, query, k, nprobe, max_dup=2)
        for copies in (1.0, 1.5):  # 1.0: too few slots, so rows are fetched again
            D, I = search_nprobe(ivf, query, k, nprobe, max_dup=2, copies=copies)
            np.testing.assert_array_equal(I, full_i)
            np.testing.assert_array_equal(D, full_d)


def test_dedup_results_matches_a_plain_reference():
    rng = np.random.default_rng(0)
    for trial in range(200):
        n, kk, k = rng.integers(1, 12), rng.integers(1, 30), rng.integers(1, 40)
        I = rng.integers(-1, rng.integers(2, 40), size=(n, kk)).astype(np.int64)
        if trial % 2:  # copies side by side, as Flat codes give them
            I = np.sort(I, axis=1)
        D = np.sort(rng.integers(0, 8, size=(n, kk)).astype(np.float32), axis=1)  # ties
        Dk, Ik, count = dedup_results(D, I, k)
        for row in range(n):
            seen, want_i, want_d = set(), [], []
            for d, i in zip(D[row], I[row]):
                if i >= 0 and i not in seen:
                    seen.add(i)
                    want_i.append(i)
                    want_d.append(d)
            want_i, want_d = want_i[:k], want_d[:k]
            pad = k - len(want_i)
            assert Ik[row].tolist() == want_i + [-1] * pad and count[row] == len(want_i)
            assert Dk[row].tolist() == want_d + [np.finfo(np.float32).max] * pad


def test_dedup_results_unit():
    D = np.array([[1, 1, 2, 3, 3, 4]], dtype=np.float32)
    I = np.array([[7, 7, 5, 7, 9, -1]])
    Dk, Ik, count = dedup_results(D, I, 4)
    assert Ik.tolist() == [[7, 5, 9, -1]] and count.tolist() == [3]
    assert Dk[0, :3].tolist() == [1, 2, 3] and Dk[0, 3] == np.finfo(np.float32).max
    _, _, count = dedup_results(D, I, 2)
    assert count.tolist() == [2]
    Dk, _, _ = dedup_results(-D, I, 4, faiss.METRIC_INNER_PRODUCT)
    assert Dk[0, 3] == -np.finfo(np.float32).max


# ---------------------------------------------------------------------- recall targets and calibration
def test_recall_target_is_met_and_costs_rise_with_it(fashion, fashion_index):
    base, query, metric, _ = fashion
    _, I_ref, _ = exact(base, query, metric, K)
    assert fashion_index.calibration.source == "training rows"
    costs, recalls = [], []
    for target in (0.5, 0.8, 0.9, 0.99):
        _, I = fashion_index.search(query, K, recall=target)
        assert_no_duplicates(I)
        costs.append(fashion_index.last_stats.per_query)
        recalls.append(recall_of(I, I_ref))
    # Calibrated on held-out training rows only; test queries land near the target.
    assert recalls[2] > 0.85 and recalls[3] > 0.95
    assert all(b >= a for a, b in zip(costs, costs[1:])), costs
    # index.recall makes a target the default of search()
    fashion_index.recall = 0.9
    try:
        _, I = fashion_index.search(query, K)
        np.testing.assert_array_equal(I, fashion_index.search(query, K, recall=0.9)[1])
    finally:
        fashion_index.recall = None


def test_inner_product_depths_are_binned_and_meet_the_target(glove):
    # Raw inner product (MIPS over unnormalised GloVe rows): the depth table bins queries by
    # similarity_gap, and recall targets hold against exact inner-product neighbours.
    base, query = glove[0], glove[1]
    index = index_factory(base.shape[1], "IVF64_GMM,Flat", faiss.METRIC_INNER_PRODUCT, device="cpu")
    index.train(base)
    index.add(base)
    I_ref = faiss.knn(query, base, K, metric=faiss.METRIC_INNER_PRODUCT)[1]
    costs, recalls = [], []
    for target in (0.8, 0.9, 0.99):
        D, I = index.search(query, K, recall=target)
        assert_no_duplicates(I)
        assert np.all(np.diff(D, axis=1) <= 0)  # similarities, best first
        costs.append(index.last_stats.per_query)
        recalls.append(recall_of(I, I_ref))
    assert all((t.counts > 0).sum() > 8 for t in index.probe_table.tables)  # queries spread over the depth bins
    assert recalls[1] > 0.85 and recalls[2] > 0.95, recalls
    assert costs[0] < costs[1] < costs[2], costs


def test_calibrate_with_queries(fashion):
    base, query, metric, learn = fashion
    index = build("IVF16_GMM(iter=2),Flat", fashion)
    before = index.search(query, K, recall=0.9)[1]
    index.calibrate(learn)
    assert index.calibration.source == "queries" and index.probe_table is not None
    _, I_ref, _ = exact(base, learn, metric, K)
    np.testing.assert_array_equal(np.sort(index.calibration.ids, 1), np.sort(I_ref, 1))
    _, I = index.search(query, K, recall=0.9)
    assert recall_of(I, exact(base, query, metric, K)[1]) > 0.85
    assert before.shape == I.shape
    with pytest.raises(ValueError, match="at least nlist=16 queries, got 15"):
        index.calibrate(learn[:15])
    pq = build("IVF16_GMM(iter=2,spill=none,coarse=flat),PQ28x4", (base[:, :112],) + fashion[1:])
    with pytest.raises(ValueError, match="neighbors="):
        pq.calibrate(learn[:, :112])
    pq.calibrate(learn[:, :112], neighbors=exact(base[:, :112], learn[:, :112], metric, K)[1])
    assert pq.search(query[:, :112], K, recall=0.9)[1].shape == (len(query), K)


def test_queries_unlike_the_data_warn_until_calibrated_on_queries_like_them():
    """Queries from other clusters than the data lie outside the calibrated difficulty range: a
    recall search warns and gives them the deepest calibrated depth; calibrating on such
    queries removes the warning and meets the target on new ones."""
    rng = np.random.default_rng(0)
    d = 32
    base = (rng.normal(size=(30, d))[rng.integers(0, 30, 6000)] * 3 + rng.normal(size=(6000, d)) * 0.5)
    other = rng.normal(size=(30, d)) * 3

    def queries(n):
        return (other[rng.integers(0, 30, n)] + rng.normal(size=(n, d)) * 0.5).astype(np.float32)

    index = index_factory(d, "IVF32_GMM(iter=2),Flat", device="cpu")
    index.train(base.astype(np.float32))
    index.add(base.astype(np.float32))
    test = queries(200)
    with pytest.warns(RuntimeWarning, match="queries are unlike the calibration queries"):
        index.search(test, K, recall=0.9)
    index.calibrate(queries(400))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _, I = index.search(test, K, recall=0.9)
    assert recall_of(I, exact(base, test, "l2", K)[1]) > 0.85


def test_table_is_refitted_when_the_index_grows(fashion):
    base, query, _, _ = fashion
    index = index_factory(base.shape[1], "IVF16_GMM(iter=2),Flat", device="cpu")
    index.train(base)
    index.add(base[:2000])
    index.search(query, K, recall=0.9)
    first = index.probe_table
    index.add(base[2000:2050])  # 2.5%: kept
    index.search(query, K, recall=0.9)
    assert index.probe_table is first
    index.add(base[2050:])  # +95%: refitted against the new lists
    index.search(query, K, recall=0.9)
    assert index.probe_table is not first
    assert all(new.cost.sum() > old.cost.sum() for new, old in zip(index.probe_table.tables, first.tables))


@pytest.fixture(scope="module")
def small(glove):
    base, query, metric, learn = glove
    return base[:3000], query, metric, learn


@pytest.mark.parametrize("partition, spill",
                         list(itertools.product(["gmm", "kmeans"], ["soar", "rair", "gmm", "none"])))
def test_every_partition_and_spill_builds_and_searches(small, partition, spill):
    base, query, metric, _ = small
    index = build(f"IVF16_GMM(iter=2,partition={partition},spill={spill},copies=1.3),Flat", small)
    assert abs(index.copies_per_vector - (1.0 if spill == "none" else 1.3)) < 0.05
    _, I = index.search(query, K, recall=0.9)
    assert recall_of(I, exact(base, query, metric, K)[1]) > 0.8


@pytest.mark.parametrize("coarse, probe",
                         list(itertools.product(["flat", "hnsw16", "hnsw", "pca8", "pca"],
                                                ["adaptive", "radius", "fixed"])))
def test_every_coarse_step_and_probe_builds_and_searches(small, coarse, probe):
    base, query, metric, _ = small
    index = build(f"IVF16_GMM(iter=2,coarse={coarse},probe={probe},partition=kmeans),Flat", small)
    _, I_ref, _ = exact(base, query, metric, K)
    _, I = index.search(query, K, recall=0.9)
    assert recall_of(I, I_ref) > 0.8
    _, I = index.search(query, K, nprobe=16)
    assert recall_of(I, I_ref) > 0.99  # all lists (radius: pruned by a bound exact for k-means primaries)
    kind = {"flat": faiss.IndexFlat, "hnsw": faiss.IndexHNSW, "pca": faiss.IndexRefine}[coarse.rstrip("0123456789")]
    assert isinstance(index.quantizer_index, kind)
    assert (index.hnsw_ef_search is None) == (kind is not faiss.IndexHNSW)
    if coarse == "hnsw16":
        assert index.quantizer_index.hnsw.nb_neighbors(1) == 16
    if coarse == "pca8":
        assert faiss.downcast_index(index.quantizer_index.base_index).index.d == 8 + 1


def test_default_calibration_rows_follow_the_documented_rule(fashion):
    """At least nlist and 2,000; up to 4 x nlist and 8,192 while they are at most 1/32 of the
    rows and the brute force costs at most 4 k-means iterations over 256 x nlist rows; at most
    a quarter of the rows."""
    from flashgmm_ivf.ivf.index import _calibration_rows
    assert _calibration_rows(380_000, 2048) == 8192          # 4 x nlist capped
    assert _calibration_rows(200_000, 1024) == 4096          # 4 x nlist
    assert _calibration_rows(60_000, 1024) == 2000           # 1/32 of the rows, below the floor
    assert _calibration_rows(100_000, 1024) == 100_000 // 32  # 1/32 of the rows
    assert _calibration_rows(380_000, 1024) == 4 * 256 * 1024 * 1024 // 380_000  # the cost budget
    assert _calibration_rows(5_000_000, 1024) == 2000        # the floor
    assert _calibration_rows(100_000_000, 65536) == 65536    # nlist
    assert _calibration_rows(6_000, 64) == 1500              # a quarter of the rows
    base = fashion[0]
    index = build("IVF32_GMM,Flat", fashion)
    assert index.calibration.queries.shape[0] == min(2000, len(base) // 4)


def test_graph_links_chosen_on_spaced_queries_tables_on_all(fashion, monkeypatch):
    """The links are chosen on LINK_QUERIES evenly spaced calibration queries; the tables kept use every one."""
    import flashgmm_ivf.ivf.calibration as calibration
    index = build("IVF32_GMM,Flat", fashion)
    cal = index.calibration
    part = cal.spaced(500)
    step = len(cal.queries) // 500
    np.testing.assert_array_equal(part.queries, cal.queries[::step])
    np.testing.assert_array_equal(part.ids, cal.ids[::step])
    assert cal.spaced(len(cal.queries)) is cal
    monkeypatch.setattr(calibration, "LINK_QUERIES", 500)
    candidates = calibration.coarse_candidates("auto", index.d)
    name, tables = calibration.fit_coarse_and_table(index.index, cal, 16, candidates)
    assert name in candidates
    assert all(table.counts.sum() == len(cal.queries) for table in tables.tables)


def test_coarse_step_chosen_by_expected_cost(fashion, tmp_path):
    """coarse='auto': the depth table's fit keeps the densest graph unless another step clearly saves."""
    from flashgmm_ivf.ivf.calibration import (GRAPH_LINKS, LINK_MARGIN, LINK_RECALLS, coarse_candidates,
                                              fit_coarse_and_table, fit_table)
    base, query, _, _ = fashion
    index = build("IVF32_GMM,Flat", fashion)
    candidates = coarse_candidates("auto", index.d)
    assert candidates == ("hnsw32", "hnsw16", "hnsw8", "pca128", "pca64", "pca32")  # 784-d: every projection
    assert index.coarse == "auto" and index.quantizer_index.hnsw.nb_neighbors(1) == 32  # before any fit
    index.hnsw_ef_search = 40
    index.search(query, K, recall=0.9)
    chosen = index.quantizer_index

    def score(name):
        fit_coarse_and_table(index.index, index.calibration, 16, (name,))
        tables = fit_table(index.index, index.calibration, 16)
        return np.mean([np.log(tables.for_recall(r).expected_cost(r)) for r in LINK_RECALLS])
    scores = {name: score(name) for name in candidates}
    bar = scores[f"hnsw{max(GRAPH_LINKS)}"] + np.log(1 - LINK_MARGIN)
    cleared = [name for name in candidates if scores[name] <= bar]
    best = min(cleared, key=scores.get) if cleared else candidates[0]
    if all(abs(v - bar) > 0.01 for v in scores.values()):  # graphs are rebuilt: not at the boundary
        if best.startswith("hnsw"):
            assert isinstance(chosen, faiss.IndexHNSW) and chosen.hnsw.nb_neighbors(1) == int(best[4:])
            assert chosen.hnsw.efSearch == 40  # the user's efSearch carried over
        else:
            assert faiss.downcast_index(chosen.base_index).index.d == int(best[3:]) + 1
    for name in ("hnsw16", "pca64"):  # either kind round-trips with its tables
        fitted, index.probe_table = fit_coarse_and_table(index.index, index.calibration, 16, (name,))
        assert fitted == name
        write_index(index, tmp_path / "coarse.npz")
        loaded = read_index(tmp_path / "coarse.npz")
        assert type(loaded.quantizer_index) is not faiss.IndexFlat
        np.testing.assert_array_equal(loaded.search(query, K, recall=0.9)[1], index.search(query, K, recall=0.9)[1])
        assert loaded.last_stats == index.last_stats


def test_projected_ranking_under_inner_product(sift):
    """Raw inner product: the projection ranks by <Pq, P(m - c)>, the re-ranking by true inner products."""
    from flashgmm_ivf.ivf.coarse import means_index
    from flashgmm_ivf.ivf.search import ranked_lists
    base, query, _, _ = sift
    index = build("IVF32_GMM(coarse=pca32,spill=none),Flat", (base, query, faiss.METRIC_INNER_PRODUCT))
    assert index.coarse_step == "pca32" and index.quantizer_index.metric_type == faiss.METRIC_INNER_PRODUCT
    sims, lists, _ = ranked_lists(index.index, query, 4)
    exact_sims, exact_lists = means_index(index.quantizer_index).search(query, 4)
    assert np.mean([len(set(a) & set(b)) / 4 for a, b in zip(lists, exact_lists)]) > 0.9
    np.testing.assert_allclose(sims[:, 0], exact_sims[:, 0], rtol=1e-5)  # true inner products, best first
    sim = query.astype(np.float64) @ base.T.astype(np.float64)
    kth = -np.sort(-sim, axis=1)[:, K - 1]
    D, I = index.search(query, K, nprobe=32)  # every list: the exact top K (to float32 rounding)
    assert (np.take_along_axis(sim, I, 1).min(1) >= kth * (1 - 1e-6)).all()
    _, I = index.search(query, K, recall=0.9)
    assert recall_of(I, np.argsort(-sim, axis=1)[:, :K]) > 0.8
    auto = index_factory(128, "IVF32_GMM,Flat", faiss.METRIC_INNER_PRODUCT)
    assert auto._coarse_candidates() == ("hnsw32", "pca32")  # a graph keeps 32 links under 'ip'


def test_projected_ranking_counts_its_cost(fashion):
    """A projected ranking: the projection, nlist short distances at (p + 1) / d each, k_factor x depth re-ranked."""
    from flashgmm_ivf.ivf.coarse import means_index
    from flashgmm_ivf.ivf.search import ranked_lists
    base, query, _, _ = fashion
    index = build("IVF32_GMM(coarse=pca16,spill=none),Flat", fashion)
    ranker = index.quantizer_index
    assert isinstance(ranker, faiss.IndexRefine) and ranker.k_factor == 4
    dis, lists, evaluations = ranked_lists(index.index, query, 5)
    assert evaluations == math.ceil(len(query) * (17 + 32 * 17 / 784 + 20))
    exact_dis, exact_lists = means_index(ranker).search(query, 32)
    np.testing.assert_allclose(dis, ((query[:, None] - means_index(ranker).reconstruct_n(0, 32)[lists]) ** 2).sum(-1),
                               rtol=1e-4)  # true distances of the lists returned, nearest first
    assert (np.diff(dis, axis=1) >= 0).all()
    assert np.mean([len(set(a) & set(b)) / 5 for a, b in zip(lists, exact_lists[:, :5])]) > 0.9
    _, lists, evaluations = ranked_lists(index.index, query, 32)  # every list: exact, nlist each
    assert evaluations == len(query) * 32
    np.testing.assert_array_equal(np.sort(lists, 1), np.sort(exact_lists, 1))
    _, _, evaluations = ranked_lists(index.index, query, 16)  # re-ranking capped at every mean
    assert evaluations == math.ceil(len(query) * (17 + 32 * 17 / 784 + 32))
    index.search(query, K, nprobe=3)
    assert index.last_stats.ncoarse == math.ceil(len(query) * (17 + 32 * 17 / 784 + 12))


@pytest.mark.parametrize("covariance", ["spherical", "diag", "full"])
def test_covariance_types(small, covariance):
    base, query, metric, _ = small
    for partition in ("gmm", "kmeans"):
        index = build(f"IVF8_GMM({covariance},iter=2,partition={partition},spill=gmm),Flat", small)
        assert index.gmm.covariance_type == covariance
        _, I = index.search(query, K, recall=0.9)
        assert recall_of(I, exact(base, query, metric, K)[1]) > 0.8


def test_calibration_skips_only_the_query_itself():
    """A stand-in's first exact copy is itself; further duplicates are real neighbours."""
    x = np.zeros((30, 4), np.float32)
    x[20:] = np.arange(1, 11, dtype=np.float32)[:, None]  # 20 zero rows, then 10 distinct rows
    cal = Calibration.empty(x[:1], faiss.METRIC_L2, "training rows")
    cal.update(x[:12], np.arange(12))
    cal.update(x[12:], np.arange(12, 30))
    assert sorted(cal.ids[0].tolist()) == list(range(1, 11)) and (cal.distances[0] == 0).all()
    assert not cal.self_pending[0]


def test_calibration_skips_the_query_itself_despite_roundoff():
    """At d = 960 FAISS's brute force leaves a roundoff of ~1e-6 |q|^2 on many rows' distance to
    themselves: the stand-in's own copy is still recognised, and no stand-in counts itself."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 960)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    queries = x[:300]
    assert (faiss.knn(queries, x, 1)[0][:, 0] > 0).any()  # the roundoff this test is about
    cal = Calibration.empty(queries, faiss.METRIC_L2, "training rows")
    cal.update(x, np.arange(len(x)))
    assert not cal.self_pending.any()
    assert not (cal.ids == np.arange(300)[:, None]).any()
    np.testing.assert_array_equal(cal.ids, faiss.knn(queries, x, 11)[1][:, 1:])


@pytest.mark.parametrize("tile", [4096, 7])
def test_knn_l2_is_exact_far_from_the_origin(tile, monkeypatch):
    """The tiled product brute force agrees with a float64 one on rows offset far from the origin
    (SIFT-like spread at 1e4), to float32 roundoff of the spread (not of the offset), in tiles
    that do not divide the shapes."""
    monkeypatch.setattr(exact_module, "_TILE", tile)
    rng = np.random.default_rng(1)
    x = (rng.integers(0, 256, (500, 24)) + 1e4).astype(np.float32)
    queries = x[rng.choice(500, 30, replace=False)] + rng.integers(-2, 3, (30, 24)).astype(np.float32)
    center = queries.mean(0, dtype=np.float64).astype(np.float32)
    D, I = exact_module.knn_l2(queries, x, 11, center)
    exact = ((queries.astype(np.float64)[:, None] - x.astype(np.float64)[None]) ** 2).sum(-1)
    roundoff = 1e-6 * ((x - center).astype(np.float64) ** 2).sum(1).max()  # ~0.2 here; the offset's is ~1e3
    np.testing.assert_allclose(D, np.sort(exact, 1)[:, :11], rtol=0, atol=roundoff)
    # integer rows: distances 1 apart at least, so the ids are the exact ones (ties aside)
    np.testing.assert_array_equal(exact[np.arange(30)[:, None], I], np.sort(exact, 1)[:, :11])


@pytest.mark.parametrize("spec", ["IVF32_GMM,Flat", "IVF32_GMM(partition=gmm),Flat"])
def test_index_far_from_the_origin_searches_as_it_does_about_it(spec, monkeypatch):
    """Rows offset by 1e4 over unit spread (float32 keeps ~1e-3 of each value): the partition, the
    lists and the searches are those of the same rows about the origin, to that rounding: no list
    left empty by cancelled distances, no -1 results, the same recall at the same cost, also when
    vectors are added in blocks that FAISS's flat search would take BLAS products for."""
    monkeypatch.setattr(faiss.cvar, "distance_compute_blas_threshold", 20)
    rng = np.random.default_rng(4)
    centres = rng.normal(size=(40, 16)) * 3
    x = (centres[rng.integers(0, 40, 4000)] + rng.normal(size=(4000, 16))).astype(np.float32)
    queries = x[:200] + rng.normal(size=(200, 16)).astype(np.float32) * 0.3
    results = []
    for offset in (0.0, 1e4):
        xb, xq = x + np.float32(offset), queries + np.float32(offset)
        index = index_factory(16, spec)
        index.train(xb)
        index.add(xb)
        D, I = index.search(xq, 10, nprobe=4)
        exact = ((xq.astype(np.float64)[:, None] - xb.astype(np.float64)[None]) ** 2).sum(-1)
        truth = np.argsort(exact, 1)[:, :10]
        assert (I >= 0).all() and np.isfinite(D).all()
        lists = faiss.extract_index_ivf(index.index).invlists
        used = sum(lists.list_size(j) > 0 for j in range(lists.nlist))
        results.append((np.mean([len(set(a) & set(b)) for a, b in zip(I, truth)]) / 10,
                        index.last_stats.ndis / len(xq), used))
    (recall0, cost0, used0), (recall1, cost1, used1) = results
    assert recall0 > 0.8 and abs(recall1 - recall0) < 0.03
    assert cost1 == pytest.approx(cost0, rel=0.1)
    assert used1 >= used0 - 2


@pytest.mark.parametrize("shape", [(2, 1), (5, 3), (4096, 4), (4097, 9), (9000, 33)])
def test_mean_variance_is_numpys_in_float64(shape):
    """The blocked float64 variance equals numpy's to round-off on float32 rows far from the
    origin (raw-scale offsets), uint8 rows, and blocks that do not divide the rows."""
    rng = np.random.default_rng(shape[0])
    x = (rng.standard_normal(shape) * 3 + 1e5).astype(np.float32)
    assert mean_variance(x, rows=1000) == pytest.approx(float(x.var(0, dtype=np.float64).mean()), rel=1e-12)
    u = rng.integers(0, 256, shape, dtype=np.uint8)
    assert mean_variance(u) == pytest.approx(float(u.var(0, dtype=np.float64).mean()), rel=1e-12)


def test_kmeans_partition_keeps_faiss_kmeans_lists(fashion):
    """partition=kmeans without spill: the lists are the cells of the k-means centroids (20 iterations)."""
    base, _, _, _ = fashion
    index = build("IVF16_GMM(partition=kmeans,spill=none,calibration_rows=1000),Flat", fashion)
    assert index.kmeans_iter == 20
    means = index.gmm.means_.astype(np.float32)
    flat = faiss.IndexFlatL2(base.shape[1])
    flat.add(means)
    primary = flat.search(base, 1)[1][:, 0]
    sizes = np.array([index.index.invlists.list_size(j) for j in range(16)])
    np.testing.assert_array_equal(sizes, np.bincount(primary, minlength=16))


def test_kmeans_stages(sift, monkeypatch):
    """k-means runs its iterations on nested samples doubling up to all rows: as good as plain k-means."""
    base = sift[0]  # 4,000 rows, 16 lists: samples of 1,000 and 2,000 rows, then all (500 < 32 x 16)
    calls = []
    real_train = faiss.Kmeans.train

    def train(self, x, *args, **kwargs):
        calls.append((len(x), self.cp.niter))
        return real_train(self, x, *args, **kwargs)

    monkeypatch.setattr(faiss.Kmeans, "train", train)
    centroids = fit_kmeans(base, 16, 25, seed=3)
    assert calls == [(1000, 6), (2000, 6), (4000, 13)]

    def objective(c):
        flat = faiss.IndexFlatL2(base.shape[1])
        flat.add(c)
        return flat.search(base, 1)[0].sum()

    plain = faiss.Kmeans(base.shape[1], 16, niter=25, seed=3, max_points_per_centroid=len(base))
    real_train(plain, base)
    assert objective(centroids) <= 1.01 * objective(plain.centroids)
    # Too few rows for a second stage: plain faiss.Kmeans on all rows, about their mean.
    calls.clear()
    center = base[:1000].mean(0, dtype=np.float64).astype(np.float32)
    np.testing.assert_array_equal(fit_kmeans(base[:1000], 16, 25, seed=3),
                                  _plain_kmeans(real_train, base[:1000] - center, 16, 25, 3) + center)
    assert calls == [(1000, 25)]


def _plain_kmeans(train, x, nlist, niter, seed):
    km = faiss.Kmeans(x.shape[1], nlist, niter=niter, seed=seed, max_points_per_centroid=len(x))
    train(km, x)
    return km.centroids


def test_search_params_and_ef_search(fashion, fashion_index):
    _, query, _, _ = fashion
    D0, I0 = fashion_index.search(query, K, nprobe=6)
    D1, I1 = fashion_index.search(query, K, params=faiss.SearchParametersIVF(nprobe=6))
    np.testing.assert_array_equal(I0, I1)
    np.testing.assert_array_equal(D0, D1)
    ef = fashion_index.hnsw_ef_search
    params = faiss.SearchParametersIVF(nprobe=6, quantizer_params=faiss.SearchParametersHNSW(efSearch=200))
    np.testing.assert_array_equal(fashion_index.search(query, K, params=params)[1], I0)  # 32 means: same lists
    assert fashion_index.hnsw_ef_search == ef  # per call only
    fashion_index.hnsw_ef_search = 48
    assert fashion_index.quantizer_index.hnsw.efSearch == 48
    fashion_index.hnsw_ef_search = ef


# ---------------------------------------------------------------------- residual encodings
def test_ivfpq_equals_faiss_ivfpq(sift):
    """Same quantizer, same trained PQ, same partition: our search = FAISS's own IVFPQ search."""
    base, query, _, _ = sift
    index = build("IVF32_GMM(partition=gmm,iter=3,spill=none,coarse=flat),PQ16x4", sift)
    reference = faiss.clone_index(index.index)
    reference.reset()
    lists = index.gmm.predict(base).astype(np.int64)  # the GMM partition (primary lists)
    ids = np.arange(len(base), dtype=np.int64)
    reference.add_core(len(base), faiss.swig_ptr(base), faiss.swig_ptr(ids), faiss.swig_ptr(lists))
    assert reference.ntotal == index.index.ntotal == len(base)
    for nprobe in (1, 4, 32):
        reference.nprobe = nprobe
        D_ref, I_ref = reference.search(query, K)
        D, I = index.search(query, K, nprobe=nprobe)
        np.testing.assert_array_equal(I, I_ref)
        np.testing.assert_array_equal(D, D_ref)
    # Each PQ distance is the distance to that vector's decoding, mean + decoded residual.
    reference.make_direct_map()
    decoded = reference.reconstruct_batch(I.ravel()).reshape(*I.shape, -1).astype(np.float64)
    expected = ((decoded - query[:, None, :].astype(np.float64)) ** 2).sum(2)
    np.testing.assert_allclose(D, expected, rtol=1e-3)


@pytest.mark.parametrize("encoding", ["Flat", "SQ8", "PQ16x4"])
def test_add_assigned_holds_add_cores_entries(sift, encoding):
    """Same codes, ids and order in every list as FAISS's add_preassigned column by column (primaries,
    then copies), over two adds (the second appends to filled lists)."""
    base, _, _, _ = sift
    index = build(f"IVF32_GMM(iter=3,copies=1.5),{encoding}", sift)
    lists = np.concatenate([index.assign(base[:2500]), index.assign(base[2500:])])
    reference = faiss.clone_index(index.index)
    reference.reset()
    for rows in (slice(0, 2500), slice(2500, None)):
        for col in range(lists.shape[1]):
            held = (np.flatnonzero(lists[rows, col] >= 0) + (rows.start or 0)).astype(np.int64)
            # A named ids array: add_preassigned keeps only a raw pointer to it.
            faiss.contrib.ivf_tools.add_preassigned(reference, base[held], lists[held, col], held)
    ours = faiss.clone_index(index.index)
    ours.reset()
    ids = np.arange(len(base), dtype=np.int64)
    add_assigned(ours, base[:2500], lists[:2500], ids[:2500])
    add_assigned(ours, base[2500:], lists[2500:], ids[2500:])
    assert ours.ntotal == reference.ntotal == (lists >= 0).sum()
    for l in range(ours.nlist):
        n = reference.invlists.list_size(l)
        assert ours.invlists.list_size(l) == n
        np.testing.assert_array_equal(faiss.rev_swig_ptr(ours.invlists.get_ids(l), n),
                                      faiss.rev_swig_ptr(reference.invlists.get_ids(l), n))
        size = n * ours.code_size
        np.testing.assert_array_equal(faiss.rev_swig_ptr(ours.invlists.get_codes(l), size),
                                      faiss.rev_swig_ptr(reference.invlists.get_codes(l), size))
    with pytest.raises(ValueError, match="row 3 has list 32"):
        bad = lists[:5].copy()
        bad[3, 0] = 32
        add_assigned(ours, base[:5], bad, ids[:5])


def test_ivfpq_with_copies_full_probe(sift):
    base, query, _, _ = sift
    index = build("IVF32_GMM(iter=3,copies=1.5),PQ16x4", sift)
    D, I = index.search(query, K, nprobe=32)
    assert_no_duplicates(I)
    assert recall_of(I, exact(base, query, "l2", K)[1]) > 0.3


@pytest.mark.parametrize("which", ["fashion", "glove"])
def test_ivfsq_beats_random_partition(which, request):
    base, query, metric, _ = request.getfixturevalue(which)
    index = build("IVF32_GMM(diag,iter=3,copies=1.3,coarse=flat),SQ8", (base, query, metric))
    nprobe = 2
    D, I = index.search(query, K, nprobe=nprobe)
    assert_no_duplicates(I)
    _, I_ref, _ = exact(base, query, metric, K)
    recall = recall_of(I, I_ref)
    # Random partition, same quantizer and SQ codec: probing 2 of 32 lists then finds ~2/32 of the neighbours.
    rand = faiss.clone_index(index.index)
    rand.reset()
    rng = np.random.default_rng(0)
    x = base if metric == "l2" else base / np.linalg.norm(base, axis=1, keepdims=True)
    x = np.ascontiguousarray(x, dtype=np.float32)
    lists = rng.integers(0, 32, len(base)).astype(np.int64)
    ids = np.arange(len(base), dtype=np.int64)
    rand.add_core(len(base), faiss.swig_ptr(x), faiss.swig_ptr(ids), faiss.swig_ptr(lists))
    rand.nprobe = nprobe
    q = query if metric == "l2" else query / np.linalg.norm(query, axis=1, keepdims=True)
    _, I_rand = rand.search(np.ascontiguousarray(q, dtype=np.float32), K)
    assert recall > recall_of(I_rand, I_ref) + 0.2


# ---------------------------------------------------------------------- spill budget
@pytest.mark.parametrize("rule", ["soar", "gmm"])
def test_spill_threshold_meets_the_budget_row_by_row(fashion, rule):
    base, _, _, _ = fashion
    gmm = GaussianMixture(32, covariance_type="spherical", max_iter=5, random_state=0, device="cpu").fit(base)
    primary, second, score = spill_scores(gmm, base, partition="gmm", spill_rule=rule)
    assert (primary == gmm.predict(base)).mean() > 0.99 and (second != primary).all()
    for target in (1.0, 1.3, 1.5, 2.0):
        threshold = spill_threshold(score, target)
        lists = assign_lists(gmm, base, partition="gmm", spill_rule=rule, threshold=threshold)
        assert abs((lists >= 0).sum() / len(base) - target) < 0.01
        # row by row: assigning in blocks gives the same lists
        blocks = np.vstack([assign_lists(gmm, base[i:i + 700], partition="gmm", spill_rule=rule,
                                         threshold=threshold) for i in range(0, len(base), 700)])
        np.testing.assert_array_equal(blocks, lists)


def test_spill_threshold_from_a_sample_is_a_ceiling():
    """Set on a sample, the threshold keeps the whole population within the copies budget."""
    rng = np.random.default_rng(0)
    population = rng.standard_normal(400_000)
    fractions = []
    for _ in range(40):
        sample = rng.choice(population, 20_000, replace=False)
        fractions.append((population <= spill_threshold(sample, 1.5, population=population.size)).mean())
        plain = (population <= spill_threshold(sample, 1.5)).mean()
        assert abs(plain - 0.5) < 0.015
    fractions = np.array(fractions)
    assert (fractions <= 0.5).mean() >= 0.9 and 0.49 < fractions.mean() < 0.5 and fractions.min() > 0.48
    # all rows given: the exact quantile, no margin
    assert (population <= spill_threshold(population, 1.5, population=population.size)).mean() == 0.5


def test_spill_threshold_stops_below_tied_scores():
    """Duplicate rows score alike: a tie at the budget's quantile must not spill past the budget."""
    score = np.repeat(np.arange(10.0), 10)  # ten values, each ten times
    assert (score <= spill_threshold(score, 1.45)).sum() == 40   # 45 asked: the tied 40-49 stay out
    assert (score <= spill_threshold(score, 1.5)).sum() == 50    # no tie at the quantile: exact
    assert spill_threshold(np.zeros(10), 1.5) == -np.inf         # every score tied: none spills


def test_gmm_gaps_survive_underflow():
    """Gaps of hundreds of nats (responsibilities that underflow float32) still meet a budget."""
    rng = np.random.default_rng(0)
    n, m = 10000, 2
    gaps = rng.uniform(200, 900, (n, m - 1))
    top = TopComponents(np.tile(np.arange(m), (n, 1)), np.hstack([np.zeros((n, 1)), -gaps]), 1.0, 256)
    assert (np.exp(-top.gaps.astype(np.float32)) == 0).all()
    for target in (1.3, 1.5, 2.0):
        threshold = spill_threshold(top.gaps[:, 0], target)
        assert threshold > 200 and abs((top.gaps[:, 0] <= threshold).mean() - (target - 1)) < 1e-3


# ---------------------------------------------------------------------- files
def test_save_load_bit_identical(fashion_index, fashion, glove_index, glove, tmp_path):
    for index, (_, query, _, _) in ((fashion_index, fashion), (glove_index, glove)):
        index.search(query, K, recall=0.9)  # the table is fitted: it round-trips too
        path = tmp_path / "index.npz"
        write_index(index, path)
        loaded = read_index(path)
        assert loaded.settings() == index.settings() and loaded.ntotal == index.ntotal
        assert loaded.hnsw_ef_search == index.hnsw_ef_search
        for kwargs in ({"nprobe": 8}, {"recall": 0.9}, {"recall": 0.99}):
            D0, I0 = index.search(query, K, **kwargs)
            D1, I1 = loaded.search(query, K, **kwargs)
            np.testing.assert_array_equal(I0, I1)
            np.testing.assert_array_equal(D0, D1)
            assert loaded.last_stats == index.last_stats
        assert loaded.probe_table is not None and loaded.calibration.source == "training rows"
        ranges = [(t.low, t.high) for t in loaded.probe_table.tables]
        assert ranges == [(t.low, t.high) for t in index.probe_table.tables] and np.isfinite(ranges).all()


def test_version_3_files_read_with_unbounded_tables(fashion_index, fashion, tmp_path):
    """Files of the previous format version (no table_range member) still load."""
    from flashgmm_ivf._io import checksum
    from flashgmm_ivf.ivf import index_io
    fashion_index.search(fashion[1], K, recall=0.9)
    path = tmp_path / "v4.npz"
    write_index(fashion_index, path)
    with np.load(path) as npz:
        members = {name: npz[name] for name in npz.files if name not in ("table_range", "sha256")}
    header = json.loads(members["header"].tobytes())
    header["format_version"] = 3
    members["header"] = np.frombuffer(json.dumps(header, sort_keys=True).encode(), np.uint8)
    members["sha256"] = np.array(checksum(members["header"].tobytes(), members, index_io._VERSION_ARRAYS[3]))
    with open(tmp_path / "v3.npz", "wb") as f:
        np.savez(f, **members)
    loaded = read_index(tmp_path / "v3.npz")
    assert all((t.low, t.high) == (-np.inf, np.inf) for t in loaded.probe_table.tables)
    np.testing.assert_array_equal(loaded.search(fashion[1], K, nprobe=8)[1],
                                  fashion_index.search(fashion[1], K, nprobe=8)[1])
    header["format_version"] = 4  # a version 4 header without the member
    members["header"] = np.frombuffer(json.dumps(header, sort_keys=True).encode(), np.uint8)
    members["sha256"] = np.array(checksum(members["header"].tobytes(), members, index_io._VERSION_ARRAYS[3]))
    with open(tmp_path / "v4bad.npz", "wb") as f:
        np.savez(f, **members)
    with pytest.raises(ValueError, match="do not match format_version 4"):
        read_index(tmp_path / "v4bad.npz")


def test_round_trip_before_the_table_is_fitted(fashion, tmp_path):
    base, query, _, _ = fashion
    index = build("IVF16_GMM(iter=2),Flat", (base[:2000],) + fashion[1:])
    write_index(index, tmp_path / "a.npz")
    loaded = read_index(tmp_path / "a.npz")
    assert loaded.probe_table is None
    np.testing.assert_array_equal(loaded.search(query, K, recall=0.9)[1], index.search(query, K, recall=0.9)[1])
    loaded.add(base[2000:2100])  # ids continue
    assert loaded.ntotal == 2100 and loaded.search(base[2000:2001], 1, nprobe=16)[1][0, 0] == 2000


def _rewrite(path, out, **changes):
    """Copy an index file with some members replaced (the checksum left as it was)."""
    with np.load(path) as npz:
        members = {name: npz[name] for name in npz.files}
    members.update(changes)
    with open(out, "wb") as f:
        np.savez(f, **members)


def test_corrupt_edited_and_foreign_files(fashion_index, tmp_path):
    path = tmp_path / "index.npz"
    write_index(fashion_index, path)
    blob = path.read_bytes()
    cases = {"truncated": blob[: len(blob) // 2], "empty": b"", "garbage": b"not an index" * 100}
    flipped = bytearray(blob)
    flipped[len(blob) // 3] ^= 0xFF  # inside the FAISS payload
    cases["flipped"] = bytes(flipped)
    for name, content in cases.items():
        bad = tmp_path / f"{name}.npz"
        bad.write_bytes(content)
        with pytest.raises(ValueError, match=name):
            read_index(bad)
    # Editing the header (next_id: later adds would reuse ids) fails the checksum.
    header = json.loads(np.load(path)["header"].tobytes())
    header["next_id"] = 0
    _rewrite(path, tmp_path / "edited.npz", header=np.frombuffer(json.dumps(header, sort_keys=True).encode(), np.uint8))
    with pytest.raises(ValueError, match="checksum"):
        read_index(tmp_path / "edited.npz")
    # A valid npz of another format.
    other = tmp_path / "other.npz"
    np.savez(other, header=np.array(json.dumps({"format": "something else"})))
    with pytest.raises(ValueError, match="other"):
        read_index(other)
    # A plain FAISS file says what it is.
    faiss.write_index(fashion_index.index, str(tmp_path / "plain.faiss"))
    with pytest.raises(ValueError, match="plain FAISS index; use faiss.read_index"):
        read_index(tmp_path / "plain.faiss")
    with zipfile.ZipFile(path) as z:
        assert "header.npy" in z.namelist() and "sha256.npy" in z.namelist()
    with pytest.raises(FileNotFoundError):
        read_index(tmp_path / "missing.npz")


# ---------------------------------------------------------------------- API and bad input
def test_factory_and_api(fashion):
    base, _, _, _ = fashion
    index = index_factory(784, "IVF16_GMM(diag, spill=rair, copies=1.2, probe=radius, iter=3, coarse=hnsw8),SQ8",
                          nprobe=4, device="cpu")
    assert isinstance(index.index, faiss.IndexIVFScalarQuantizer)
    assert (index.d, index.nlist, index.nprobe, index.ntotal) == (784, 16, 4, 0)
    assert (index.spill, index.copies, index.probe, index.coarse, index.max_iter) == ("rair", 1.2, "radius",
                                                                                    "hnsw8", 3)
    assert not index.is_trained
    index.train(base[:2000])
    assert index.gmm.covariance_type == "diag" and index.quantizer_index.hnsw.nb_neighbors(1) == 8
    index.add(base[:1000])
    index.add_with_ids(base[1000:1100], np.arange(10**6, 10**6 + 100))
    assert index.ntotal == 1100 and index.index.ntotal >= 1100
    mem = index.memory_usage()
    assert mem["n_entries"] == index.index.ntotal and mem["total_bytes"] > mem["code_bytes"] > 0
    _, I = index.search(base[1000:1005], 1, nprobe=16)
    assert (I[:, 0] == np.arange(10**6, 10**6 + 5)).all()
    index.nprobe = 16
    assert index.index.nprobe == 16
    D, I = index.search(base[:0], 3)
    assert D.shape == I.shape == (0, 3)
    assert index.assign(base[:50]).shape == (50, 2)
    default = index_factory(784, "IVF16_GMM,Flat")
    assert (default.partition, default.covariance_type, default.coarse, default.spill, default.copies,
            default.probe) == ("kmeans", "spherical", "auto", "soar", 1.5, "adaptive")
    keywords = index_factory(784, "IVF16_GMM,Flat", coarse="flat", spill="none", probe="fixed")
    assert (keywords.coarse, keywords.spill, keywords.probe) == ("flat", "none", "fixed")
    ip = index_factory(50, "IVF8_GMM(spherical),Flat", faiss.METRIC_INNER_PRODUCT)
    assert ip.metric == "ip" and ip.probe == "adaptive" and ip.index.metric_type == faiss.METRIC_INNER_PRODUCT
    assert index.index.quantizer.metric_type == faiss.METRIC_L2


@pytest.mark.parametrize("description, match", [
    ("IVF16,Flat", "IVF<nlist>_GMM"),
    ("IVF16_GMM(sphere),Flat", "unknown option"),
    ("IVF16_GMM(diag,foo=1),Flat", "unknown option"),
    ("IVF16_GMM(diag,copies=x),Flat", "bad value"),
    ("IVF16_GMM(diag),PQ16x4fs", "supported"),
    ("IVF16_GMM(diag),Nonsense", "FAISS cannot build"),
    ("IVF16_GMM(copies=2.5),Flat", "copies must be"),
    ("IVF16_GMM(nprobe=17),Flat", "nprobe must be <= nlist"),
    ("IVF16_GMM(coarse=ivf),Flat", "coarse must be"),
    ("IVF16_GMM(coarse=pca784),Flat", "coarse must be"),
    ("IVF16_GMM(coarse=auto8),Flat", "coarse must be"),
    ("IVF16_GMM(spill=spann),Flat", "spill must be"),
    ("IVF16_GMM(probe=posterior),Flat", "probe must be"),
    ("IVF16_GMM(partition=pq),Flat", "partition must be"),
    ("IVF16_GMM(recall=1.5),Flat", "recall must be"),
])
def test_factory_errors(description, match):
    with pytest.raises(ValueError, match=match):
        index_factory(32, description)


def test_projected_ranking_needs_fewer_dimensions_than_the_data():
    with pytest.raises(ValueError, match="1 <= p < d=1"):
        index_factory(1, "IVF4_GMM(coarse=pca),Flat")
    with pytest.raises(ValueError, match="1 <= p < d=32"):
        index_factory(32, "IVF4_GMM(coarse=pca0),Flat")
    assert index_factory(32, "IVF4_GMM(coarse=pca31),Flat").coarse == "pca31"


def test_bad_input(fashion, fashion_index):
    base, query, _, _ = fashion
    fresh = index_factory(784, "IVF16_GMM(spherical,iter=2),Flat", device="cpu")
    with pytest.raises(ValueError, match="not trained"):
        fresh.search(query, K)
    with pytest.raises(ValueError, match="not trained"):
        fresh.add(base)
    with pytest.raises(ValueError, match="dimension 783"):
        fresh.train(base[:, :783])
    with pytest.raises(ValueError, match="at least nlist=16 rows"):
        fresh.train(base[:20])
    fresh.train(base[:1000])
    with pytest.raises(ValueError, match="empty"):
        fresh.search(query, K)
    index = fashion_index
    with pytest.raises(ValueError, match="dimension 10"):
        index.search(query[:, :10], K)
    with pytest.raises(ValueError, match="dimension 10"):
        index.add(base[:5, :10])
    with pytest.raises(ValueError, match="2-D"):
        index.search(query[0], K)
    for k in (0, -3):
        with pytest.raises(ValueError, match="k must be >= 1"):
            index.search(query, k)
    with pytest.raises(TypeError, match="k must be an integer"):
        index.search(query, 2.5)
    for nprobe in (0, -1):
        with pytest.raises(ValueError, match="nprobe must be >= 1"):
            index.search(query, K, nprobe=nprobe)
    with pytest.raises(ValueError, match="nprobe must be <= nlist=32"):
        index.search(query, K, nprobe=33)
    with pytest.raises(ValueError, match="nprobe must be <= nlist"):
        index.nprobe = 33
    for recall in (0, -0.5, 1.01, float("nan"), True):
        with pytest.raises(ValueError, match="recall must be a number in"):
            index.search(query, K, recall=recall)
    with pytest.raises(ValueError, match="either nprobe .* or recall"):
        index.search(query, K, nprobe=4, recall=0.9)
    with pytest.raises(ValueError, match="nprobe either as nprobe= or in params"):
        index.search(query, K, nprobe=4, params=faiss.SearchParametersIVF(nprobe=4))
    bad = query.copy()
    bad[[3, 7], 5] = np.nan
    with pytest.raises(ValueError, match="2 row.*first is row 3"):
        index.search(bad, K)
    with pytest.raises(ValueError, match="overflow float32"):
        index.search(np.full((1, 784), 1e19, np.float32), 5, nprobe=8)
    with pytest.raises(TypeError, match="real numbers"):
        index.search(np.array([["a"] * 784]), K)
    with pytest.raises(ValueError, match="1 out of range, first at position 1"):
        index.add_with_ids(base[:3], np.array([0, -2, 5]))
    with pytest.raises(ValueError, match="ids must have shape"):
        index.add_with_ids(base[:3], np.arange(4))
    before = index.ntotal
    with pytest.raises(ValueError, match="distinct: 2 repeat an earlier one, e.g. id 7 at positions 0 and 2"):
        index.add_with_ids(base[:4], np.array([7, 9, 7, 7]))
    assert index.ntotal == before  # nothing added
    with pytest.raises(ValueError, match="zero row"):
        cos = index_factory(784, "IVF16_GMM(spherical,iter=2),Flat", "cosine", device="cpu")
        cos.train(np.vstack([base[:1000], np.zeros((1, 784), np.float32)]))
    with pytest.raises(ValueError, match="metric must be"):
        GMMIndexIVF(8, 4, metric="hamming")
    with pytest.raises(ValueError, match="metric 'ip' supports probe='adaptive' or 'fixed'"):
        GMMIndexIVF(8, 4, metric="ip", probe="radius")


def test_copies_budget_holds_when_the_training_rows_are_added():
    # The spill threshold is a quantile over all training rows, held-out calibration rows
    # included: adding the training rows themselves gives the budget to one row.
    rng = np.random.default_rng(3)
    noise, centres = rng.standard_normal((3000, 12)), 4 * rng.standard_normal((30, 12))
    x = (noise + centres[rng.integers(0, 30, 3000)]).astype(np.float32)
    index = index_factory(12, "IVF32_GMM(copies=1.4),Flat")
    index.train(x)
    index.add(x)
    assert abs(index.copies_per_vector - 1.4) <= 1.5 / len(x)
