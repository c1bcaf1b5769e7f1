"""Query-adaptive probing: exactness at full depth, calibration, monotone knobs, copies, bad input.

Data: the real SIFT sample bundled with the package (3,000 base rows, 200 learn rows held
out of the index, 100 test queries), k-means with 16 lists; the module runs in seconds.
"""
import warnings

import faiss
import numpy as np
import pytest
from conftest import ivf_with_lists, kmeans_partition
from flashgmm_ivf.datasets import exact_knn

from flashgmm_ivf.cli import bundled_dataset
from flashgmm_ivf.ivf.probing import (
    SPREAD_RANK,
    ProbeTable,
    ProbeTables,
    adaptive_lists,
    distance_spread,
    enough_entries,
    list_members,
    neighbor_depths,
    query_difficulty,
    scan_costs,
    search_adaptive,
    similarity_gap,
    truncate_lists,
)
from flashgmm_ivf.ivf.quantizer import add_assigned
from flashgmm_ivf.ivf.search import SearchStats, ranked_lists, search_preassigned

NLIST = 16
K = 10


@pytest.fixture(scope="module")
def sift():
    base, test, _ = bundled_dataset()
    base = base.astype(np.float32)
    return base[:3000], base[3000:3200], test[:100].astype(np.float32)


@pytest.fixture(scope="module")
def kmeans_index(sift):
    base = sift[0]
    centroids, primary = kmeans_partition(base, NLIST)
    return ivf_with_lists(centroids, base, primary[:, None])


def counted(search, *args, **kwargs):
    """A free search function's (D, I) and the SearchStats it filled through stats=."""
    stats = SearchStats()
    D, I = search(*args, stats=stats, **kwargs)
    return D, I, stats


def fit_table(index, queries, gt, depth):
    dis, lists, _ = ranked_lists(index, queries, depth)
    return ProbeTable.fit(distance_spread(dis), neighbor_depths(lists, list_members(index), gt[:, :K]),
                          scan_costs(index, lists))


@pytest.fixture(scope="module")
def table(sift, kmeans_index):
    base, learn, _ = sift
    return fit_table(kmeans_index, learn, exact_knn(base, learn, K, "l2"), NLIST)


@pytest.fixture(scope="module")
def flat_and_graph(sift):
    """The same 64 k-means lists behind a flat quantizer and behind an HNSW graph over their means."""
    base = sift[0]
    centroids, primary = kmeans_partition(base, 64)
    lists = primary[:, None]
    return ivf_with_lists(centroids, base, lists), ivf_with_lists(centroids, base, lists, "hnsw")


def recall(I, gt):
    return float(np.mean([len(set(a) & set(b[:K])) / K for a, b in zip(I, gt)]))


def scan(index, x, lists, dis, nprobe):
    """Each query scanning its first nprobe[i] lists: codes scanned, results."""
    D, I, stats = counted(search_preassigned, index, x, K, *truncate_lists(lists, dis, nprobe))
    return D, I, stats.ndis


def test_full_depth_is_exact_search(sift, kmeans_index):
    base, _, test = sift
    dis, lists, _ = ranked_lists(kmeans_index, test, NLIST)
    D, I, ndis = scan(kmeans_index, test, lists, dis, np.full(len(test), NLIST))
    D_exact, I_exact = faiss.knn(test, base, K)
    assert ndis == len(test) * len(base)  # every code scanned once
    np.testing.assert_array_equal(I, I_exact)
    np.testing.assert_allclose(D, D_exact, rtol=1e-5)


def test_per_query_nprobe_scans_exactly_those_lists(sift, kmeans_index):
    _, _, test = sift
    dis, lists, _ = ranked_lists(kmeans_index, test, NLIST)
    nprobe = np.arange(len(test)) % NLIST + 1
    _, _, ndis = scan(kmeans_index, test, lists, dis, nprobe)
    expected = scan_costs(kmeans_index, lists)[np.arange(len(test)), nprobe - 1].sum()
    assert ndis == expected


def test_table_meets_the_asked_recall_on_its_training_queries(sift, kmeans_index, table):
    base, learn, _ = sift
    gt = exact_knn(base, learn, K, "l2")
    dis, lists, _ = ranked_lists(kmeans_index, learn, NLIST)
    costs = []
    for asked in (0.5, 0.8, 0.9, 0.95, 0.99):
        nprobe = table.nprobe(distance_spread(dis), asked)
        _, I, ndis = scan(kmeans_index, learn, lists, dis, nprobe)
        assert recall(I, gt) >= asked - 1e-9
        costs.append(ndis)
    assert costs == sorted(costs)  # a higher recall never costs less


def test_recall_one_loses_nothing_and_nprobe_is_monotone(table):
    # recall 1 (reachable here: the table goes to nlist) keeps every bin at its full-depth recall,
    # at the least depth that does so
    rows = np.arange(table.counts.size)
    full = table.bin_nprobe(1.0)
    np.testing.assert_array_equal(table.recall[rows, full - 1], table.recall[:, -1])
    assert (table.recall[rows, np.maximum(full - 2, 0)] < table.recall[:, -1])[full > 1].all()
    previous = np.zeros_like(table.counts)
    for asked in np.linspace(0.05, 1.0, 20):
        now = table.bin_nprobe(float(asked))
        assert (now >= 1).all() and (now <= table.depth).all()
        assert (now >= previous).all()
        previous = now


def test_adaptive_beats_fixed_nprobe_at_equal_training_recall(sift, kmeans_index, table):
    # On its own training queries the table's choice is the cheapest per-bin one, so a single
    # nprobe for all queries cannot reach the same recall for less.
    base, learn, _ = sift
    gt = exact_knn(base, learn, K, "l2")
    dis, lists, _ = ranked_lists(kmeans_index, learn, NLIST)
    _, I_fixed, ndis_fixed = scan(kmeans_index, learn, lists, dis, np.full(len(learn), 2))
    nprobe = table.nprobe(distance_spread(dis), recall(I_fixed, gt))
    _, _, ndis = scan(kmeans_index, learn, lists, dis, nprobe)
    assert ndis <= ndis_fixed


def test_search_adaptive_scans_the_tables_depths(sift, kmeans_index, table):
    _, _, test = sift
    for asked in (0.6, 0.95):
        D, I, stats = counted(search_adaptive, kmeans_index, test, K, table, asked)
        dis, lists, nprobe, evaluations = adaptive_lists(kmeans_index, test, table, asked)
        D0, I0, ndis = scan(kmeans_index, test, lists, dis, nprobe)
        np.testing.assert_array_equal(I, I0)
        assert (stats.ndis, stats.ncoarse, stats.nlists) == (ndis, evaluations, nprobe.sum())


def test_hnsw_quantizer_ranks_as_flat_and_counts_its_walk(sift, flat_and_graph):
    _, _, test = sift
    flat, graph = flat_and_graph
    assert isinstance(faiss.downcast_index(graph.quantizer), faiss.IndexHNSWFlat)
    # Depth nlist reads every mean from the graph's flat storage (a walk may miss some):
    # the flat ranking, at nlist distances per query.
    dis_g, lists_g, evaluations_g = ranked_lists(graph, test, 64)
    np.testing.assert_array_equal(lists_g, ranked_lists(flat, test, 64)[1])
    assert evaluations_g == len(test) * 64
    for depth in (1, 8, 32):
        dis_f, lists_f, evaluations_f = ranked_lists(flat, test, depth)
        dis_g, lists_g, evaluations_g = ranked_lists(graph, test, depth)
        assert evaluations_f == len(test) * 64
        same = lists_f == lists_g
        assert same.mean() > 0.95  # a graph walk over 64 means misses almost nothing
        np.testing.assert_allclose(dis_g[same], dis_f[same], rtol=1e-5)  # true distances, not estimates
        # the walk's own counter, read around the very search ranked_lists runs
        faiss.cvar.hnsw_stats.reset()
        graph.quantizer.search(test, depth, params=faiss.SearchParametersHNSW(
            efSearch=max(depth, faiss.downcast_index(graph.quantizer).hnsw.efSearch)))
        assert evaluations_g == faiss.cvar.hnsw_stats.ndis > 0


def test_adaptive_lists_rank_each_query_as_deep_as_its_bin(sift, flat_and_graph):
    base, learn, test = sift
    flat, graph = flat_and_graph
    table = fit_table(flat, learn, exact_knn(base, learn, K, "l2"), 64)
    full_dis, full_lists, _ = ranked_lists(flat, test, 64)
    deeper = 0
    for asked in (0.5, 0.9, 1.0):
        dis, lists, nprobe, evaluations = adaptive_lists(flat, test, table, asked)
        assert evaluations == len(test) * 64  # a flat quantizer ranks once, whatever the depth
        np.testing.assert_array_equal(nprobe, table.nprobe(distance_spread(full_dis), asked))
        keep = np.arange(lists.shape[1])[None] < nprobe[:, None]
        np.testing.assert_array_equal(lists[keep], full_lists[:, :lists.shape[1]][keep])
        # the graph: SPREAD_RANK deep for all, then one deeper walk per depth asked beyond it, all counted
        dis, lists, nprobe, evaluations = adaptive_lists(graph, test, table, asked)
        far = np.unique(nprobe[nprobe > SPREAD_RANK])
        deeper += far.size
        assert evaluations == ranked_lists(graph, test, SPREAD_RANK)[2] + sum(
            ranked_lists(graph, test[nprobe == p], int(p))[2] for p in far)
        keep = np.arange(lists.shape[1])[None] < nprobe[:, None]
        assert (lists[keep] == full_lists[:, :lists.shape[1]][keep]).mean() > 0.95
        assert (lists[nprobe <= SPREAD_RANK, SPREAD_RANK:] == -1).all()  # no walk past the feature for them
        _, _, ndis = scan(graph, test, lists, dis, nprobe)
        assert ndis == scan_costs(graph, lists)[np.arange(len(test)), nprobe - 1].sum()
    assert deeper  # recall 1 sends some bins past SPREAD_RANK: the second walk was exercised


def test_members_and_depths_with_copies(sift):
    base = sift[0][:500]
    centroids = base[:4].copy()
    lists = np.full((len(base), 2), -1, np.int64)
    lists[:, 0] = np.arange(len(base)) % 4
    lists[::3, 1] = (lists[::3, 0] + 1) % 4  # every third row also in the next list
    index = ivf_with_lists(centroids, base, lists)
    members = list_members(index)
    np.testing.assert_array_equal(members.ids, np.arange(len(base)))
    np.testing.assert_array_equal(np.sort(members.lists, 1), np.sort(lists, 1))
    order = np.array([[3, 2, 1, 0]])
    # row 0: lists 0 and 1 -> first scanned at depth 2 (list 1); row 1: list 1 only -> 2; row 2: list 2 -> 1
    np.testing.assert_array_equal(neighbor_depths(order, members, np.array([[0, 1, 2, 3]])), [[2, 2, 1, 0]])
    # a list outside the probe order is never scanned: depth = len(order)
    np.testing.assert_array_equal(neighbor_depths(order[:, :2], members, np.array([[1, 2]])), [[2, 1]])
    # user ids need not be row numbers
    big = faiss.IndexIVFFlat(faiss.IndexFlatL2(base.shape[1]), base.shape[1], 4)
    big.quantizer.add(centroids)
    big.is_trained = True
    add_assigned(big, base, lists, np.arange(len(base), dtype=np.int64) * 10 ** 12)
    np.testing.assert_array_equal(neighbor_depths(order, list_members(big), np.array([[0, 10 ** 12]])), [[2, 2]])


def test_queries_outside_the_calibrated_range_get_the_deepest_depth_and_a_warning():
    """Bins say nothing of features outside the training queries' range: such queries get the
    deepest of the bins' depths, and a search where they are many warns."""
    rng = np.random.default_rng(0)
    feature = rng.uniform(1.0, 2.0, 400)
    # Recall rises with depth faster for larger features: easy queries need 1 list, hard ones 4.
    needed = np.where(feature > 1.5, 1, 4)
    found = (np.arange(1, 9)[None, :] >= needed[:, None]).astype(float)
    table = ProbeTable.fit_found(feature, found, np.cumsum(np.ones((400, 8)), 1), n_bins=4)
    assert (table.low, table.high) == (feature.min(), feature.max())
    depths = table.bin_nprobe(1.0)
    assert depths.min() == 1 and depths.max() == 4
    inside = np.array([1.1, 1.9])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(table.nprobe(inside, 1.0), [4, 1])
    with pytest.warns(RuntimeWarning, match="2 of 3 queries are unlike the calibration queries"):
        got = table.nprobe(np.array([0.2, 1.9, 7.0]), 1.0)
    np.testing.assert_array_equal(got, [4, 1, 4])


def test_bad_input_raises(sift, kmeans_index, table):
    _, _, test = sift
    dis, lists, _ = ranked_lists(kmeans_index, test, 4)
    with pytest.raises(ValueError, match="recall must be"):
        table.nprobe(np.zeros(3), 0.0)
    with pytest.raises(ValueError, match="recall must be"):
        table.bin_nprobe(1.5)
    with pytest.raises(ValueError, match="nprobe must hold integers in"):
        scan(kmeans_index, test, lists, dis, np.full(len(test), 5))
    with pytest.raises(ValueError, match="nprobe"):
        scan(kmeans_index, test, lists, dis, np.ones(3, np.int64))
    with pytest.raises(ValueError, match="depth must be <= nlist"):
        ranked_lists(kmeans_index, test, NLIST + 1)
    with pytest.raises(ValueError, match="not in the index"):
        neighbor_depths(lists, list_members(kmeans_index), np.full((len(test), K), 10 ** 6))
    with pytest.raises(ValueError, match="NaN"):
        ProbeTable.fit(np.full(2, np.nan), np.zeros((2, K), np.int64), np.ones((2, 4)))
    with pytest.raises(ValueError, match="must agree"):
        ProbeTable.fit(np.zeros(3), np.zeros((2, K), np.int64), np.ones((2, 4)))
    with pytest.raises(ValueError, match="depth >= 1"):
        distance_spread(np.ones((3, 0)))
    # One list (IVF1): one column, no spread.
    np.testing.assert_array_equal(distance_spread(np.full((3, 1), 2.0)), np.zeros(3))
    two_level = faiss.IndexIVFFlat(faiss.IndexIVFFlat(faiss.IndexFlatL2(test.shape[1]), test.shape[1], 2),
                                   test.shape[1], NLIST)
    with pytest.raises(TypeError, match="IndexFlat, IndexHNSW or IndexRefine"):
        ranked_lists(two_level, test, 4)


def test_similarity_gap_is_the_score_gap_over_the_query_norm():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 8))
    means = rng.normal(size=(40, 8))
    scores = -np.sort(-(x @ means.T), axis=1)
    gap = similarity_gap(scores, x, rank=6)
    np.testing.assert_allclose(gap, (scores[:, 0] - scores[:, 5]) / np.linalg.norm(x, axis=1))
    # Scaling a query scales all its scores: its feature (and so its depth bin) stays.
    np.testing.assert_allclose(similarity_gap(3.0 * scores, 3.0 * x, rank=6), gap)
    np.testing.assert_array_equal(query_difficulty(scores, x, 6, faiss.METRIC_INNER_PRODUCT), gap)
    dis = rng.uniform(1, 2, size=(5, 40)).cumsum(1)
    np.testing.assert_array_equal(query_difficulty(dis, x, 6, faiss.METRIC_L2), distance_spread(dis, 6))
    with pytest.raises(ValueError, match="depth >= 1"):
        similarity_gap(np.ones((3, 0)), x[:3])
    np.testing.assert_array_equal(similarity_gap(np.ones((3, 1)), x[:3]), np.zeros(3))


# ---------------------------------------------------------------------- first-walk widths of a graph quantizer
@pytest.fixture(scope="module")
def graph_tables(sift, flat_and_graph):
    """Depth tables of the graph index, one per first-walk width, fitted on the learn rows."""
    from flashgmm_ivf.ivf.calibration import Calibration, fit_table
    base, learn, _ = sift
    graph = flat_and_graph[1]
    calibration = Calibration.empty(learn, faiss.METRIC_L2, "queries")
    calibration.update(base, np.arange(len(base), dtype=np.int64))
    return fit_table(graph, calibration, 4, widths=(4, 8, 32))


def test_graph_tables_count_the_coarse_walks(sift, flat_and_graph, graph_tables):
    _, learn, _ = sift
    graph = flat_and_graph[1]
    assert isinstance(graph_tables, ProbeTables)
    assert [t.width for t in graph_tables.tables] == [4, 8, 32]
    for table in graph_tables.tables:
        first = ranked_lists(graph, learn, table.width, ef_search=table.width)[2] / len(learn)
        # depth 1: the first walk's mean distances plus the codes of each query's nearest list
        scanned = scan_costs(graph, ranked_lists(graph, learn, table.width, ef_search=table.width)[1])[:, 0].sum()
        np.testing.assert_allclose(table.cost[:, 0].sum(), scanned + first * len(learn))
        # past the width a second walk is charged too: the cost jumps by more than one list's codes
        assert (np.diff(table.cost.sum(0))[table.width - 1] > np.diff(table.cost.sum(0))[table.width - 2])


def test_tables_pick_the_cheapest_width_per_recall(graph_tables):
    for asked in (0.5, 0.9, 0.99):
        chosen = graph_tables.for_recall(asked)
        costs = [t.expected_cost(asked) for t in graph_tables.tables]
        assert chosen.expected_cost(asked) == min(costs)
        depth = chosen.bin_nprobe(asked)
        assert chosen.expected_cost(asked) == pytest.approx(
            chosen.cost[np.arange(depth.size), depth - 1].sum() / chosen.counts.sum())


def test_adaptive_lists_walk_at_the_chosen_width(sift, flat_and_graph, graph_tables):
    _, _, test = sift
    graph = flat_and_graph[1]
    for asked in (0.5, 0.95):
        table = graph_tables.for_recall(asked)
        dis, lists, nprobe, evaluations = adaptive_lists(graph, test, graph_tables, asked)
        walk, first_lists, first = ranked_lists(graph, test, table.width, ef_search=table.width)
        np.testing.assert_array_equal(nprobe, table.nprobe(distance_spread(walk, table.width), asked))
        far = np.unique(nprobe[nprobe > table.width])
        assert evaluations == first + sum(ranked_lists(graph, test[nprobe == p], int(p), ef_search=int(p))[2]
                                          for p in far)
        near = nprobe <= table.width
        np.testing.assert_array_equal(lists[near, :table.width], first_lists[near])


def test_enough_entries_adds_ranked_lists_until_k_entries(sift, kmeans_index):
    _, _, test = sift
    dis, lists, _ = ranked_lists(kmeans_index, test, 6)
    costs = scan_costs(kmeans_index, lists)
    one = np.ones(len(test), np.int64)
    np.testing.assert_array_equal(enough_entries(kmeans_index, lists, one, 1), one)  # any list holds 1
    k = int(costs[:, 1].max()) + 1  # more than any two lists hold
    raised = enough_entries(kmeans_index, lists, one, k)
    assert (raised >= 3).all() and (costs[np.arange(len(test)), raised - 1] >= k).all()
    assert (costs[np.arange(len(test)), raised - 2] < k).all()  # the fewest lists that hold k
    np.testing.assert_array_equal(enough_entries(kmeans_index, lists, one, 10 ** 9), np.full(len(test), 6))
    np.testing.assert_array_equal(enough_entries(kmeans_index, lists, np.full(len(test), 5), k), np.maximum(raised, 5))


def test_graph_tables_predict_what_their_searches_reach():
    """On its own calibration queries (held out of the index), a search at a recall target
    reaches the recall the fitted table promises: past the first walk's width the table
    counts the walk a search really makes (efSearch = the query's nprobe), not a deeper walk
    cut at that depth. High-dimensional rows crowded around fewer centres than lists (three
    lists to a centre, distances concentrated) are where the two differ: a walk as narrow
    as its nprobe misses lists a deeper one finds."""
    import flashgmm_ivf

    d, nlist = 256, 256
    rng = np.random.default_rng(0)
    n = 80 * nlist
    centres = rng.gamma(2.0, 0.05, size=(nlist // 3, d)).astype(np.float32)
    basis = rng.normal(size=(16, d)).astype(np.float32) * 0.02
    x = centres[rng.integers(0, len(centres), n)] + rng.normal(size=(n, 16)).astype(np.float32) @ basis
    x = np.abs(x + 0.01 * rng.normal(size=(n, d))).astype(np.float32)
    index = flashgmm_ivf.index_factory(d, f"IVF{nlist}_GMM,Flat")
    index.train(x[: n // 2])
    index.add(x[n // 2:])
    queries, truth = index.calibration.queries, index.calibration.ids
    for target in (0.9, 0.95):
        _, found = index.search(queries, K, recall=target)
        reached = np.mean([np.isin(found[i], truth[i]).sum() / K for i in range(len(queries))])
        table = index.probe_table.for_recall(target)
        nprobe = table.bin_nprobe(target)
        promised = table.recall[np.arange(len(nprobe)), nprobe - 1].sum() / table.counts.sum()
        assert promised >= target - 0.01
        assert abs(reached - promised) < 0.005, (target, reached, promised)


def test_tables_deepen_until_high_recall_is_reachable():
    """Rows with no cluster structure need far more than a quarter of the lists for recall
    0.99: the table deepens until its calibration queries find REACH of their neighbours, so
    a target of 0.99 is met rather than capped, and a target above what the table reaches
    searches at its deepest probe with a warning."""
    import flashgmm_ivf
    from flashgmm_ivf.ivf.calibration import REACH

    d, nlist = 32, 512
    x = np.random.default_rng(0).normal(size=(40 * nlist, d)).astype(np.float32)
    index = flashgmm_ivf.index_factory(d, f"IVF{nlist}_GMM,Flat")
    index.train(x[: len(x) // 2])
    index.add(x[len(x) // 2:])
    queries, truth = index.calibration.queries, index.calibration.ids
    _, found = index.search(queries, K, recall=0.99)
    reached = np.mean([np.isin(found[i], truth[i]).sum() / K for i in range(len(queries))])
    table = index.probe_table.for_recall(0.99)
    assert 128 < table.depth < nlist
    assert table.reach >= REACH - 0.005
    assert reached >= 0.985, reached
    with pytest.warns(RuntimeWarning, match="more than the depth table reaches"):
        index.search(queries[:10], K, recall=1.0)
